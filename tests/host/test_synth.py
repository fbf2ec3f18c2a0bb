"""`jetyolo data synth`: deterministic, valid, atomic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import pytest
import yaml

import host.synth
from device.cli import main
from device.errors import JetyoloError
from host.dataset import check_dataset
from host.synth import MAX_CLASSES, make_dataset, make_video


def _tree(root: Path) -> Dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    first = _tree(make_dataset(tmp_path / "a", 3, 4, 2, 96, seed=5).parent)
    again = _tree(make_dataset(tmp_path / "b", 3, 4, 2, 96, seed=5).parent)
    other = _tree(make_dataset(tmp_path / "c", 3, 4, 2, 96, seed=6).parent)
    assert first == again
    assert first.keys() == other.keys()
    assert first["train/labels/train_00000.txt"] != other["train/labels/train_00000.txt"]
    assert first["train/images/train_00000.jpg"] != other["train/images/train_00000.jpg"]


def test_counts_and_yaml(tmp_path: Path) -> None:
    data_yaml = make_dataset(tmp_path / "ds", 5, 6, 3, 64, seed=0)
    root = data_yaml.parent
    for split, count in (("train", 6), ("valid", 3)):
        assert len(list((root / split / "images").glob("*.jpg"))) == count
        assert len(list((root / split / "labels").glob("*.txt"))) == count
    data = yaml.safe_load(data_yaml.read_text())
    assert (data["train"], data["val"], data["nc"]) == ("train/images", "valid/images", 5)
    assert data["names"] == [name for name, _, _ in host.synth.CLASSES[:5]]
    image = cv2.imread(str(root / "train" / "images" / "train_00000.jpg"))
    assert image is not None and image.shape == (64, 64, 3)


def test_every_label_passes_the_dataset_check(tmp_path: Path) -> None:
    data_yaml = make_dataset(tmp_path / "ds", MAX_CLASSES, 12, 4, 128, seed=2)
    report = check_dataset(data_yaml)
    assert (report.errors, report.warnings, report.repairs) == ([], [], [])
    assert report.splits["train"].backgrounds == 0
    used = set(report.class_counts())
    assert used <= set(range(MAX_CLASSES)) and len(used) > 1


def test_rectangular_images_have_labels_normalised_to_their_own_size(tmp_path: Path) -> None:
    data_yaml = make_dataset(tmp_path / "ds", 3, 4, 2, (160, 90), seed=3)
    root = data_yaml.parent
    image = cv2.imread(str(root / "train" / "images" / "train_00000.jpg"))
    assert image is not None and image.shape == (90, 160, 3)
    report = check_dataset(data_yaml)
    assert (report.errors, report.warnings) == ([], [])
    rows = [line.split() for line in (root / "train/labels/train_00000.txt").read_text().split("\n")
            if line]
    assert rows and all(0 < float(v) <= 1 for row in rows for v in row[1:])


def _video_frames(path: Path) -> List[Any]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    ok, frame = capture.read()
    while ok:
        frames.append(frame)
        ok, frame = capture.read()
    capture.release()
    return frames


def test_video_frames_and_ground_truth_inside_the_frame(tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip" / "v.mp4", 3, (320, 192), 12, seed=4)
    frames = _video_frames(video)
    assert len(frames) == 12
    assert frames[0].shape == (192, 320, 3)
    truth = json.loads(video.with_suffix(".json").read_text())
    assert (truth["size"], len(truth["frames"]), truth["video"]) == ([320, 192], 12, "v.mp4")
    assert [f["index"] for f in truth["frames"]] == list(range(12))
    boxes = [box for f in truth["frames"] for box in f["boxes"]]
    assert boxes
    for x1, y1, x2, y2, class_id in boxes:
        assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 192
        assert class_id in range(3)
    assert truth["frames"][0]["boxes"] != truth["frames"][-1]["boxes"]  # objects move
    for record in truth["frames"]:  # how visible each box is, one fraction per box
        assert len(record["visible"]) == len(record["boxes"])
        assert all(0.0 <= fraction <= 1.0 for fraction in record["visible"])
    assert record["visible"][-1] > 0.99  # the object drawn last is never hidden
    objects = truth["objects"]  # identities: one id per object, the same in every frame
    assert [o["id"] for o in objects] == truth["frames"][0]["ids"]
    assert all(f["ids"] == truth["frames"][0]["ids"] for f in truth["frames"])
    assert [o["class_id"] for o in objects] == [b[4] for b in truth["frames"][0]["boxes"]]
    assert [p.name for p in video.parent.iterdir()] in (["v.mp4", "v.json"], ["v.json", "v.mp4"])


def test_a_truncated_synth_video_still_plays_up_to_the_cut(tmp_path: Path) -> None:
    """The index (moov) comes first (faststart): the first half of the file holds frames."""
    video = make_video(tmp_path / "v.mp4", 2, (160, 96), 40, seed=2)
    data = video.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    frames = _video_frames(cut)
    assert 5 <= len(frames) < 40
    assert np.array_equal(frames[0], _video_frames(video)[0])


# (what the case covers, make_dataset arguments, expected message)
BAD_DATASET_ARGS = [
    # no classes
    ("0 classes", dict(classes=0, train=2, val=1, imgsz=64), "--classes must be between 1 and"),
    # more classes than shapes
    ("too many classes", dict(classes=MAX_CLASSES + 1, train=2, val=1, imgsz=64), "--classes"),
    # an empty split
    ("no val", dict(classes=2, train=2, val=0, imgsz=64), "--val must be >= 1"),
    # images too small to hold an object
    ("tiny images", dict(classes=2, train=2, val=1, imgsz=16), "--imgsz >= 32"),
]


@pytest.mark.parametrize(("case", "kwargs", "message"), BAD_DATASET_ARGS,
                         ids=[c[0] for c in BAD_DATASET_ARGS])
def test_bad_dataset_args(tmp_path: Path, case: str, kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(JetyoloError, match=message.replace("-", r"\-")):
        make_dataset(tmp_path / "ds", seed=0, **kwargs)
    assert list(tmp_path.iterdir()) == []


# (what the case covers, make_video arguments, expected message)
BAD_VIDEO_ARGS = [
    # no frames
    ("0 frames", dict(classes=2, size=(320, 192), frames=0), "--frames must be >= 1"),
    # a frame too small
    ("tiny frame", dict(classes=2, size=(16, 192), frames=3), "at least 32x32"),
    # no classes
    ("0 classes", dict(classes=0, size=(320, 192), frames=3), "--classes must be between"),
]


@pytest.mark.parametrize(("case", "kwargs", "message"), BAD_VIDEO_ARGS,
                         ids=[c[0] for c in BAD_VIDEO_ARGS])
def test_bad_video_args(tmp_path: Path, case: str, kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(JetyoloError, match=message.replace("-", r"\-")):
        make_video(tmp_path / "v.mp4", seed=0, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_video_size_is_refused_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "ds"
    argv = ["data", "synth", str(out), "--train", "2", "--val", "1", "--imgsz", "64",
            "--video", str(tmp_path / "v.mp4"), "--video-size", "wide"]
    assert main(argv) == 2
    assert "--video-size must look like 1920x1080, got 'wide'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_non_empty_out_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["data", "synth", str(out), "--train", "2", "--val", "1", "--imgsz", "64"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"jetyolo: error: output {out} exists and is not empty; "
        "choose another --out or pass --force"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no staging dir left

    assert main([*argv, "--force"]) == 0
    assert "dataset:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["data.yaml", "train", "valid"]


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write_split = host.synth.write_split

    def fail_on_valid(root: Path, split: str, *args: Any) -> None:
        if split == "valid":
            raise OSError("disk full")
        real_write_split(root, split, *args)

    monkeypatch.setattr(host.synth, "write_split", fail_on_valid)
    with pytest.raises(OSError, match="disk full"):
        make_dataset(tmp_path / "ds", 2, 2, 1, 64, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_visible_fractions_follow_the_drawing_order() -> None:
    # a square half covered by a later one, the later one, and one far away
    from host.synth import SynthObject, visible_fractions

    objects = [
        SynthObject(1, (100.0, 100.0), 80.0),  # green_square 60..140
        SynthObject(1, (140.0, 100.0), 80.0),  # covers x 100..140 of the first
        SynthObject(1, (400.0, 300.0), 40.0),
    ]
    fractions = visible_fractions(objects, 640, 480)
    np.testing.assert_allclose(fractions, [0.5, 1.0, 1.0], atol=0.03)


def test_bad_video_frames_are_refused_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["data", "synth", str(tmp_path / "ds"), "--train", "2", "--val", "1", "--imgsz", "64",
            "--video", str(tmp_path / "v.mp4"), "--frames", "0"]
    assert main(argv) == 2
    assert "--frames must be >= 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
