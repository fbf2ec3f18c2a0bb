"""What tracking costs per frame: ByteTrack plus one zone and one line, at 1 and N sources.

Replays moving boxes (``objects`` per frame, 5 % missed, jittered, half of them low-confidence
in turns) through one ``SourceTracking`` per source, interleaved frame by frame the way several
cameras reach the publishing thread, and times each ``process`` call. The detector is not part
of it: the figure is what `tracker: bytetrack` adds to a frame. Wall time suffers from a busy
machine (a preempted call); the thread's CPU time (``time.thread_time``) is what the step costs.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

import numpy as np

from device.detections import Detections, FrameResult
from device.tracking import ByteTracker, TrackerSettings
from device.tracking_stage import SourceTracking
from device.zones import parse_lines, parse_zones

FRAME_SIZE = (1920, 1080)
ZONES = {"left": {"polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]], "normalized": True}}
LINES = {"mid": {"start": [0.5, 0], "end": [0.5, 1], "normalized": True}}


def moving_boxes(objects: int, frames: int, seed: int) -> List[Detections]:
    rng = np.random.default_rng(seed)
    start = rng.uniform([100, 100], [1800, 980], (objects, 2))
    speed = rng.uniform(-8, 8, (objects, 2))
    sequence = []
    for index in range(frames):
        centres = np.clip(start + speed * index, 40, [1880, 1040])
        seen = rng.random(objects) > 0.05
        boxes = np.c_[centres - 40, centres + 40][seen] + rng.normal(0, 1.5, (seen.sum(), 4))
        scores = np.where(rng.random(seen.sum()) < 0.2, 0.35, 0.9)
        order = np.argsort(-scores, kind="stable")
        sequence.append(Detections(boxes[order], scores[order], np.zeros(seen.sum())[order]))
    return sequence


def tracking_cost(sources: int, frames: int = 300, objects: int = 10,
                  warmup: int = 30) -> Dict[str, Any]:
    """Median / p90 ms of one source's tracking step, and of one frame of every source."""
    stages = [SourceTracking(ByteTracker(TrackerSettings()), f"cam{i}",
                             parse_zones(ZONES, "bench"), parse_lines(LINES, "bench"), ["obj"])
              for i in range(sources)]
    replays = [moving_boxes(objects, frames, seed) for seed in range(sources)]
    wall: List[float] = []
    cpu: List[float] = []
    cpu_rounds: List[float] = []
    for index in range(frames):
        round_cpu = 0.0
        for stage, replay in zip(stages, replays):
            result = FrameResult(stage.source, index, 1000.0 + index / 30, FRAME_SIZE,
                                 replay[index])
            started, started_cpu = time.perf_counter(), time.thread_time()
            stage.process(result)
            if index >= warmup:
                wall.append((time.perf_counter() - started) * 1000.0)
                cpu.append((time.thread_time() - started_cpu) * 1000.0)
                round_cpu += cpu[-1]
        if index >= warmup:
            cpu_rounds.append(round_cpu)
    return {
        "sources": sources,
        "objects": objects,
        "frames": frames - warmup,
        "per_source_wall_ms": _percentiles(wall),
        "per_source_cpu_ms": _percentiles(cpu),
        "all_sources_cpu_ms": _percentiles(cpu_rounds),
        "cpu_share_at_30fps": round(float(np.mean(cpu_rounds)) * 30 / 1000, 4),
    }


def _percentiles(values: Sequence[float]) -> Dict[str, float]:
    p50, p90 = np.percentile(values, [50, 90])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3)}


def tracking_costs(source_counts: Sequence[int] = (1, 4), **kwargs: Any) -> List[Dict[str, Any]]:
    return [tracking_cost(count, **kwargs) for count in source_counts]


def markdown_lines(costs: Sequence[Dict[str, Any]]) -> List[str]:
    lines = ["| sources | objects/frame | per source: wall ms p50 / p90 | per source: CPU ms "
             "p50 / p90 | all sources: CPU ms p50 / p90 | CPU at 30 FPS each |",
             "|---|---|---|---|---|---|"]
    for cost in costs:
        wall, cpu, every = (cost["per_source_wall_ms"], cost["per_source_cpu_ms"],
                            cost["all_sources_cpu_ms"])
        lines.append(f"| {cost['sources']} | {cost['objects']} | {wall['p50']} / {wall['p90']} "
                     f"| {cpu['p50']} / {cpu['p90']} | {every['p50']} / {every['p90']} | "
                     f"{cost['cpu_share_at_30fps']:.1%} of one core |")
    return lines
