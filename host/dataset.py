"""Check a YOLO-format dataset (e.g. a Roboflow export) before training on it.

Resolves `path`/`train`/`val`/`test` the way ultralytics does. When a split does not resolve (a
Roboflow `../train/images` after the folder moved, an absolute path from another machine), the
intended folder is looked for next to the data.yaml and a repaired copy is written beside it
(`<name>.repaired.yaml`); the original is never changed. Then every label line and image is
checked: 5 numbers per line, normalized coordinates, integer class ids below nc, images that
OpenCV cannot decode, images without labels (background images: legal) and labels without images.
Prints counts per split and class; exits non-zero when there are errors.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from device.errors import JetyoloError
from device.files import atomic_write_bytes

log = logging.getLogger(__name__)

# ultralytics.data.utils.IMG_FORMATS (8.4); a file with another suffix is not an image to it.
IMG_FORMATS = {"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif",
               "tiff", "webp"}
# Formats OpenCV may not decode although ultralytics reads them through Pillow.
PILLOW_ONLY_FORMATS = {"avif", "dng", "heic", "heif"}
SPLIT_KEYS = ("train", "val", "test")
# Where a split usually lives inside an export, tried when its own path gives no hint.
CONVENTIONAL_DIRS = {
    "train": ("train/images", "images/train"),
    "val": ("valid/images", "val/images", "validation/images", "images/val", "images/valid"),
    "test": ("test/images", "images/test"),
}
NOT_LABELS = {"classes.txt"}  # LabelImg writes the class list beside the labels
SPLIT_HINTS = {"images", "train", "val", "valid", "validation", "test"}
# ultralytics accepts coordinates up to 1% outside [0, 1] and drops the whole image beyond that.
COORD_TOLERANCE = 0.01
MIN_IMAGE_SIDE = 10
SHOWN_PROBLEMS = 20
PROGRESS_SECONDS = 2.0


@dataclass
class SplitReport:
    """What one split holds: where it was found and what its labels count."""

    name: str
    sources: List[Path] = field(default_factory=list)
    images: int = 0
    backgrounds: int = 0  # images with no label file or an empty one
    boxes: int = 0
    polygons: int = 0
    class_counts: Counter = field(default_factory=Counter)
    unlabelled: List[str] = field(default_factory=list)  # images without a label file


@dataclass
class DatasetReport:
    """The outcome of ``check_dataset``; ``data_yaml`` is the file to train on."""

    source_yaml: Path
    data_yaml: Path
    root: Path
    names: List[str]
    splits: Dict[str, SplitReport] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    repairs: List[str] = field(default_factory=list)

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def ok(self) -> bool:
        return not self.errors

    def class_counts(self) -> Counter:
        total: Counter = Counter()
        for split in self.splits.values():
            total.update(split.class_counts)
        return total

    def raise_if_errors(self, listed_above: bool = False) -> None:
        """Raise the first error and how many more there are (``listed_above``: the caller
        printed the report, so don't send the user to `jetyolo data check`)."""
        if not self.errors:
            return
        more = len(self.errors) - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        where = ("see the report above" if listed_above
                 else f"`jetyolo data check {self.source_yaml}` lists them all")
        raise JetyoloError(f"dataset {self.source_yaml}: {self.errors[0]}{suffix}; {where}")

    def format(self) -> str:
        return "\n".join(format_report(self))


# ---------------------------------------------------------------------------------------------
# data.yaml: load, names, path resolution and repair


def load_data_yaml(data_yaml: Path) -> Dict[str, Any]:
    """The yaml as a dict, or one clear error for a missing, unreadable or malformed file."""
    if data_yaml.is_dir():
        inside = sorted(p.name for p in data_yaml.glob("*.y*ml"))
        hint = f"pass {data_yaml / inside[0]}" if inside else "pass the data.yaml of the dataset"
        raise JetyoloError(f"{data_yaml} is a folder, not a data.yaml; {hint}")
    if not data_yaml.is_file():
        raise JetyoloError(
            f"data.yaml {data_yaml} does not exist; pass the data.yaml of a YOLO dataset"
        )
    try:
        data = yaml.safe_load(data_yaml.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise JetyoloError(f"cannot read {data_yaml}: {exc}") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise JetyoloError(
            f"{data_yaml}{line}: not valid YAML ({problem}); fix the syntax"
        ) from exc
    if not isinstance(data, dict):
        raise JetyoloError(
            f"{data_yaml} is not a YOLO data.yaml (expected keys train, val, names; "
            f"got a {type(data).__name__})"
        )
    if "val" not in data and "validation" in data:
        data["val"] = data.pop("validation")
    for key in ("train", "val"):
        if not data.get(key):
            raise JetyoloError(
                f"{data_yaml} has no '{key}:' entry; YOLO needs train and val image paths"
            )
    for key, types in (("path", (str,)), ("train", (str, list)), ("val", (str, list)),
                       ("test", (str, list)), ("names", (list, dict))):
        if data.get(key) is not None and not isinstance(data[key], types):
            expected = " or ".join("a list" if t is list else f"a {t.__name__}" for t in types)
            raise JetyoloError(f"{data_yaml}: '{key}' must be {expected}, not {data[key]!r}")
    return data


def class_names(data: Dict[str, Any], data_yaml: Path, errors: List[str]) -> List[str]:
    """``names`` as a list (from a list or an {id: name} dict), checked against ``nc``."""
    names = data.get("names")
    nc = _integer_nc(data.get("nc"), data_yaml) if "nc" in data else None
    if names is None:
        if nc is None:
            raise JetyoloError(
                f"{data_yaml} has neither 'names:' nor 'nc:'; add the class names list"
            )
        return [f"class_{i}" for i in range(nc)]
    if isinstance(names, dict):
        try:
            by_id = {int(key): str(value) for key, value in names.items()}
        except (TypeError, ValueError):
            raise JetyoloError(f"{data_yaml}: 'names' keys must be class ids 0..n-1") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise JetyoloError(
                f"{data_yaml}: 'names' ids must be 0..{len(by_id) - 1} with none missing, "
                f"got {sorted(by_id)}"
            )
        names = [by_id[i] for i in range(len(by_id))]
    names = [str(name) for name in names]
    if nc is not None and nc != len(names):
        errors.append(
            f"{data_yaml.name}: nc {nc} != {len(names)} names; set nc: {len(names)} "
            f"(or fix the names list)"
        )
    return names


def _integer_nc(value: Any, data_yaml: Path) -> int:
    try:
        number = float(value)
        if number != int(number) or number < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise JetyoloError(f"{data_yaml}: 'nc: {value}' must be a positive integer") from None
    return int(number)


def dataset_root(data: Dict[str, Any], data_yaml: Path) -> Path:
    """ultralytics' dataset root: `path` (relative: cwd if it exists there, else DATASETS_DIR),
    or the yaml's folder when `path` is missing."""
    if not data.get("path"):
        return data_yaml.parent.resolve()
    root = Path(data["path"])
    if root.exists() or root.is_absolute():
        return root.resolve()
    return (_datasets_dir() / root).resolve()


def _datasets_dir() -> Path:
    from host._env import ultralytics_offline

    ultralytics_offline("data check")
    from ultralytics.utils import DATASETS_DIR

    return Path(DATASETS_DIR)


def resolve_entry(root: Path, entry: str, fallback: bool) -> Path:
    """ultralytics' rule: root/entry, and for a string split also root/entry[3:] for '../'."""
    path = (root / entry).resolve()
    if fallback and not path.exists() and entry.startswith("../"):
        path = (root / entry[3:]).resolve()
    return path


def find_near_yaml(entry: str, split: str, yaml_dir: Path) -> Optional[Path]:
    """The folder (or list file) ``entry`` meant, looked for under the yaml's folder: the
    longest tail of its path that exists there, else (for a path ending in images/train/val...)
    the usual export layout for ``split``."""
    pure = PureWindowsPath(entry) if "\\" in entry else PurePosixPath(entry)
    parts = [part for part in pure.parts if part not in ("..", ".") and part != pure.anchor]
    shortest = min(2, len(parts))
    tails = [parts[start:] for start in range(len(parts) - shortest + 1)]
    candidates = [yaml_dir.joinpath(*tail) for tail in tails if tail]
    if parts and parts[-1].lower() in SPLIT_HINTS:  # ".../valid/images": try the usual layout
        candidates += [yaml_dir / conventional for conventional in CONVENTIONAL_DIRS[split]]
    for candidate in candidates:
        if candidate.is_file() or (candidate.is_dir() and _has_images(candidate)):
            return candidate.resolve()
    return None


def _has_images(folder: Path) -> bool:
    return next(iter(_images_in_dir(folder)), None) is not None


def resolve_splits(data: Dict[str, Any], data_yaml: Path, report: DatasetReport) -> Dict[str, Any]:
    """Fill ``report.splits`` with resolved sources; return the yaml's new split values (only the
    keys that changed)."""
    yaml_dir = data_yaml.parent.resolve()
    changed: Dict[str, Any] = {}
    for split in SPLIT_KEYS:
        value = data.get(split)
        if not value:
            continue
        entries = [value] if isinstance(value, str) else [str(item) for item in value]
        sources, new_entries, any_repaired = [], [], False
        for entry in entries:
            path = resolve_entry(report.root, entry, fallback=isinstance(value, str))
            if not path.exists():
                found = find_near_yaml(entry, split, yaml_dir)
                if found is None:
                    _unresolved(split, entry, path, report)
                    new_entries.append(entry)
                    continue
                repaired = _yaml_relative(found, yaml_dir)
                report.repairs.append(f"{split}: {_quoted(entry)} -> {_quoted(repaired)}")
                path, any_repaired = found, True
            sources.append(path)
            new_entries.append(_yaml_relative(path, yaml_dir))
        report.splits[split] = SplitReport(split, sources)
        if any_repaired:
            changed[split] = new_entries[0] if isinstance(value, str) else new_entries
    return changed


def _quoted(path: str) -> str:
    """``'C:\\data\\train'`` as written in the yaml: repr() would double each backslash."""
    return f"'{path}'"


def _unresolved(split: str, entry: str, path: Path, report: DatasetReport) -> None:
    message = f"{split}: {_quoted(entry)} not found (looked for {path} and next to the data.yaml)"
    if split == "test":
        report.warnings.append(f"{message}; ultralytics ignores 'test' unless you validate on it")
    else:
        report.errors.append(f"{message}; fix '{split}:' in the data.yaml")


def _yaml_relative(path: Path, yaml_dir: Path) -> str:
    try:
        return path.relative_to(yaml_dir).as_posix()
    except ValueError:
        return str(path)


def repaired_yaml_path(data_yaml: Path) -> Path:
    stem = data_yaml.stem
    stem = stem[: -len(".repaired")] if stem.endswith(".repaired") else stem
    return data_yaml.with_name(f"{stem}.repaired{data_yaml.suffix}")


def write_repaired(data: Dict[str, Any], changed: Dict[str, Any], data_yaml: Path,
                   report: DatasetReport) -> Path:
    """Write the yaml with repaired split paths beside the original (atomically).

    The copy drops `path`, so ultralytics resolves every split from the copy's own folder; splits
    that were fine keep their location (relative to that folder, or absolute)."""
    yaml_dir = data_yaml.parent.resolve()
    repaired = {key: value for key, value in data.items() if key != "path"}
    for split in SPLIT_KEYS:
        if split in changed:
            repaired[split] = changed[split]
        elif split in report.splits and report.splits[split].sources:
            sources = [_yaml_relative(path, yaml_dir) for path in report.splits[split].sources]
            repaired[split] = sources[0] if isinstance(data[split], str) else sources
    header = (f"# Written by `jetyolo data check` from {data_yaml.name} (left unchanged):\n"
              + "".join(f"#   {change}\n" for change in report.repairs))
    out = repaired_yaml_path(data_yaml)
    try:
        atomic_write_bytes(out, (header + yaml.safe_dump(repaired, sort_keys=False,
                                                         allow_unicode=True)).encode())
    except OSError as exc:
        raise JetyoloError(
            f"cannot write the repaired copy {out} ({exc}); copy the dataset to a writable folder"
        ) from exc
    return out


# ---------------------------------------------------------------------------------------------
# images and labels


def img2label_path(image: str) -> str:
    """ultralytics.data.utils.img2label_paths for one path: last /images/ -> /labels/, .txt."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return labels.join(image.rsplit(images, 1)).rsplit(".", 1)[0] + ".txt"


def _is_image(name: str) -> bool:
    return name.rpartition(".")[-1].lower() in IMG_FORMATS


def _images_in_dir(folder: Path) -> Iterator[str]:
    for dirpath, _dirs, files in os.walk(folder):
        for name in sorted(files):
            if _is_image(name):
                yield os.path.join(dirpath, name)


def list_images(source: Path, report: DatasetReport) -> List[str]:
    """Image paths of one split source: a folder (recursive) or a list file (one path a line,
    './x' relative to the list file, other relative paths relative to the working directory)."""
    if source.is_dir():
        return sorted(_images_in_dir(source))
    images = []
    try:
        lines = source.read_text(encoding="utf-8-sig").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        report.errors.append(f"{_show(source, report)}: cannot read the image list ({exc})")
        return []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or not _is_image(line):
            continue
        image = str(source.parent / line[2:]) if line.startswith("./") else line
        if not Path(image).is_file():
            report.errors.append(f"{_show(source, report)}:{number}: image {line} does not exist")
            continue
        images.append(image)
    return images


def split_images(
    data_yaml: Path, splits: Sequence[str]
) -> Tuple[DatasetReport, Dict[str, List[Path]]]:
    """The sorted images of ``splits``, resolved the way ultralytics and ``check_dataset`` do
    (no repair, labels unchecked); what does not resolve is in the report's errors."""
    data_yaml = Path(data_yaml)
    data = load_data_yaml(data_yaml)
    errors: List[str] = []
    names = class_names(data, data_yaml, errors)
    report = DatasetReport(data_yaml, data_yaml, dataset_root(data, data_yaml), names,
                           errors=errors)
    resolve_splits(data, data_yaml, report)
    images = {
        split: sorted(Path(image) for source in report.splits[split].sources
                      for image in list_images(source, report))
        for split in splits if split in report.splits
    }
    return report, images


@dataclass
class LabelFile:
    """What one label file holds, and what is wrong with it (messages without the file name)."""

    boxes: List[int] = field(default_factory=list)  # class ids, one per box or polygon
    polygons: int = 0
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def parse_label_text(text: str, nc: int) -> LabelFile:
    """Check YOLO detect label lines: `class x y w h` (or a polygon `class x1 y1 x2 y2 ...`),
    normalized coordinates, integer class ids below nc. Messages start with the line number."""
    result = LabelFile()
    rows: List[Tuple[int, List[str]]] = [(n, line.split()) for n, line in
                                          enumerate(text.splitlines(), 1) if line.strip()]
    kinds = {row_kind(values) for _n, values in rows}
    if {"box", "polygon"} <= kinds:
        first = next(n for n, values in rows if row_kind(values) == "polygon")
        result.errors.append(f"{first}: mixes polygons and boxes in one file; ultralytics reads "
                             "every row as a polygon then; keep one kind per file")
        return result
    seen = set()
    for number, values in rows:
        message = _check_row(values, nc)
        if message:
            result.errors.append(f"{number}: {message}")
            continue
        if tuple(values) in seen:
            result.warnings.append(f"{number}: duplicate of an earlier line (ultralytics drops it)")
        seen.add(tuple(values))
        result.warnings += [f"{number}: {text}" for text in _tolerated(values)]
        result.boxes.append(int(float(values[0])))
        result.polygons += row_kind(values) == "polygon"
    return result


def row_kind(values: Sequence[str]) -> str:
    if len(values) == 5:
        return "box"
    if len(values) >= 7 and len(values) % 2 == 1:
        return "polygon"
    return "bad"


def _check_row(values: Sequence[str], nc: int) -> Optional[str]:
    if row_kind(values) == "bad":
        return f"expected 5 numbers (class x_center y_center width height), got {len(values)}"
    try:
        numbers = [float(value) for value in values]
    except ValueError:
        bad = next(value for value in values if not _is_float(value))
        return f"{bad!r} is not a number"
    if not all(math.isfinite(number) for number in numbers):
        return "coordinates must be finite numbers"
    class_id, coords = numbers[0], numbers[1:]
    if class_id != int(class_id) or class_id < 0:
        return f"class id {values[0]} is not a non-negative integer"
    if class_id >= nc:
        return f"class id {int(class_id)} >= nc {nc}"
    outside = [value for value in coords if not -COORD_TOLERANCE <= value <= 1 + COORD_TOLERANCE]
    if outside:
        return (f"coordinate {outside[0]:g} outside [0, 1]; YOLO labels are normalized by the "
                "image width and height")
    if len(values) == 5 and (coords[2] <= 0 or coords[3] <= 0):
        return f"box width/height must be > 0, got {coords[2]:g} x {coords[3]:g}"
    return None


def _tolerated(values: Sequence[str]) -> List[str]:
    coords = [float(value) for value in values[1:]]
    outside = [value for value in coords if not 0 <= value <= 1]
    if outside:
        return [f"coordinate {outside[0]:g} slightly outside [0, 1] (ultralytics tolerates 1%)"]
    return []


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def image_problem(image: str) -> Optional[str]:
    """Why OpenCV cannot use this image (None when it decodes)."""
    import cv2

    try:
        data = np.fromfile(image, np.uint8)
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    decoded = cv2.imdecode(data, cv2.IMREAD_REDUCED_GRAYSCALE_2) if data.size else None
    if decoded is None:
        return "unreadable image (OpenCV cannot decode it; re-export or delete it)"
    if min(decoded.shape[:2]) * 2 < MIN_IMAGE_SIDE:
        return f"image smaller than {MIN_IMAGE_SIDE} px (ultralytics drops it)"
    return None


def check_split(split: SplitReport, report: DatasetReport) -> None:
    images = [image for source in split.sources for image in list_images(source, report)]
    split.images = len(images)
    if not images and split.sources:
        target = report.errors if split.name != "test" else report.warnings
        where = ", ".join(_show(source, report) for source in split.sources)
        target.append(f"{split.name}: no images in {where}")
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        started = last_shown = time.monotonic()
        for done, (image, problem) in enumerate(zip(images, pool.map(image_problem, images)), 1):
            _record_image(image, problem, split, report)
            if time.monotonic() - last_shown > PROGRESS_SECONDS:
                last_shown = time.monotonic()
                log.info("%s: %d/%d images checked (%.0f s)", split.name, done, len(images),
                         last_shown - started)
    _check_orphan_labels(split, images, report)


def _record_image(image: str, problem: Optional[str], split: SplitReport,
                  report: DatasetReport) -> None:
    shown = _show(Path(image), report)
    if problem:
        pillow_only = image.rpartition(".")[-1].lower() in PILLOW_ONLY_FORMATS
        (report.warnings if pillow_only else report.errors).append(f"{shown}: {problem}")
        if not pillow_only:
            return
    label = Path(img2label_path(image))
    if not label.is_file():
        split.backgrounds += 1
        split.unlabelled.append(shown)
        return
    try:
        parsed = parse_label_text(label.read_text(encoding="utf-8-sig"), report.nc)
    except (OSError, UnicodeDecodeError) as exc:
        report.errors.append(f"{_show(label, report)}: cannot read ({exc})")
        return
    label_shown = _show(label, report)
    report.errors += [f"{label_shown}:{message}" for message in parsed.errors]
    report.warnings += [f"{label_shown}:{message}" for message in parsed.warnings]
    if parsed.errors:
        return
    split.backgrounds += not parsed.boxes
    split.boxes += len(parsed.boxes)
    split.polygons += parsed.polygons
    split.class_counts.update(parsed.boxes)


def _check_orphan_labels(split: SplitReport, images: List[str], report: DatasetReport) -> None:
    expected = {os.path.normpath(img2label_path(image)) for image in images}
    orphans = []
    for source in split.sources:
        label_dir = Path(img2label_path(str(source / "x.jpg"))).parent
        if not source.is_dir() or label_dir == source or not label_dir.is_dir():
            continue
        orphans += [_show(label, report) for label in sorted(label_dir.rglob("*.txt"))
                    if os.path.normpath(label) not in expected and label.name not in NOT_LABELS]
    if orphans:
        report.warnings.append(
            f"{split.name}: {len(orphans)} label file(s) without an image, their boxes are not "
            f"used (restore the images or delete the labels): {_examples(orphans)}"
        )
    if split.unlabelled:
        report.warnings.append(
            f"{split.name}: {len(split.unlabelled)} image(s) without a label file; background "
            f"images are legal in YOLO (they teach 'nothing here'), but check that none lost "
            f"its labels: {_examples(split.unlabelled)}"
        )


def _examples(paths: Sequence[str], shown: int = 3) -> str:
    more = f", ... ({len(paths) - shown} more)" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def _show(path: Path, report: DatasetReport) -> str:
    """A path as the user knows it: relative to the yaml's folder or the dataset root."""
    resolved = Path(path).resolve()
    for base in (report.source_yaml.parent.resolve(), report.root):
        try:
            return resolved.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(path)


# ---------------------------------------------------------------------------------------------
# the check


def check_dataset(data_yaml: Path, repair: bool = True) -> DatasetReport:
    """Check the dataset of ``data_yaml``; with ``repair``, write a repaired copy when split paths
    had to be found next to the yaml (``report.data_yaml`` is then that copy).

    Raises JetyoloError only when the yaml itself is missing or malformed; everything else is in
    the report."""
    data_yaml = Path(data_yaml)
    data = load_data_yaml(data_yaml)
    errors: List[str] = []
    names = class_names(data, data_yaml, errors)
    root = dataset_root(data, data_yaml)
    report = DatasetReport(data_yaml, data_yaml, root, names, errors=errors)
    changed = resolve_splits(data, data_yaml, report)
    if changed and not repair:
        report.errors.append(f"{data_yaml.name}: split paths do not resolve (found next to it: "
                             f"{'; '.join(report.repairs)}); run without --no-repair or fix them")
    elif changed and all(report.splits[key].sources for key in ("train", "val")):
        report.data_yaml = write_repaired(data, changed, data_yaml, report)
    for split in report.splits.values():
        check_split(split, report)
    return report


def format_report(report: DatasetReport) -> List[str]:
    missing = "" if report.root.exists() else " (does not exist)"
    lines = [f"dataset: {report.source_yaml}", f"root:    {report.root}{missing}",
             f"classes: {report.nc} ({', '.join(report.names[:10])}"
             f"{', ...' if report.nc > 10 else ''})"]
    if report.repairs:
        lines.append("repaired split paths:")
        lines += [f"  {change}" for change in report.repairs]
        if report.data_yaml != report.source_yaml:
            lines.append(f"wrote {report.data_yaml} "
                         f"(train on it; {report.source_yaml.name} is unchanged)")
    lines += ["", *_count_table(report)]
    for title, problems in (("warnings", report.warnings), ("errors", report.errors)):
        if problems:
            lines += ["", f"{title} ({len(problems)}):"]
            lines += [f"  {problem}" for problem in problems[:SHOWN_PROBLEMS]]
            if len(problems) > SHOWN_PROBLEMS:
                lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")
    verdict = "OK" if report.ok else "FAILED"
    lines += ["", f"{verdict}: {len(report.errors)} errors, {len(report.warnings)} warnings"]
    return lines


def _count_table(report: DatasetReport) -> List[str]:
    splits = [split for split in report.splits.values() if split.sources]
    width = max([len(name) for name in report.names] + [11])
    header = f"{'':<{width}}" + "".join(f"{split.name:>9}" for split in splits)
    rows = [("images", [s.images for s in splits]),
            ("backgrounds", [s.backgrounds for s in splits]),
            ("boxes", [s.boxes for s in splits])]
    if any(s.polygons for s in splits):
        rows.append(("polygons", [s.polygons for s in splits]))
    rows += [(name, [s.class_counts[i] for s in splits]) for i, name in enumerate(report.names)]
    body = [f"{name:<{width}}" + "".join(f"{v:>9}" for v in values) for name, values in rows]
    return [header, *body]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="the dataset's data.yaml")
    parser.add_argument("--no-repair", action="store_true",
                        help="report unresolved split paths but write no repaired copy")


def run(args: argparse.Namespace) -> int:
    report = check_dataset(args.data, repair=not args.no_repair)
    print(report.format())
    report.raise_if_errors(listed_above=True)
    return 0
