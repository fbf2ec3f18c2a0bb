"""What batching gives ONNX Runtime on the CPU: ``jetyolo bench B1 B2 B4 --ort-batch``.

Each BUNDLE is one batch size (``jetyolo export --batch N``: ``Bundle.max_batch``, dim 0 of the
fp32 input in the manifest). For every thread count (``--threads``, default 1 and all cores) the
raw session (jetyolo's own ONNX Runtime backend: the pipeline's session options, outputs bound to
preallocated arrays, one worker) runs ``--frames`` calls on one prepared batch, the bundles
alternating within each run; the figure is the median over runs of milliseconds per image
(call time / batch) and its ratio to batch 1. A convolutional network's cost does not depend on
the pixel values, so the input is one fixed random batch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from device.backends.onnxruntime import OnnxRuntimeBackend
from device.bundle import Bundle
from device.errors import JetyoloError
from device.files import atomic_write_json
from host.bench import report as bench_report
from host.bench.http import load_average as uptime

WARMUP_CALLS = 3
DEFAULT_CALLS = 40

# What batching is expected to give on TensorRT, with its source (issue 12 asks for both).
TENSORRT_EXPECTATION = (
    "On TensorRT, NVIDIA's YOLOv7 640 sample on a Jetson AGX Orin (MAXN) measured trtexec "
    "126 FPS at batch 1 vs 162 FPS at batch 16 in FP16 (1.29x per image) and 180 vs 264 in INT8 "
    "(1.47x); end to end in deepstream-app 124 vs 145 (FP16, 1.17x) and 175 vs 264 (INT8, "
    "1.5x) (NVIDIA-AI-IOT/yolo_deepstream README, Performance; yolov7_qat/README.md: 140 vs 168 "
    "FP16, 207 vs 264 INT8 with CUDA graphs). TensorRT's performance guide calls batching "
    "\"the most important optimization\": per-layer overhead is paid once per batch and small "
    "batches leave the smallest dimension limiting (docs.nvidia.com/deeplearning/tensorrt, "
    "Optimizing TensorRT Performance, Batching). Those are larger GPUs and a larger model than "
    "YOLO11n on an Orin Nano; the gain there is to be measured with `jetyolo bench` on the "
    "device (`--backend tensorrt`), not assumed."
)


def open_session(bundle: Bundle, threads: int) -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend(bundle.model_path("fp32"), threads=threads,
                                 max_batch=bundle.max_batch())
    return backend.activate()  # type: ignore[return-value]


def time_calls(backend: OnnxRuntimeBackend, calls: int) -> float:
    """Seconds per call on one prepared batch, after warm-up."""
    spec = backend.input_spec
    feed = {spec.name: np.random.default_rng(0).random(spec.shape).astype(spec.dtype)}
    outputs = backend.allocate_outputs()
    for _ in range(WARMUP_CALLS):
        backend.infer(feed, out=outputs)
    started = time.perf_counter()
    for _ in range(calls):
        backend.infer(feed, out=outputs)
    return (time.perf_counter() - started) / calls


def per_image_rows(samples: Dict[int, Dict[int, List[float]]]) -> List[Dict[str, Any]]:
    """``samples[threads][batch]``: ms per image of each run -> one row per (threads, batch)
    with the median and its speed-up over batch 1 at the same thread count (None without a
    batch-1 bundle)."""
    rows = []
    for threads, by_batch in sorted(samples.items()):
        single = statistics.median(by_batch[1]) if 1 in by_batch else None
        for batch, values in sorted(by_batch.items()):
            median = statistics.median(values)
            rows.append({"threads": threads, "batch": batch, "ms_per_image": median,
                         "runs_ms": [round(v, 2) for v in values],
                         "speedup_vs_batch1": single / median if single else None})
    return rows


def measure(bundles: Sequence[Bundle], thread_counts: Sequence[int], runs: int, calls: int,
            progress: Callable[[str], None]) -> List[Dict[str, Any]]:
    samples: Dict[int, Dict[int, List[float]]] = {}
    for threads in thread_counts:
        sessions = {bundle.max_batch(): open_session(bundle, threads) for bundle in bundles}
        try:
            for run_index in range(runs):
                for batch, backend in sessions.items():
                    ms = time_calls(backend, calls) * 1000.0 / batch
                    samples.setdefault(threads, {}).setdefault(batch, []).append(ms)
                    progress(f"bench ort-batch: run {run_index + 1}/{runs} {threads} thread(s) "
                             f"batch {batch}: {ms:.2f} ms per image")
        finally:
            for backend in sessions.values():
                backend.deactivate()
    return per_image_rows(samples)


def markdown(report: Dict[str, Any]) -> str:
    lines = [f"### ONNX Runtime batch 1 vs 2 vs 4 per image (`--ort-batch`), {report['date']}",
             "", f"- Command: `{report['command']}`",
             f"- Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
             f"onnxruntime {report['machine']['versions'].get('onnxruntime')}",
             f"- Load: `{report['uptime_start']}` before, `{report['uptime_end']}` after",
             f"- {report['calls']} calls per run after {WARMUP_CALLS} warm-up calls, "
             f"{report['runs']} alternating runs, medians; bundles {report['bundles']}", "",
             "| threads | batch | ms per image (median; runs) | images/s × batch 1 |",
             "|---|---|---|---|"]
    for row in report["rows"]:
        speedup = "-" if row["speedup_vs_batch1"] is None else f"{row['speedup_vs_batch1']:.2f}"
        lines.append(f"| {row['threads']} | {row['batch']} | **{row['ms_per_image']:.2f}** "
                     f"({', '.join(f'{v:.2f}' for v in row['runs_ms'])}) | {speedup} |")
    return "\n".join([*lines, "", TENSORRT_EXPECTATION]) + "\n"


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    bundles = [Bundle.load(path) for path in args.bundles]
    batches = [bundle.max_batch() for bundle in bundles]
    if len(set(batches)) != len(batches):
        raise JetyoloError(f"--ort-batch: give one bundle per batch size, got batches {batches}")
    if args.backend != "onnxruntime":
        raise JetyoloError("--ort-batch measures ONNX Runtime; drop --backend")
    cores = os.cpu_count() or 1
    thread_counts: List[int] = [args.threads] if args.threads else sorted({1, cores})
    calls: int = args.frames or DEFAULT_CALLS
    if args.runs < 1 or calls < 1:
        raise JetyoloError("--runs and --frames must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "jetyolo bench " + " ".join(sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench" else " ".join(sys.argv),
        "machine": bench_report.machine_facts("onnxruntime"), "uptime_start": uptime(),
        "runs": args.runs, "calls": calls,
        "bundles": ", ".join(f"{Path(b.root).name} (batch {n})" for b, n in zip(bundles, batches)),
    }
    report["rows"] = measure(bundles, thread_counts, args.runs, calls, progress)
    report["uptime_end"] = uptime()
    report["tensorrt_expectation"] = TENSORRT_EXPECTATION
    atomic_write_json(args.out / "ort_batch.json", report)
    text = markdown(report)
    if args.append_md is not None:
        with open(args.append_md, "a") as handle:
            handle.write("\n" + text)
    print(text)
    return 0
