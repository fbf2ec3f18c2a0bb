"""Stdlib-only measuring helpers shared by the ``jetyolo bench`` children.

Kept free of numpy, OpenCV and the runtime so that importing it costs the ultralytics child
nothing: each child's peak RSS and cold start must be its own.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

T0_ENV = "JETYOLO_BENCH_T0"  # the parent's time.time() just before it started the child
HEAVY_PACKAGES = ("torch", "torchvision", "ultralytics", "onnx", "onnx_graphsurgeon", "host")


def start_time() -> float:
    """When the parent started this process (now, when run by hand)."""
    return float(os.environ.get(T0_ENV, time.time()))


def peak_rss_mib() -> float:
    """Peak resident set size of this process: ``VmHWM`` of /proc/self/status (KiB), else
    ru_maxrss (KiB on Linux). ru_maxrss is not this program's own: exec keeps the high-water
    mark of the image it replaced: a pipeline child started from pytest (torch loaded) reported
    934 MiB by ru_maxrss, 172 MiB by VmHWM."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def process_cpu_s() -> float:
    """User + system CPU seconds of every thread of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuTimer:
    """Thread CPU seconds spent inside the wrapped calls, summed over every thread."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._lock = threading.Lock()

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.thread_time() - started
                with self._lock:
                    self.seconds += spent
                    self.calls += 1

        return timed


def stage_cpu_ms(pre_s: float, post_s: float, frames: int) -> Dict[str, float]:
    """Pre, post and pre+post CPU milliseconds per frame, from CPU seconds summed over a run."""
    per_frame = 1000.0 / max(frames, 1)
    return {
        "preprocess": pre_s * per_frame,
        "postprocess": post_s * per_frame,
        "prepost": (pre_s + post_s) * per_frame,
    }


def steady_seconds(result_times: List[float]) -> float:
    """Seconds from the first result to the last: start-up is in cold start, not here."""
    return result_times[-1] - result_times[0] if len(result_times) > 1 else 0.0


def steady_fps(result_times: List[float]) -> float:
    """Results per second after the first one, ``(n - 1) / (t_last - t_first)``."""
    seconds = steady_seconds(result_times)
    return (len(result_times) - 1) / seconds if seconds > 0 else 0.0


def steady_cpu_ms_per_frame(cpu_at_results: List[float]) -> Optional[float]:
    """Process CPU ms per result after the first, as ``steady_fps`` counts: model loading, the
    bundle's checks and the first call are start-up (cold start), not per-frame cost."""
    if len(cpu_at_results) < 2:
        return None
    return (cpu_at_results[-1] - cpu_at_results[0]) * 1000.0 / (len(cpu_at_results) - 1)


def common_result(
    contender: str, frames: int, seconds: float, cpu_ms_per_frame: Optional[float],
    import_s: float,
) -> Dict[str, Any]:
    """The fields every child reports; ``fps`` is frames / seconds unless a child overrides it.
    ``cpu_ms_per_frame``: process CPU over the measured frames (``steady_cpu_ms_per_frame`` for
    a streaming contender), None when there is no interval to divide."""
    return {
        "contender": contender,
        "frames": frames,
        "seconds": seconds,
        "fps": frames / seconds if seconds > 0 else 0.0,
        "process_cpu_ms_per_frame": cpu_ms_per_frame,
        "peak_rss_mib": peak_rss_mib(),
        "import_s": import_s,
        "pid": os.getpid(),
    }


def heavy_modules_loaded() -> List[str]:
    """Packages a device process must not load (their RSS would not be the runtime's)."""
    return sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY_PACKAGES))


def write_result(path: Any, contender: str, result: Dict[str, Any],
                 threads: Optional[int]) -> int:
    """Finish a worker: record threads and heavy modules, write ``result`` as JSON, say so."""
    from device.files import atomic_write_json

    result["threads"] = threads
    result["heavy_modules_loaded"] = heavy_modules_loaded()
    atomic_write_json(path, result)
    print(f"{contender}: {result['frames']} frames, {result['fps']:.1f} FPS", file=sys.stderr)
    return 0


def run_worker(main: Callable[[], int]) -> None:
    """A worker's ``__main__``: a user error is one line and exit 2, as in the CLI."""
    from device.errors import JetyoloError

    try:
        code = main()
    except JetyoloError as error:
        print(f"jetyolo bench worker: error: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)
