"""Tracking accuracy of a `jetyolo run` against the synthetic video's identities.

``jetyolo data synth --video V.mp4`` writes ``V.json`` with every object's id and box per frame.
Run the device with ``tracker: bytetrack`` and a ``jsonl:`` sink, then this verb compares its
``track_id``s with the identities: MOTA, IDF1, ID switches (motmetrics' CLEAR-MOT and ID metrics,
IoU >= 0.5), and each configured line's crossings (from the run's ``cross`` events) against the
crossings of the true trajectories. Objects hidden by others beyond ``--min-visible`` are
"don't care": neither a miss when unseen nor a false positive when seen. The gate: IDF1 at least
``--min-idf1`` and every line count exact; below it the verb exits non-zero.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, DefaultDict, Dict, List, Optional, Sequence, Tuple

import numpy as np

from device.argtypes import finite_float
from device.config import read_config_file
from device.errors import JetyoloError
from device.files import atomic_write_json
from device.matching import box_iou
from device.tracking_config import parse_tracking
from device.zones import RegionSpec

Counts = Dict[str, Dict[str, int]]  # line -> {"in": n, "out": n}


@dataclass
class TruthFrame:
    ids: np.ndarray  # (k,) object ids
    boxes: np.ndarray  # (k, 4) x1, y1, x2, y2
    classes: np.ndarray  # (k,)
    visible: np.ndarray  # (k,) fraction not hidden


@dataclass
class Truth:
    size: Tuple[int, int]
    class_names: List[str]
    frames: Dict[int, TruthFrame]


def load_truth(path: Path) -> Truth:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        frames = {}
        for record in data["frames"]:
            boxes = np.array([b[:4] for b in record["boxes"]], np.float64).reshape(-1, 4)
            frames[int(record["index"])] = TruthFrame(
                np.array(record["ids"], np.int64), boxes,
                np.array([b[4] for b in record["boxes"]], np.int64),
                np.array(record["visible"], np.float64))
        return Truth((int(data["size"][0]), int(data["size"][1])), list(data["class_names"]),
                     frames)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise JetyoloError(f"{path}: not a `jetyolo data synth --video` ground truth with ids "
                           f"({type(exc).__name__}: {exc}); make it again with data synth") from exc


@dataclass
class Tracked:
    frames: Dict[int, Tuple[np.ndarray, np.ndarray]]  # frame index -> (track ids, boxes)
    crossings: Counts
    tracked_boxes: int  # detections that carried a track_id key


def load_results(path: Path, source: Optional[str] = None) -> Tracked:
    """Detections (with track ids) and ``cross`` events of one source from a jsonl sink file."""
    frames: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    crossings: DefaultDict[str, Dict[str, int]] = defaultdict(lambda: {"in": 0, "out": 0})
    tracked = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise JetyoloError(f"--results {path} cannot be read ({exc})") from exc
    for number, line in enumerate(lines, 1):
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise JetyoloError(f"{path}:{number}: not JSON ({exc})") from exc
        if isinstance(message, dict) and "topic" in message and "payload" in message:
            message = message["payload"]  # the jsonl sink's {"topic", "payload"} lines
        if not isinstance(message, dict) or (source and message.get("source") != source):
            continue
        if message.get("type") == "detections":
            items = message["detections"]
            tracked += sum("track_id" in d for d in items)
            kept = [d for d in items if d.get("track_id") is not None]
            frames[int(message["frame_index"])] = (
                np.array([d["track_id"] for d in kept], np.int64),
                np.array([d["box"] for d in kept], np.float64).reshape(-1, 4))
        elif message.get("type") == "event" and message.get("event") == "cross":
            crossings[message["region"]][message["direction"]] += 1
    if not frames:
        raise JetyoloError(f"--results {path} has no detections messages"
                           f"{f' of source {source!r}' if source else ''}; pass the jsonl file "
                           "of `jetyolo run --sink jsonl:PATH` (report: every)")
    if tracked == 0:
        raise JetyoloError(f"--results {path}: no detection has a track_id: the run did not "
                           "track (set `tracker: bytetrack`)")
    return Tracked(frames, dict(crossings), tracked)


def _iou_distances(truth: np.ndarray, hypotheses: np.ndarray) -> np.ndarray:
    """motmetrics' distance convention (1 - IoU, NaN: may not pair below IoU 0.5). Not
    ``mm.distances.iou_matrix``: motmetrics 1.4.0 (the latest release) calls ``np.asfarray``,
    which NumPy 2 removed; the IoU is the device's own ``box_iou``."""
    distances = 1.0 - box_iou(truth, hypotheses).astype(np.float64)
    distances[distances > 0.5] = np.nan
    return distances


def mot_metrics(truth: Truth, tracked: Tracked, min_visible: float) -> Dict[str, float]:
    """motmetrics' MOTA, IDF1, ID switches... over the frames of the truth."""
    import motmetrics as mm

    accumulator = mm.MOTAccumulator(auto_id=True)
    for index in sorted(truth.frames):
        frame = truth.frames[index]
        ids, boxes = tracked.frames.get(index, (np.zeros(0, np.int64), np.zeros((0, 4))))
        seen = frame.visible >= min_visible
        keep = _not_dont_care(boxes, frame.boxes[seen], frame.boxes[~seen])
        distances = _iou_distances(frame.boxes[seen], boxes[keep])
        accumulator.update(frame.ids[seen].tolist(), ids[keep].tolist(), distances)
    host = mm.metrics.create()
    names = ["mota", "motp", "idf1", "num_switches", "num_false_positives", "num_misses",
             "num_objects", "num_unique_objects", "mostly_tracked", "num_fragmentations"]
    summary = host.compute(accumulator, metrics=names, name="run")
    return {name: float(summary[name].iloc[0]) for name in names}


def _not_dont_care(boxes: np.ndarray, visible: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Hypotheses to score: all but those on a mostly hidden object and on no visible one."""
    keep = np.ones(len(boxes), bool)
    if len(boxes) and len(hidden):
        on_hidden = box_iou(boxes, hidden).max(axis=1) >= 0.5
        on_visible = (box_iou(boxes, visible).max(axis=1) >= 0.5 if len(visible)
                      else np.zeros(len(boxes), bool))
        keep = ~on_hidden | on_visible
    return keep


_ANCHOR_FRACTIONS = {  # (x, y) position inside the box, 0 = left/top, 1 = right/bottom
    "center": (0.5, 0.5), "center_left": (0.0, 0.5), "center_right": (1.0, 0.5),
    "top_center": (0.5, 0.0), "top_left": (0.0, 0.0), "top_right": (1.0, 0.0),
    "bottom_left": (0.0, 1.0), "bottom_center": (0.5, 1.0), "bottom_right": (1.0, 1.0),
}


def truth_crossings(truth: Truth, lines: Sequence[RegionSpec]) -> Counts:
    """Crossings of the true trajectories: the anchor changes side of the segment while
    between its ends (``in``: onto the left-hand side walking start -> end, as device.zones)."""
    counts: Counts = {}
    width, height = truth.size
    for spec in lines:
        points = np.array(spec.points, np.float64)
        if spec.normalized:
            points = points * np.array([width, height])
        wanted = {truth.class_names.index(c) for c in spec.classes if c in truth.class_names}
        counts[spec.name] = _count_line(truth, points[0], points[1], spec.anchor, wanted)
    return counts


def _count_line(truth: Truth, start: np.ndarray, end: np.ndarray, anchor: str,
                wanted: set) -> Dict[str, int]:
    along = end - start
    fx, fy = _ANCHOR_FRACTIONS[anchor]
    last_side: Dict[int, bool] = {}
    result = {"in": 0, "out": 0}
    for index in sorted(truth.frames):
        frame = truth.frames[index]
        for obj, box, cls in zip(frame.ids.tolist(), frame.boxes, frame.classes.tolist()):
            if wanted and cls not in wanted:
                continue
            point = np.array([box[0] + fx * (box[2] - box[0]), box[1] + fy * (box[3] - box[1])])
            offset = point - start
            position = float(np.dot(offset, along) / np.dot(along, along))
            side_value = float(along[0] * offset[1] - along[1] * offset[0])
            if not 0.0 < position < 1.0 or side_value == 0.0:
                continue
            on_in_side = side_value < 0  # image y points down: negative is the left-hand side
            previous = last_side.setdefault(obj, on_in_side)
            if previous != on_in_side:
                result["in" if on_in_side else "out"] += 1
                last_side[obj] = on_in_side
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truth", type=Path, required=True,
                        help="ground truth of `data synth --video` (VIDEO.json)")
    parser.add_argument("--results", type=Path, required=True,
                        help="jsonl file of `jetyolo run --sink jsonl:PATH` with tracking on")
    parser.add_argument("--config", type=Path,
                        help="the run's config file: its `tracking: lines` are counted in the "
                             "truth too")
    parser.add_argument("--source", help="source name in the results (default: every message)")
    parser.add_argument("--min-visible", type=finite_float, default=0.3,
                        help="objects less visible than this are don't-care (default 0.3)")
    parser.add_argument("--min-idf1", type=finite_float, default=0.9, help="gate (default 0.9)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--no-gate", action="store_true",
                        help="report the figures and exit 0 below the targets too (the demo)")


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    if not 0.0 <= args.min_visible <= 1.0 or not 0.0 <= args.min_idf1 <= 1.0:
        raise JetyoloError("--min-visible and --min-idf1 must be within 0..1")
    truth = load_truth(args.truth)
    tracked = load_results(args.results, args.source)
    lines: Sequence[RegionSpec] = ()
    if args.config:
        tracking = read_config_file(args.config).get("tracking") or {}
        lines = parse_tracking(tracking, str(args.config)).lines
    metrics = mot_metrics(truth, tracked, args.min_visible)
    expected = truth_crossings(truth, lines)
    counted = {name: tracked.crossings.get(name, {"in": 0, "out": 0}) for name in expected}
    return {"metrics": metrics, "lines": {"truth": expected, "counted": counted}}


def _gate_failures(report: Dict[str, Any], min_idf1: float) -> List[str]:
    failures = []
    if report["metrics"]["idf1"] < min_idf1:
        failures.append(f"IDF1 {report['metrics']['idf1']:.3f} < {min_idf1}")
    lines = report["lines"]
    for name, truth in lines["truth"].items():
        if lines["counted"][name] != truth:
            failures.append(f"line {name}: counted {lines['counted'][name]}, truth {truth}")
    return failures


def run(args: argparse.Namespace) -> int:
    report = evaluate(args)
    metrics = report["metrics"]
    print(f"tracking: MOTA {metrics['mota']:.3f}  IDF1 {metrics['idf1']:.3f}  "
          f"ID switches {int(metrics['num_switches'])}  misses {int(metrics['num_misses'])}  "
          f"false positives {int(metrics['num_false_positives'])}  "
          f"({int(metrics['num_unique_objects'])} objects, {int(metrics['num_objects'])} boxes)")
    for name, truth in report["lines"]["truth"].items():
        counted = report["lines"]["counted"][name]
        print(f"line {name}: counted in {counted['in']} out {counted['out']}, "
              f"truth in {truth['in']} out {truth['out']}")
    if args.json:
        atomic_write_json(args.json, report)
    failures = _gate_failures(report, args.min_idf1)
    if failures and args.no_gate:
        print("below target (not gated): " + "; ".join(failures))
    elif failures:
        raise JetyoloError("tracking below target: " + "; ".join(failures))
    return 0
