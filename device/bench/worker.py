"""Measurement children of ``jetyolo bench`` that need only the device runtime.

``jetyolo bench`` (host/bench/) starts one fresh process per measurement, so peak RSS and cold
start belong to one contender each. This module imports only device code (never torch,
ultralytics or host), so its RSS and start-up time are what a Jetson process pays::

    python -m device.bench.worker ceiling  --bundle B --source V --frames N --result R.json
    python -m device.bench.worker pipeline --bundle B --source V --frames N --result R.json

- ``ceiling``: the raw backend call on one prepared input (the first video frame, letterboxed
  once), nothing else: ``backend.infer`` with preallocated outputs, i.e. ORT
  ``run_with_iobinding`` on the CPU with the pipeline's own session settings (spinning off:
  a spinning ceiling swung the pipeline/ceiling ratio from 0.71 to 2.4 with machine load),
  TensorRT ``execute_async_v3`` plus its copies on a Jetson.
- ``pipeline``: ``device.setup.run_configured`` (what ``jetyolo run`` calls) over the video with
  a JSONL sink; ``--source`` repeated (with ``--name``s) runs several sources in one pipeline
  (``jetyolo bench --sources``). Besides the stage latencies it records, per source, each
  result's wall time (comparable across processes) and capture -> publish milliseconds from
  the frame's own capture timestamp (the source's read, before any queue).

The parent passes ``JETYOLO_BENCH_T0`` (its ``time.time()`` just before starting the child), so
cold start is process start -> first result, interpreter start-up and imports included.
Pre+post CPU time is ``time.thread_time`` summed around the preprocess and postprocess calls:
the pipeline records it itself (``Pipeline.stage_times``), the same measure the ultralytics child
takes around its predictor's stages.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import pstats
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional

from device.bench.common import start_time

T0 = start_time()

import numpy as np  # noqa: E402 - everything below counts as import time (IMPORTS_DONE - T0)

from device.backends.base import Backend, InferTiming  # noqa: E402
from device.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from device.bench.common import (  # noqa: E402
    common_result,
    process_cpu_s,
    run_worker,
    stage_cpu_ms,
    steady_cpu_ms_per_frame,
    steady_fps,
    steady_seconds,
    write_result,
)
from device.bundle import Bundle  # noqa: E402
from device.config import RunConfig, config_from_mapping  # noqa: E402
from device.detections import FrameResult  # noqa: E402
from device.errors import JetyoloError  # noqa: E402
from device.pipeline import Pipeline, StageTime  # noqa: E402
from device.preprocess import FRAME_INPUT, FrameCopier, Preprocessor  # noqa: E402
from device.setup import open_configured_backend, run_configured  # noqa: E402
from device.sources import open_source  # noqa: E402

IMPORTS_DONE = time.time()
WARMUP_CALLS = 3  # ceiling: calls after the first (cold) one and before timing
PROFILE_TOP = 15


class RecordingSinks:
    """Passes frames on to the real sinks and records when each result came out."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.first_result_wall: Optional[float] = None
        self.result_times: List[float] = []
        self.result_cpu: List[float] = []  # process CPU seconds at each result
        # per source, time.time() of each result: comparable across processes
        self.result_walls: Dict[str, List[float]] = {}
        self.latencies: List[Dict[str, float]] = []
        # per source: capture (the source's own read time, before any queue) -> published
        self.capture_to_publish_ms: Dict[str, List[float]] = {}
        self.detections = 0

    def publish_frame(self, result: FrameResult) -> Any:
        now, wall = time.perf_counter(), time.time()
        if self.first_result_wall is None:
            self.first_result_wall = wall
        self.result_times.append(now)
        self.result_cpu.append(process_cpu_s())
        self.result_walls.setdefault(result.source, []).append(round(wall, 4))
        self.latencies.append(dict(result.latency_ms))
        self.capture_to_publish_ms.setdefault(result.source, []).append(
            round((wall - result.timestamp) * 1000.0, 3))
        self.detections += len(result.detections)
        return self.inner.publish_frame(result)

    def publish_stats(self, stats: Dict[str, Any]) -> Any:
        return self.inner.publish_stats(stats)


class ThreadProfiles:
    """cProfile in every thread started while active (CPU time per thread, not wall time)."""

    def __init__(self) -> None:
        self.profiles: Dict[str, cProfile.Profile] = {}
        self._lock = threading.Lock()

    def _start_in_thread(self, *_: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        with self._lock:
            self.profiles[threading.current_thread().name] = profile
        profile.enable()  # replaces this hook for the thread

    def __enter__(self) -> ThreadProfiles:
        threading.setprofile(self._start_in_thread)
        main = cProfile.Profile(time.thread_time)
        self.profiles[threading.current_thread().name] = main
        main.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        threading.setprofile(None)
        self.profiles[threading.current_thread().name].disable()

    def summary(self, frames: int) -> Dict[str, Any]:
        """CPU ms per frame by thread, and the functions that spend most of it (own time)."""
        frames = max(frames, 1)
        by_thread: Dict[str, float] = {}
        merged: Optional[pstats.Stats] = None
        for name, profile in self.profiles.items():
            stats = pstats.Stats(profile)
            by_thread[name] = round(stats.total_tt * 1000.0 / frames, 3)  # type: ignore[attr-defined]
            if merged is None:
                merged = stats
            else:
                merged.add(stats)
        top: List[Dict[str, Any]] = []
        if merged is not None:
            entries = merged.stats.items()  # type: ignore[attr-defined]
            ranked = sorted(entries, key=lambda item: item[1][2], reverse=True)[:PROFILE_TOP]
            for (filename, line, function), (_, calls, own, cumulative, _) in ranked:
                top.append({
                    "function": f"{function} ({_short(filename)}:{line})",
                    "calls": calls,
                    "own_ms_per_frame": round(own * 1000.0 / frames, 3),
                    "cumulative_ms_per_frame": round(cumulative * 1000.0 / frames, 3),
                })
        return {"cpu_ms_per_frame_by_thread": by_thread, "top_functions": top}


def _short(filename: str) -> str:
    parts = Path(filename).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else filename


def first_frame(source: str) -> np.ndarray:
    """The first decodable frame of ``source``: the ceiling's prepared input."""
    opened = open_source(source)
    try:
        frame = next(opened.frames(threading.Event()), None)
    finally:
        opened.close()
    if frame is None:
        raise JetyoloError(f"--source {source}: no frame could be read; check the video file")
    return frame.image


def decode_cpu_ms_per_frame(source: str, frames: int) -> Optional[float]:
    """Process CPU ms per frame to read (decode) ``frames`` frames of ``source`` and nothing else
    (FFmpeg's own decode threads included): the pipeline's capture cost on these cores."""
    opened = open_source(source)
    read = 0
    try:
        cpu_before = process_cpu_s()
        for _ in zip(range(frames), opened.frames(threading.Event())):
            read += 1
        cpu_s = process_cpu_s() - cpu_before
    finally:
        opened.close()
    return cpu_s * 1000.0 / read if read else None


def measure_ceiling(config: RunConfig, frames: int) -> Dict[str, Any]:
    bundle = Bundle.load(config.bundle)
    image = first_frame(config.source)
    backend = open_configured_backend(config, bundle, lambda: (image.shape[1], image.shape[0]))
    with backend:
        spec = backend.input_spec
        buffer = backend.input_buffer
        preprocess = FrameCopier(bundle.input_size, buffer) if spec.name == FRAME_INPUT \
            else Preprocessor(bundle.input_size, spec.dtype.name, buffer=buffer)
        preprocess(image)
        # one input and one set of outputs per call in flight, as the pipeline's seats
        feeds = [{spec.name: buffer if seat == 0 else buffer.copy()}
                 for seat in range(backend.concurrency)]
        outputs = [backend.allocate_outputs() for _ in feeds]
        backend.infer(feeds[0], out=outputs[0])
        cold_start = time.time() - T0
        for _ in range(WARMUP_CALLS):
            backend.infer(feeds[0], out=outputs[0])
        cpu_before = process_cpu_s()
        started = time.perf_counter()
        samples = calls_in_flight(backend, feeds, outputs, frames)
        seconds = time.perf_counter() - started
        cpu_s = process_cpu_s() - cpu_before
    result = common_result("ceiling", frames, seconds, cpu_s * 1000.0 / max(frames, 1),
                           IMPORTS_DONE - T0)
    result.update(
        cold_start_s=cold_start,
        samples_ms={"infer": samples.round(3).tolist()},
        prepost_cpu_ms_per_frame=None,
        backend=backend.kind,
        graph=backend.name,
        backend_name=backend.name,
        plan_path=str(getattr(backend, "plan_path", "") or ""),
        ort_spinning=getattr(backend, "spin", None),
        threading=threading_label(backend),
    )
    # after the figures above (peak RSS included): the decode is the pipeline's, not the call's
    result["decode_cpu_ms_per_frame"] = decode_cpu_ms_per_frame(config.source, frames)
    return result


def infer_cpu_ms_per_frame(backend: Backend, stage: StageTime, frames: int) -> Optional[float]:
    """The pipeline's inference CPU per frame, from the thread CPU time around each call; None
    where that misses threads of the call (an ONNX Runtime session with its own thread pool)."""
    if isinstance(backend, OnnxRuntimeBackend) and backend.intra_op_threads() != 1:
        return None
    return stage.cpu_s * 1000.0 / frames if frames else None


def threading_label(backend: Backend) -> Optional[str]:
    """How an ONNX Runtime backend runs its calls ("2 at once x 1 thread"); None otherwise."""
    if not isinstance(backend, OnnxRuntimeBackend):
        return None
    threads = backend.intra_op_threads() or "ORT default"
    return f"{backend.concurrency} at once x {threads} thread(s)"


def calls_in_flight(backend: Backend, feeds: List[Dict[str, np.ndarray]],
                    outputs: List[Dict[str, np.ndarray]], frames: int) -> np.ndarray:
    """``frames`` calls with ``len(feeds)`` in flight (the backend's ``concurrency``: the
    pipeline's own session settings, e.g. two 1-thread ONNX Runtime calls at once on 2 cores);
    each call's wall milliseconds."""
    pending: Deque[Future[InferTiming]] = collections.deque()
    samples: List[float] = []
    for index in range(frames):
        if len(pending) == len(feeds):
            samples.append(pending.popleft().result().wall_s * 1000.0)
        seat = index % len(feeds)  # its previous call has finished: it left ``pending``
        pending.append(backend.submit(feeds[seat], outputs[seat]))
    samples.extend(future.result().wall_s * 1000.0 for future in pending)
    return np.asarray(samples, dtype=np.float64)


def measure_pipeline(config: RunConfig, frames: int, profile: bool) -> Dict[str, Any]:
    recorders: List[RecordingSinks] = []
    pipelines: List[Pipeline] = []

    def record(sinks: Any) -> RecordingSinks:
        recorders.append(RecordingSinks(sinks))
        return recorders[0]

    def keep(pipeline: Pipeline, *_: Any) -> None:
        pipelines.append(pipeline)

    profiles = ThreadProfiles() if profile else None
    with profiles if profiles is not None else contextlib.nullcontext():
        summary = run_configured(config, wrap_sinks=record, extensions=[keep],
                                 max_frames=frames)
    recorder = recorders[0]
    done = len(recorder.result_times)
    seconds = steady_seconds(recorder.result_times)
    times = pipelines[0].stage_times()
    stage_cpu = stage_cpu_ms(times["preprocess"].cpu_s, times["postprocess"].cpu_s, done)
    result = common_result("pipeline", done, seconds,
                           steady_cpu_ms_per_frame(recorder.result_cpu), IMPORTS_DONE - T0)
    result.update(
        fps=steady_fps(recorder.result_times),
        cold_start_s=(recorder.first_result_wall or time.time()) - T0,
        samples_ms=_columns(recorder.latencies),
        result_walls=recorder.result_walls,
        capture_to_publish_ms=recorder.capture_to_publish_ms,
        prepost_cpu_ms_per_frame=stage_cpu["prepost"],
        stage_cpu_ms_per_frame=stage_cpu,
        detections=recorder.detections,
        run_summary=summary.as_dict(),
        backend=summary.backend,
        graph=pipelines[0].backend.name,
        threading=threading_label(pipelines[0].backend),
        infer_cpu_ms_per_frame=infer_cpu_ms_per_frame(pipelines[0].backend, times["infer"],
                                                      done),
    )
    if profiles is not None:
        result["profile"] = profiles.summary(done)
    return result


def _columns(rows: List[Dict[str, float]]) -> Dict[str, List[float]]:
    stages: Dict[str, List[float]] = {}
    for row in rows:
        for stage, value in row.items():
            stages.setdefault(stage, []).append(round(float(value), 3))
    return stages


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m device.bench.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("contender", choices=("ceiling", "pipeline"))
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--source", required=True, action="append",
                        help="video file or stream URL; repeated: several sources in one "
                             "process (pipeline only)")
    parser.add_argument("--name", action="append", default=[],
                        help="the sources' names, in --source order (default: from the source)")
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--work", type=Path, required=True, help="folder for the sink and spool")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--infer-workers", type=int)
    parser.add_argument("--batch-size", type=int, help="frames per inference call (pipeline)")
    parser.add_argument("--precision")
    parser.add_argument("--variant")
    parser.add_argument("--int8-from")
    parser.add_argument("--engine-cache-dir")
    parser.add_argument("--decode-scale")
    parser.add_argument("--profile", action="store_true", help="cProfile every thread")
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace) -> RunConfig:
    values = {
        "bundle": args.bundle, **source_values(args.source, args.name), "backend": args.backend,
        "threads": args.threads, "infer_workers": args.infer_workers,
        "batch_size": args.batch_size, "precision": args.precision, "variant": args.variant,
        "int8_from": args.int8_from, "engine_cache_dir": args.engine_cache_dir,
        "decode_scale": args.decode_scale,
        "sinks": [f"jsonl:{args.work / 'detections.jsonl'}"],
        "spool_dir": str(args.work / "spool"), "stats_interval_s": 3600.0,
        # ultralytics' predict does not track: compare like with like (tracking's own cost is
        # the bench's "tracking" section, device/bench/tracking.py)
        "tracker": "none",
    }
    return config_from_mapping({k: v for k, v in values.items() if v is not None}, "bench")


def source_values(sources: List[str], names: List[str]) -> Dict[str, Any]:
    """The config's ``source`` (+ ``source_name``) for one source, ``sources`` for several."""
    if names and len(names) != len(sources):
        raise JetyoloError(f"--name given {len(names)} times for {len(sources)} --source")
    if len(sources) == 1:
        return {"source": sources[0], "source_name": names[0] if names else None}
    return {"sources": [{"source": source, **({"name": names[index]} if names else {})}
                        for index, source in enumerate(sources)]}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.contender == "ceiling" and len(args.source) > 1:
        raise JetyoloError("the ceiling reads one --source")
    if args.frames < 1:
        raise JetyoloError(f"--frames must be at least 1, got {args.frames}")
    args.work.mkdir(parents=True, exist_ok=True)
    config = run_config(args)
    if args.contender == "ceiling":
        result = measure_ceiling(config, args.frames)
    else:
        result = measure_pipeline(config, args.frames, args.profile)
    return write_result(args.result, args.contender, result, args.threads)


if __name__ == "__main__":
    run_worker(main)
