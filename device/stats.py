"""Per-stage latency statistics and the run summary (frames, seconds, FPS, p50/p90/p99).

``StageStats`` keeps the most recent samples of each stage in a fixed-size ring (a service runs
for months; memory stays flat) plus whole-run counts. ``RunSummary`` is what ``Pipeline.run``
returns and what ``jetyolo run`` / ``jetyolo bench`` print.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

STAGES = ("capture", "preprocess", "infer", "postprocess", "total")
PERCENTILES = (50, 90, 99)
DEFAULT_WINDOW = 10_000


class StageStats:
    """Latency samples (ms) per stage, thread-safe, bounded to the last ``window`` frames."""

    def __init__(self, stages: Sequence[str] = STAGES, window: int = DEFAULT_WINDOW) -> None:
        self.stages = tuple(stages)
        self.window = window
        self._samples = np.full((window, len(self.stages)), np.nan, dtype=np.float64)
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def record(self, latency_ms: Dict[str, float]) -> None:
        row = [float(latency_ms.get(stage, np.nan)) for stage in self.stages]
        with self._lock:
            self._samples[self._count % self.window] = row
            self._count += 1

    def percentiles(self, last: Optional[int] = None) -> Dict[str, Dict[str, float]]:
        """``{stage: {"p50": ms, "p90": ms, "p99": ms}}`` over the window or the ``last`` frames."""
        with self._lock:
            held = min(self._count, self.window)
            if last is not None:
                held = min(held, last)
            end = self._count % self.window
            rows = np.roll(self._samples, -end, axis=0)[self.window - held :] if held else None
        result: Dict[str, Dict[str, float]] = {}
        for column, stage in enumerate(self.stages):
            values = rows[:, column] if rows is not None else np.zeros(0)
            values = values[np.isfinite(values)]
            if len(values) == 0:
                continue
            quantiles = np.percentile(values, PERCENTILES)
            result[stage] = {f"p{p}": round(float(q), 3) for p, q in zip(PERCENTILES, quantiles)}
        return result


class RateMeter:
    """Frames per second over the interval since the last ``tick``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last_time = clock()
        self._last_frames = 0

    def tick(self, frames: int) -> float:
        now = self.clock()
        elapsed = now - self._last_time
        fps = (frames - self._last_frames) / elapsed if elapsed > 0 else 0.0
        self._last_time, self._last_frames = now, frames
        return fps


@dataclass
class RunSummary:
    """What one run of the pipeline did; ``fps`` is frames over the seconds from the first
    capture to the last published result (model loading and engine builds excluded)."""

    frames: int
    seconds: float
    fps: float
    latency_ms: Dict[str, Dict[str, float]] = field(default_factory=dict)
    dropped: int = 0  # live frames dropped because the pipeline was behind
    decode_errors: int = 0  # corrupt frames skipped
    reconnects: int = 0
    backend: str = ""
    source: str = ""
    stopped_by: str = "end of source"  # or "max frames", "signal SIGTERM", ...
    batch_size: int = 1  # frames per inference call at most
    # several sources: per source name, frames and capture -> publish ms {"p50", "p99"}
    sources: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return {
            "frames": self.frames, "seconds": round(self.seconds, 3), "fps": round(self.fps, 2),
            "latency_ms": self.latency_ms, "dropped": self.dropped,
            "decode_errors": self.decode_errors, "reconnects": self.reconnects,
            "backend": self.backend, "source": self.source, "stopped_by": self.stopped_by,
            "batch_size": self.batch_size, **({"sources": self.sources} if self.sources else {}),
        }

    def format_lines(self) -> List[str]:
        """The FPS line, one line per stage, and the counters."""
        lines = [f"frames {self.frames}, seconds {self.seconds:.2f}, FPS {self.fps:.1f}"]
        for stage, values in self.latency_ms.items():
            figures = "  ".join(f"{name} {value:7.2f}" for name, value in values.items())
            lines.append(f"  {stage:<12} ms  {figures}")
        lines.append(
            f"  dropped {self.dropped}, decode errors {self.decode_errors}, "
            f"reconnects {self.reconnects}; backend {self.backend}; stopped by {self.stopped_by}"
        )
        if self.batch_size > 1:
            lines.append(f"  batch size {self.batch_size}")
        for source, counts in self.sources.items():
            latency: Dict[str, float] = counts.get("latency_ms") or {}
            shown = "  ".join(f"{name} {value:.1f}" for name, value in latency.items())
            lines.append(f"  source {source}: {counts.get('frames', 0)} frames, total ms {shown}")
        return lines
