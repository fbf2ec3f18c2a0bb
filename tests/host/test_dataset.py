"""`jetyolo data check`: path resolution and repair, label and image checks, the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from device.cli import main
from device.errors import JetyoloError
from host.dataset import check_dataset, parse_label_text, repaired_yaml_path
from host.synth import make_dataset

CLASSES = 4


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A tiny Roboflow-layout dataset (3 train, 2 val, 64 px); returns its data.yaml."""
    return make_dataset(tmp_path / "ds", CLASSES, train=3, val=2, imgsz=64, seed=3)


def _first_label(data_yaml: Path) -> Path:
    return data_yaml.parent / "train" / "labels" / "train_00000.txt"


def _set_line(data_yaml: Path, line: str) -> None:
    """Replace the first label line of the first training image."""
    label = _first_label(data_yaml)
    rows = label.read_text().splitlines()
    label.write_text("\n".join([line, *rows[1:]]) + "\n")


def _edit_yaml(data_yaml: Path, **changes: object) -> None:
    data = yaml.safe_load(data_yaml.read_text())
    data.update(changes)
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))


Mutation = Callable[[Path], None]
LABEL = "train/labels/train_00000.txt"

# (what the case covers, how to break the dataset, expected error substring, expected warning)
REPORT_CASES = [
    # a good dataset: no errors, no warnings
    ("good", lambda d: None, None, None),
    # names given as an {id: name} dict (ultralytics accepts both)
    ("names dict", lambda d: _edit_yaml(d, names={i: f"c{i}" for i in range(CLASSES)}), None, None),
    # nc disagrees with the names list
    ("nc mismatch", lambda d: _edit_yaml(d, nc=5), "data.yaml: nc 5 != 4 names", None),
    # a line with 4 numbers
    ("4 numbers", lambda d: _set_line(d, "0 0.5 0.5 0.2"),
     f"{LABEL}:1: expected 5 numbers (class x_center y_center width height), got 4", None),
    # a coordinate outside [0, 1] (ultralytics would drop the whole image)
    ("coordinate 1.5", lambda d: _set_line(d, "0 1.5 0.5 0.2 0.2"),
     f"{LABEL}:1: coordinate 1.5 outside [0, 1]", None),
    # a coordinate within ultralytics' 1% tolerance: a warning, not an error
    ("coordinate 1.005", lambda d: _set_line(d, "0 0.5 1.005 0.2 0.2"), None,
     f"{LABEL}:1: coordinate 1.005 slightly outside [0, 1]"),
    # a class id >= nc, in the exact format
    ("class id >= nc", lambda d: _set_line(d, "7 0.5 0.5 0.2 0.2"),
     f"{LABEL}:1: class id 7 >= nc 4", None),
    # a class id that is not an integer
    ("class id 1.5", lambda d: _set_line(d, "1.5 0.5 0.5 0.2 0.2"),
     f"{LABEL}:1: class id 1.5 is not a non-negative integer", None),
    # a non-numeric value
    ("non-numeric", lambda d: _set_line(d, "0 0.5 abc 0.2 0.2"),
     f"{LABEL}:1: 'abc' is not a number", None),
    # a zero-size box
    ("zero width", lambda d: _set_line(d, "0 0.5 0.5 0 0.2"), f"{LABEL}:1: box width/height", None),
    # polygons and boxes mixed in one file (ultralytics would misread the boxes)
    ("mixed polygon", lambda d: _set_line(d, "0 0.1 0.1 0.5 0.1 0.3 0.4"),
     f"{LABEL}:1: mixes polygons and boxes", None),
    # an image without a label file: a background image, legal, so only a warning that says so
    ("image without label", lambda d: _first_label(d).unlink(), None,
     "train: 1 image(s) without a label file; background images are legal in YOLO"),
    # a label file without its image
    ("label without image",
     lambda d: (d.parent / "train" / "images" / "train_00000.jpg").unlink(), None,
     f"train: 1 label file(s) without an image, their boxes are not used (restore the images or "
     f"delete the labels): {LABEL}"),
    # LabelImg's classes.txt beside the labels is not an orphan label
    ("classes.txt", lambda d: (d.parent / "train" / "labels" / "classes.txt").write_text("a\n"),
     None, None),
    # an image OpenCV cannot decode
    ("unreadable image",
     lambda d: (d.parent / "valid" / "images" / "valid_00001.jpg").write_bytes(b"not a jpeg"),
     "valid/images/valid_00001.jpg: unreadable image", None),
    # a val folder with no images in it
    ("empty split", lambda d: [p.unlink() for p in (d.parent / "valid" / "images").iterdir()],
     "val: no images in valid/images", "val: 2 label file(s) without an image"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "warning"), REPORT_CASES,
                         ids=[case[0] for case in REPORT_CASES])
def test_check_reports(dataset: Path, case: str, mutate: Mutation, error: Optional[str],
                       warning: Optional[str]) -> None:
    mutate(dataset)
    report = check_dataset(dataset)
    assert report.data_yaml == dataset
    if error is None:
        assert report.errors == []
        report.raise_if_errors()
    else:
        assert any(error in message for message in report.errors), report.errors
        with pytest.raises(JetyoloError, match=r"`jetyolo data check .*` lists them all"):
            report.raise_if_errors()
    if warning is None:
        assert report.warnings == []
    else:
        assert any(warning in message for message in report.warnings), report.warnings


# (what the case covers, data.yaml text or None for no file, expected message)
YAML_CASES = [
    # no data.yaml at all
    ("missing", None, "does not exist"),
    # YAML syntax error, with its line
    ("malformed", "train: [train/images\nval: valid/images\n", "data.yaml:2: not valid YAML"),
    # valid YAML that is not a mapping
    ("a list", "- train\n- val\n", "is not a YOLO data.yaml"),
    # no val entry
    ("no val", "train: train/images\nnames: [a]\n", "has no 'val:' entry"),
    # names of the wrong type
    ("names string", "train: train/images\nval: valid/images\nnames: abc\n", "'names' must be"),
    # neither names nor nc
    ("no names", "train: train/images\nval: valid/images\n", "neither 'names:' nor 'nc:'"),
    # nc that is not an integer
    ("nc text", "train: t\nval: v\nnc: four\nnames: [a]\n",
     "'nc: four' must be a positive integer"),
]


@pytest.mark.parametrize(("case", "text", "message"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_bad_yaml_raises_one_line(tmp_path: Path, case: str, text: Optional[str],
                                  message: str) -> None:
    data_yaml = tmp_path / "data.yaml"
    if text is not None:
        data_yaml.write_text(text)
    with pytest.raises(JetyoloError, match=None) as caught:
        check_dataset(data_yaml)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_raise_if_errors_names_first_error_and_counts_the_rest(dataset: Path) -> None:
    _first_label(dataset).write_text("7 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n0 2 0.5 0.2 0.2\n")
    report = check_dataset(dataset)
    with pytest.raises(JetyoloError) as caught:
        report.raise_if_errors()
    assert f"{LABEL}:1: class id 7 >= nc 4 (and 2 more errors)" in str(caught.value)


def test_counts_per_split_and_class(dataset: Path) -> None:
    report = check_dataset(dataset)
    labels = sorted((dataset.parent / "train" / "labels").glob("*.txt"))
    lines = [line for label in labels for line in label.read_text().splitlines()]
    class_ids = [int(line.split()[0]) for line in lines]
    train = report.splits["train"]
    assert (train.images, report.splits["val"].images) == (3, 2)
    assert train.boxes == len(class_ids)
    assert dict(train.class_counts) == {c: class_ids.count(c) for c in set(class_ids)}
    assert sum(report.class_counts().values()) == train.boxes + report.splits["val"].boxes


def test_polygon_labels_are_counted_not_refused() -> None:
    parsed = parse_label_text("2 0.1 0.1 0.5 0.1 0.3 0.4\n1 0.2 0.2 0.3 0.2 0.25 0.5\n", nc=3)
    assert (parsed.errors, parsed.boxes, parsed.polygons) == ([], [2, 1], 2)


def test_image_list_file(dataset: Path) -> None:
    """A split given as a .txt list: './' is relative to the list; missing images are named."""
    root = dataset.parent
    (root / "train.txt").write_text("./train/images/train_00000.jpg\n./train/images/gone.jpg\n")
    _edit_yaml(dataset, train="train.txt")
    report = check_dataset(dataset)
    assert report.splits["train"].images == 1
    assert report.errors == ["train.txt:2: image ./train/images/gone.jpg does not exist"]


def _roboflow_moved(dataset: Path) -> bytes:
    """A Roboflow export whose absolute `path` and split paths point at the machine it came from."""
    _edit_yaml(dataset, path="/content/datasets/Shapes-1", train="../train/images",
               val="/content/datasets/Shapes-1/valid/images", test="../test/images",
               roboflow={"workspace": "w", "project": "shapes", "version": 1})
    return dataset.read_bytes()


def test_moved_roboflow_paths_are_repaired_into_a_copy(dataset: Path) -> None:
    original = _roboflow_moved(dataset)
    report = check_dataset(dataset)
    assert dataset.read_bytes() == original
    assert report.data_yaml == dataset.with_name("data.repaired.yaml")
    assert report.repairs == ["train: '../train/images' -> 'train/images'",
                              "val: '/content/datasets/Shapes-1/valid/images' -> 'valid/images'"]
    repaired = yaml.safe_load(report.data_yaml.read_text())
    assert "path" not in repaired
    assert (repaired["train"], repaired["val"]) == ("train/images", "valid/images")
    assert repaired["roboflow"]["project"] == "shapes"  # other keys are kept
    assert report.errors == []
    assert any("test: '../test/images' not found" in w for w in report.warnings)
    assert report.splits["train"].images == 3
    # The copy checks clean and names itself as the yaml to use.
    assert check_dataset(report.data_yaml).data_yaml == report.data_yaml
    assert not list(dataset.parent.glob(".data.repaired.yaml.*"))  # no temp file left


def test_repaired_copy_is_what_ultralytics_resolves(dataset: Path) -> None:
    """ultralytics' own check refuses the moved yaml and accepts the repaired copy."""
    from host._env import ultralytics_offline

    ultralytics_offline("data check")
    from ultralytics.data.utils import check_det_dataset

    _roboflow_moved(dataset)
    with pytest.raises(FileNotFoundError):
        check_det_dataset(str(dataset), autodownload=False)
    report = check_dataset(dataset)
    resolved = check_det_dataset(str(report.data_yaml), autodownload=False)
    assert Path(resolved["train"]) == dataset.parent / "train" / "images"
    assert Path(resolved["val"]) == dataset.parent / "valid" / "images"


def test_roboflow_layout_resolves_like_ultralytics_without_a_copy(dataset: Path) -> None:
    """`../train/images` beside the yaml resolves through ultralytics' '../' fallback."""
    _edit_yaml(dataset, train="../train/images", val="../valid/images")
    report = check_dataset(dataset)
    assert (report.repairs, report.errors, report.data_yaml) == ([], [], dataset)
    assert not repaired_yaml_path(dataset).exists()


def test_no_repair_reports_instead_of_writing(dataset: Path) -> None:
    _roboflow_moved(dataset)
    report = check_dataset(dataset, repair=False)
    assert not repaired_yaml_path(dataset).exists()
    assert report.errors and "split paths do not resolve" in report.errors[0]


def test_unfindable_split_is_an_error(dataset: Path) -> None:
    _edit_yaml(dataset, val="/elsewhere/nothing/here")
    report = check_dataset(dataset)
    assert report.errors == ["val: '/elsewhere/nothing/here' not found (looked for "
                             "/elsewhere/nothing/here and next to the data.yaml); fix 'val:' "
                             "in the data.yaml"]


def test_relative_path_is_under_datasets_dir(dataset: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative `path` that does not exist from the cwd is taken under ultralytics'
    DATASETS_DIR (the yaml then may live anywhere)."""
    import host.dataset

    datasets_dir = tmp_path / "datasets"
    datasets_dir.mkdir()
    dataset.parent.rename(datasets_dir / "shapes")
    elsewhere = tmp_path / "configs" / "shapes.yaml"
    elsewhere.parent.mkdir()
    (datasets_dir / "shapes" / "data.yaml").rename(elsewhere)
    _edit_yaml(elsewhere, path="shapes")
    monkeypatch.setattr(host.dataset, "_datasets_dir", lambda: datasets_dir)
    monkeypatch.chdir(tmp_path / "configs")
    report = check_dataset(elsewhere)
    assert report.root == datasets_dir / "shapes"
    assert (report.errors, report.repairs, report.splits["train"].images) == ([], [], 3)


def test_cli_exit_codes(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", str(dataset)]) == 0
    assert "OK: 0 errors, 0 warnings" in capsys.readouterr().out

    missing = tmp_path / "nope" / "data.yaml"
    assert main(["data", "check", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"jetyolo: error: data.yaml {missing} does not exist; pass the data.yaml of a YOLO dataset"
    ]

    _set_line(dataset, "9 0.5 0.5 0.2 0.2")
    assert main(["data", "check", str(dataset)]) == 2
    captured = capsys.readouterr()
    assert f"{LABEL}:1: class id 9 >= nc 4" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        f"jetyolo: error: dataset {dataset}: {LABEL}:1: class id 9 >= nc 4; see the report above"
    )


def test_usual_layout_is_tried_for_a_split_path(dataset: Path) -> None:
    """`../val/images` when the export names the folder `valid`: found by the usual layout."""
    _edit_yaml(dataset, val="../val/images")
    report = check_dataset(dataset)
    assert report.repairs == ["val: '../val/images' -> 'valid/images'"]
    assert (report.errors, report.splits["val"].images) == ([], 2)


def test_a_folder_given_as_data_yaml_says_so(
    dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["data", "check", str(dataset.parent)]) == 2
    err = capsys.readouterr().err
    assert f"{dataset.parent} is a folder, not a data.yaml; pass {dataset}" in err
    assert "does not exist" not in err


def test_windows_paths_are_shown_as_written(dataset: Path) -> None:
    _edit_yaml(dataset, train="C:\\Users\\me\\Shapes\\nowhere\\images")
    report = check_dataset(dataset, repair=False)
    written = "'C:\\Users\\me\\Shapes\\nowhere\\images'"
    assert any(written in error for error in report.errors), report.errors
    assert not any("\\\\" in e for e in report.errors)


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "-h"], ["data"]])
def test_a_verb_group_lists_its_verbs(argv: list, capsys: pytest.CaptureFixture) -> None:
    code = main(argv)
    captured = capsys.readouterr()
    listed = captured.err if argv == ["data"] else captured.out
    assert code == (2 if argv == ["data"] else 0)
    assert "  data check" in listed and "  data synth" in listed
    assert "unknown verb" not in captured.err
