"""`jetyolo eval track`: motmetrics' IDF1/MOTA and line counts of tracked runs vs the synthetic
video's identities; the gate fails when tracking is off or its ids are shuffled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest

from device.cli import main
from device.detections import Detections, FrameResult
from device.events import build_event_message
from device.message import build_frame_message, encode
from device.sinks import SinkOptions
from device.tracking import ByteTracker, TrackerSettings
from device.tracking_stage import SourceTracking
from device.zones import parse_lines
from host.synth import make_video

LINES = {"mid": {"start": [0.5, 0.0], "end": [0.5, 1.0], "normalized": True}}
Detector = Callable[[int, Dict], Detections]


@pytest.fixture(scope="module")
def truth_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    video = make_video(tmp_path_factory.mktemp("clip") / "v.mp4", 4, (480, 270), 120, seed=42)
    return video.with_suffix(".json")


@pytest.fixture(scope="module")
def config_path(truth_path: Path) -> Path:
    path = truth_path.with_name("run.yaml")
    path.write_text(json.dumps({"tracking": {"lines": LINES}}))  # JSON is YAML
    return path


def noisy_detector(seed: int = 0) -> Detector:
    """What a good detector sees: the true boxes, jittered; mostly hidden objects missed."""
    rng = np.random.default_rng(seed)

    def detect(_index: int, record: Dict) -> Detections:
        boxes = np.array([b[:4] for b in record["boxes"]], np.float32)
        seen = np.array(record["visible"]) >= 0.4
        jitter = rng.normal(0, 1.5, boxes.shape).astype(np.float32)
        return Detections(boxes[seen] + jitter[seen], np.full(seen.sum(), 0.9),
                          np.array([b[4] for b in record["boxes"]])[seen])

    return detect


def write_run(truth_path: Path, out: Path, detect: Detector, shuffle: bool = False,
              track: bool = True) -> Path:
    """A jsonl sink file as `jetyolo run` with tracking writes it."""
    truth = json.loads(truth_path.read_text())
    options = SinkOptions(device_id="t", class_names=truth["class_names"], spool_dir=out.parent)
    stage = SourceTracking(ByteTracker(TrackerSettings()), "cam",
                           lines=parse_lines(LINES, "test"), class_names=truth["class_names"])
    rng = np.random.default_rng(1)
    lines: List[bytes] = []
    for record in truth["frames"]:
        result = FrameResult("cam", record["index"], 1000.0 + record["index"] / 30,
                             tuple(truth["size"]), detect(record["index"], record))
        if track:
            tracked = stage.process(result)
            result = tracked.result
            for event in tracked.events:
                message = build_event_message(event, result, 1, options)
                lines.append(encode(message))
        if shuffle and result.detections.track_id is not None:
            ids = result.detections.track_id
            result.detections.track_id = rng.permutation(ids) if len(ids) > 1 else ids + 100
        lines.append(encode(build_frame_message(result, 1, options)))
    out.write_bytes(b"\n".join(lines) + b"\n")
    return out


def eval_track(truth: Path, results: Path, config: Path, report: Path) -> int:
    return main(["eval", "track", "--truth", str(truth), "--results", str(results),
                 "--config", str(config), "--json", str(report)])


def test_tracked_run_meets_the_targets(truth_path: Path, config_path: Path,
                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = write_run(truth_path, tmp_path / "run.jsonl", noisy_detector())
    assert eval_track(truth_path, results, config_path, tmp_path / "r.json") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    truth_counts = report["lines"]["truth"]["mid"]
    assert truth_counts["in"] + truth_counts["out"] >= 2  # the clip really crosses the line
    assert report["lines"]["counted"]["mid"] == truth_counts
    assert report["metrics"]["idf1"] >= 0.9 and report["metrics"]["num_switches"] <= 2
    assert "IDF1" in capsys.readouterr().out


def test_shuffled_ids_fail_the_gate(truth_path: Path, config_path: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    results = write_run(truth_path, tmp_path / "run.jsonl", noisy_detector(), shuffle=True)
    assert eval_track(truth_path, results, config_path, tmp_path / "r.json") == 2
    assert "tracking below target: IDF1" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["idf1"] < 0.9


def test_a_run_without_tracking_is_one_clear_line(truth_path: Path, config_path: Path,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    results = write_run(truth_path, tmp_path / "run.jsonl", noisy_detector(), track=False)
    assert eval_track(truth_path, results, config_path, tmp_path / "r.json") == 2
    err = capsys.readouterr().err
    assert "no detection has a track_id" in err and err.count("\n") == 1


def test_truth_without_ids_is_refused(tmp_path: Path, config_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"size": [10, 10], "class_names": [], "frames": [
        {"index": 0, "boxes": [], "visible": []}]}))
    assert eval_track(old, old, config_path, tmp_path / "r.json") == 2
    assert "ground truth with ids" in capsys.readouterr().err
