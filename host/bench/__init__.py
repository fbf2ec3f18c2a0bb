"""Benchmark a bundle on a video: the raw backend (ceiling), the jetyolo pipeline, and ultralytics.

Examples:
  jetyolo bench b640/ b320/ --source v.mp4 --runs 3 --append-md docs/BENCHMARKS.md
  jetyolo bench b320/ --source v.mp4 --frames 60 --runs 1 --no-ultralytics
  jetyolo bench b640/ --source v.mp4 --backend tensorrt --precision int8   # on a Jetson

Each measurement runs in its own fresh process (peak RSS and cold start are per contender):
  ceiling      the backend call on one prepared input, nothing else (ORT / TensorRT), with the
               pipeline's own session settings and as many calls in flight as the pipeline
               keeps (two 1-thread ONNX Runtime calls at once on 2 cores by default)
  pipeline     `jetyolo run`'s pipeline over the video with a JSONL sink, at its defaults
               (the bundle's CPU graph, the threads auto rule) unless --variant/--threads
  ultralytics  YOLO(model.onnx).predict(source=video, stream=True) with the same model, image
               size and thresholds (the bundle's graph with its output Concat restored), at
               ONNX Runtime's default threads unless --threads
Contenders alternate within each run, so a busy machine slows them alike. Prints frames,
seconds, FPS (median of --runs), per-stage p50/p90/p99, pre+post CPU per frame, peak RSS, cold
start, the ratios and PASS/MISS per target; writes OUT/bench.json, OUT/bench.md, a PNG plot, and
appends the Markdown to --append-md. A missed target triggers one extra profiled pipeline run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from device.argtypes import finite_float
from device.bench.common import T0_ENV
from device.bench.tracking import markdown_lines, tracking_costs
from device.bundle import Bundle
from device.decode_scale import DECODE_SCALES
from device.errors import JetyoloError
from device.files import atomic_write_bytes, atomic_write_json
from host.bench import report as bench_report
from host.bench import trt as bench_trt
from host.bench.live import PacedMjpegServer

log = logging.getLogger(__name__)

CONTENDERS = ("ceiling", "pipeline", "ultralytics")
WORKERS = {
    "ceiling": "device.bench.worker",
    "pipeline": "device.bench.worker",
    "ultralytics": "host.bench.worker",
}
STAGES = ("capture", "preprocess", "infer", "postprocess", "total")
PERCENTILES = (50, 90, 99)
MEDIAN_KEYS = ("fps", "seconds", "cold_start_s", "import_s", "peak_rss_mib",
               "prepost_cpu_ms_per_frame", "process_cpu_ms_per_frame", "frames_served",
               "infer_cpu_ms_per_frame", "decode_cpu_ms_per_frame")
SERVICE_STAGES = ("capture", "preprocess", "infer", "postprocess")  # one frame, start to end
LIVE_P99_BOUND = 2.0  # live capture->publish p99 at most twice the single-frame service time
WORKER_TIMEOUT_S = 1800
LOG_TAIL_LINES = 8


# ---- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``numerator.metric / denominator.metric`` compared with ``bound`` (">=" or "<=")."""

    key: str
    label: str
    metric: str
    numerator: str
    denominator: str
    op: str
    bound: float


TARGETS = (
    Target("fps_vs_ceiling", "pipeline FPS / ceiling FPS", "fps", "pipeline", "ceiling", ">=", 0.9),
    Target("fps_vs_ultralytics", "pipeline FPS / ultralytics FPS", "fps", "pipeline",
           "ultralytics", ">=", 1.5),
    Target("prepost_cpu_vs_ultralytics", "pre+post CPU per frame / ultralytics'",
           "prepost_cpu_ms_per_frame", "pipeline", "ultralytics", "<=", 0.25),
    Target("rss_vs_ultralytics", "peak RSS / ultralytics'", "peak_rss_mib", "pipeline",
           "ultralytics", "<=", 0.4),
    Target("cold_start_vs_ultralytics", "cold start / ultralytics'", "cold_start_s", "pipeline",
           "ultralytics", "<=", 0.3),
)


@dataclass(frozen=True)
class TargetCheck:
    key: str
    label: str
    value: Optional[float]
    op: str
    bound: float
    status: str  # PASS, MISS, or n/a when a contender was not measured


def ratio(summary: Dict[str, Dict[str, Any]], target: Target) -> Optional[float]:
    """The target's ratio from per-contender medians, or None when a side is missing or zero."""
    top = summary.get(target.numerator, {}).get(target.metric)
    bottom = summary.get(target.denominator, {}).get(target.metric)
    if top is None or bottom is None or bottom <= 0:
        return None
    return float(top) / float(bottom)


def check_targets(
    summary: Dict[str, Dict[str, Any]], targets: Sequence[Target] = TARGETS
) -> List[TargetCheck]:
    checks = []
    for target in targets:
        value = ratio(summary, target)
        if value is None:
            status = "n/a"
        elif target.op == ">=":
            status = "PASS" if value >= target.bound else "MISS"
        else:
            status = "PASS" if value <= target.bound else "MISS"
        checks.append(TargetCheck(target.key, target.label, value, target.op, target.bound, status))
    return checks


def decode_bound(summary: Dict[str, Dict[str, Any]], cores: int) -> Optional[float]:
    """The most pipeline FPS / ceiling FPS can be when the pipeline decodes and pre- and
    post-processes on the cores its calls run on: each frame costs at least the ceiling's CPU plus
    the decode's and pre+post's, and ``cores`` CPU-seconds per second is all there is. None when
    a figure is missing."""
    ceiling = summary.get("ceiling", {})
    parts = [ceiling.get("process_cpu_ms_per_frame"), ceiling.get("decode_cpu_ms_per_frame"),
             summary.get("pipeline", {}).get("prepost_cpu_ms_per_frame")]
    fps = ceiling.get("fps")
    if not fps or None in parts:
        return None
    cpu_ms = sum(float(part) for part in parts if part is not None)  # (for the type checker)
    return min(1.0, cores * 1000.0 / cpu_ms / float(fps)) if cpu_ms > 0 else None


def live_check(summary: Dict[str, Dict[str, Any]]) -> TargetCheck:
    """On a paced camera: the pipeline's capture->publish p99 against the time one frame takes
    through the stages (sum of their p50s). A standing queue in front of inference shows here."""
    latency = summary.get("pipeline", {}).get("latency_ms", {})
    service = sum(latency.get(stage, {}).get("p50", 0.0) for stage in SERVICE_STAGES)
    p99 = latency.get("total", {}).get("p99")
    value = p99 / service if p99 is not None and service > 0 else None
    status = "n/a" if value is None else "PASS" if value <= LIVE_P99_BOUND else "MISS"
    return TargetCheck("live_p99_vs_service",
                       "live capture->publish p99 / one frame's service time (capture + pre + "
                       "infer + post p50)", value, "<=", LIVE_P99_BOUND, status)


@contextlib.contextmanager
def live_camera(settings: Settings) -> Iterator[Optional[PacedMjpegServer]]:
    """The paced camera for ``--live`` (None without it)."""
    if settings.live_fps is None:
        yield None
        return
    with PacedMjpegServer(settings.source, settings.live_fps, settings.frames) as camera:
        yield camera


# ---- aggregation -------------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> Dict[str, float]:
    finite = np.asarray([v for v in values if v == v], dtype=np.float64)  # drop NaN
    if finite.size == 0:
        return {}
    quantiles = np.percentile(finite, PERCENTILES)
    return {f"p{p}": round(float(q), 3) for p, q in zip(PERCENTILES, quantiles)}


def pooled_samples(runs: List[Dict[str, Any]]) -> Dict[str, List[float]]:
    """Every run's per-frame samples, by stage."""
    pooled: Dict[str, List[float]] = {}
    for run in runs:
        for stage, samples in run.get("samples_ms", {}).items():
            pooled.setdefault(stage, []).extend(samples)
    return pooled


def aggregate(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Medians over runs of the scalar figures; stage percentiles over every run's samples."""
    summary: Dict[str, Any] = {"runs": len(runs), "frames": runs[0]["frames"]}
    for key in MEDIAN_KEYS:
        values = [run[key] for run in runs if run.get(key) is not None]
        summary[key] = statistics.median(values) if values else None
    summary["fps_per_run"] = [round(run["fps"], 2) for run in runs]
    pooled = pooled_samples(runs)
    summary["latency_ms"] = {
        stage: percentiles(pooled[stage]) for stage in STAGES if stage in pooled
    }
    stage_cpu = [run["stage_cpu_ms_per_frame"] for run in runs if run.get("stage_cpu_ms_per_frame")]
    if stage_cpu:
        summary["stage_cpu_ms_per_frame"] = {
            key: statistics.median(row[key] for row in stage_cpu) for key in stage_cpu[0]
        }
    for key in ("detections", "backend", "plan_path", "graph", "threading"):
        if key in runs[0]:
            summary[key] = runs[0][key]
    return summary


# ---- child processes ---------------------------------------------------------------------------


@dataclass
class Settings:
    source: Path
    frames: int
    runs: int
    threads: Optional[int]  # None: each contender's own default (jetyolo run's auto rule)
    backend: str
    precision: Optional[str]
    variant: Optional[str]
    int8_from: Optional[str]
    engine_cache_dir: Optional[str]
    ultralytics: bool
    ultralytics_model: Optional[Path]
    profile: bool
    out: Path
    live_fps: Optional[float] = None  # serve the video as a camera paced at this rate
    decode_scale: Optional[str] = None  # the pipeline's decode_scale (None: its default)


def worker_command(
    contender: str, bundle: Bundle, settings: Settings, result: Path, work: Path,
    ultralytics_model: Optional[Path] = None, profile: bool = False,
    source: Optional[str] = None,
) -> List[str]:
    """The child's command line; ``source`` (the live camera's URL) replaces the video for the
    pipeline and ultralytics (the ceiling always reads its one frame from the file)."""
    command = [sys.executable, "-m", WORKERS[contender]]
    if source is None or contender == "ceiling":
        source = str(settings.source)
    if contender == "ultralytics":
        if ultralytics_model is None:
            raise RuntimeError("ultralytics contender without a model")
        post = bundle.manifest.get("postprocess", {})
        return [
            *command, "--model", str(ultralytics_model), "--source", source,
            "--frames", str(settings.frames), "--imgsz", ",".join(map(str, bundle.input_size)),
            "--conf", str(post.get("conf", 0.25)), "--iou", str(post.get("iou", 0.45)),
            "--max-det", str(post.get("max_det", 300)), *threads_flag(settings.threads),
            "--result", str(result),
        ]
    command += [
        contender, "--bundle", str(bundle.root), "--source", source,
        "--frames", str(settings.frames), *threads_flag(settings.threads),
        "--backend", settings.backend, "--result", str(result), "--work", str(work),
    ]
    for flag, value in (("--precision", settings.precision), ("--variant", settings.variant),
                        ("--int8-from", settings.int8_from),
                        ("--engine-cache-dir", settings.engine_cache_dir),
                        ("--decode-scale", settings.decode_scale)):
        if value:
            command += [flag, value]
    return command + (["--profile"] if profile else [])


def threads_flag(threads: Optional[int]) -> List[str]:
    return [] if threads is None else ["--threads", str(threads)]


def run_worker(command: List[str], result: Path, log_path: Path) -> Dict[str, Any]:
    """Start one child (fresh process), wait, and read its JSON result."""
    return run_workers([(command, result, log_path)])[0]


def run_workers(jobs: Sequence[Tuple[List[str], Path, Path]]) -> List[Dict[str, Any]]:
    """Start every ``(command, result, log)`` child at once (each a fresh process), wait for all,
    and read their JSON results in order; a child that failed is reported with its log."""
    env = dict(os.environ)
    env.setdefault("YOLO_OFFLINE", "1")
    with contextlib.ExitStack() as stack:
        started = []
        for command, result, log_path in jobs:
            result.unlink(missing_ok=True)
            log_file = stack.enter_context(open(log_path, "w"))
            env[T0_ENV] = repr(time.time())
            started.append(subprocess.Popen(command, env=dict(env), stdout=log_file,
                                            stderr=subprocess.STDOUT))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        codes = [_wait(child, deadline) for child in started]
    return [_read_result(command, result, log_path, code)
            for (command, result, log_path), code in zip(jobs, codes)]


def _wait(child: subprocess.Popen, deadline: float) -> int:
    try:
        return child.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return -1


def _read_result(command: List[str], result: Path, log_path: Path, code: int) -> Dict[str, Any]:
    if code != 0 or not result.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-LOG_TAIL_LINES:]
        raise JetyoloError(
            f"benchmark child `{' '.join(command[2:4])}` failed (exit {code}); its log "
            f"{log_path} ends: " + " | ".join(tail)
        )
    data: Dict[str, Any] = json.loads(result.read_text())
    return data


# ---- per bundle --------------------------------------------------------------------------------


def contenders(settings: Settings) -> List[str]:
    return [c for c in CONTENDERS if c != "ultralytics" or settings.ultralytics]


def bench_bundle(
    bundle: Bundle, settings: Settings, progress: Callable[[str], None]
) -> Dict[str, Any]:
    name = bundle.root.name
    folder = settings.out / name
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    model = None
    if settings.ultralytics:
        model = settings.ultralytics_model or bench_report.ultralytics_model_for(
            bundle, folder / "ultralytics.onnx"
        )
    runs: Dict[str, List[Dict[str, Any]]] = {c: [] for c in contenders(settings)}
    with live_camera(settings) as camera:
        for index in range(1, settings.runs + 1):
            for contender in runs:
                stem = raw / f"{contender}-{index}"
                command = worker_command(contender, bundle, settings, stem.with_suffix(".json"),
                                         folder / f"work-{contender}-{index}", model,
                                         source=camera.url if camera else None)
                started, sent = time.monotonic(), camera.sent if camera else 0
                result = run_worker(command, stem.with_suffix(".json"), stem.with_suffix(".log"))
                if camera is not None and contender != "ceiling":
                    result["frames_served"] = camera.sent - sent
                runs[contender].append(result)
                progress(f"bench {name}: run {index}/{settings.runs} {contender:<11} "
                         f"{result['frames']} frames, {result['fps']:.1f} FPS "
                         f"({time.monotonic() - started:.1f} s)")
    summary = {contender: aggregate(results) for contender, results in runs.items()}
    checks = check_targets(summary)
    if settings.live_fps:
        checks.append(live_check(summary))
    record: Dict[str, Any] = {
        "bundle": name, "input_size": list(bundle.input_size), "frames": settings.frames,
        "contenders": summary, "targets": [asdict(check) for check in checks],
        "decode_bound": decode_bound(summary, len(os.sched_getaffinity(0))),
        "samples_ms": {c: pooled_samples(results) for c, results in runs.items()},
    }
    if settings.profile and any(check.status == "MISS" for check in checks):
        progress(f"bench {name}: a target was missed; one more pipeline run under cProfile")
        record["profile"] = profile_pipeline(bundle, settings, folder)
    plan = summary.get("ceiling", {}).get("plan_path")
    if plan:
        record["trtexec"] = bench_trt.trtexec_figures(Path(plan), settings.frames, folder, progress)
    return record


def profile_pipeline(bundle: Bundle, settings: Settings, folder: Path) -> Dict[str, Any]:
    result = folder / "raw" / "pipeline-profile.json"
    command = worker_command("pipeline", bundle, settings, result, folder / "work-profile",
                             profile=True)
    profiled = run_worker(command, result, result.with_suffix(".log"))
    return dict(profiled.get("profile", {}), fps_under_profiler=round(profiled["fps"], 2))


# ---- the verb ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE",
                        help="bundle folder(s); one section per bundle (e.g. 640 and 320)")
    parser.add_argument("--source", type=Path,
                        help="video file (with --sources: every source reads it; default there: "
                             "N synthetic 1080p videos)")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender (median FPS)")
    parser.add_argument("--live", type=finite_float, metavar="FPS",
                        help="serve --source as an MJPEG camera paced at FPS on loopback and "
                             "measure what a camera user feels: capture->publish latency and "
                             "drops (default: read the file as fast as possible, throughput)")
    parser.add_argument("--decode-scale", choices=DECODE_SCALES,
                        help="the pipeline's decode_scale (MJPEG: with --live; default auto)")
    parser.add_argument("--frames", type=int, help="frames per run (default: the whole video)")
    parser.add_argument("--threads", type=int,
                        help="inference threads of one call, for every contender (default: "
                             "each its own: jetyolo run's threads auto rule for the ceiling "
                             "and pipeline, ONNX Runtime's for ultralytics)")
    parser.add_argument("--backend", choices=("onnxruntime", "tensorrt", "auto"),
                        default="onnxruntime")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                        help="TensorRT engine precision")
    parser.add_argument("--int8-from", choices=("cache", "qdq"), help="TensorRT INT8 source")
    parser.add_argument("--variant", help="bundle graph (fp32, uint8, nms, int8-qdq)")
    parser.add_argument("--engine-cache-dir", help="TensorRT engine cache folder")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"),
                        help="results folder (bench.json, bench.md, bench.png, raw runs)")
    parser.add_argument("--plot", type=Path, help="PNG path (default OUT/bench.png)")
    parser.add_argument("--append-md", type=Path, help="append the Markdown section here")
    parser.add_argument("--note", help="a line printed with the figures (e.g. 'machine busy')")
    parser.add_argument("--no-ultralytics", action="store_true",
                        help="skip the ultralytics contender (no torch needed)")
    parser.add_argument("--ultralytics-model", type=Path,
                        help="model for the ultralytics contender (default: the bundle's graph "
                             "with its output Concat restored; on a Jetson an ultralytics "
                             ".engine)")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not profile the pipeline when a target is missed")
    several = parser.add_argument_group(
        "several cameras (issue 12): --sources 1,2,4 measures one process with N sources "
        "against N single-source processes (host/bench/multicam.py); --ort-batch measures "
        "ONNX Runtime per image at each BUNDLE's batch (host/bench/batching.py)")
    several.add_argument("--sources", metavar="N,N,...",
                         help="source counts, e.g. 1,2,4 (instead of the contenders)")
    several.add_argument("--multi-bundle", type=Path, metavar="BUNDLE",
                         help="the N-source process's bundle (e.g. one exported with --batch 4; "
                              "default: BUNDLE)")
    several.add_argument("--batch-size", type=int,
                         help="the N-source process's batch_size (frames per inference call)")
    several.add_argument("--ort-batch", action="store_true",
                         help="raw ONNX Runtime session per image at each BUNDLE's batch "
                              "(bundles from `jetyolo export --batch N`), instead of the "
                              "contenders")


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.source is None or not args.source.is_file():
        raise JetyoloError(f"--source {args.source}: no such video file; `jetyolo bench` needs "
                           "a file (make one with `jetyolo data synth DIR --video v.mp4`)")
    for flag, value in (("--runs", args.runs), ("--threads", args.threads),
                        ("--frames", args.frames)):
        if value is not None and value < 1:
            raise JetyoloError(f"{flag} must be at least 1, got {value}")
    if args.ultralytics_model is not None and not args.ultralytics_model.is_file():
        raise JetyoloError(f"--ultralytics-model {args.ultralytics_model} does not exist")
    video_frames = bench_report.video_frame_count(args.source)
    frames = min(args.frames or video_frames, video_frames)
    return Settings(
        source=args.source.resolve(), frames=frames, runs=args.runs,
        threads=args.threads,
        backend=args.backend, precision=args.precision, variant=args.variant,
        int8_from=args.int8_from, engine_cache_dir=args.engine_cache_dir,
        ultralytics=not args.no_ultralytics, ultralytics_model=args.ultralytics_model,
        profile=not args.no_profile, out=args.out, live_fps=args.live,
        decode_scale=args.decode_scale,
    )


def run(args: argparse.Namespace) -> int:
    if args.sources is not None and args.ort_batch:
        raise JetyoloError("--sources and --ort-batch are two benchmarks; run them one at a time")
    if args.sources is None and (args.multi_bundle or args.batch_size):
        raise JetyoloError("--multi-bundle and --batch-size go with --sources")
    if args.sources is not None:
        from host.bench import multicam

        return multicam.run(args, _progress)
    if args.ort_batch:
        from host.bench import batching

        return batching.run(args, _progress)
    settings = settings_from_args(args)
    bundles = [Bundle.load(path) for path in args.bundles]
    names = [bundle.root.name for bundle in bundles]
    if len(set(names)) != len(names):
        raise JetyoloError(f"bundle folder names must differ (results go to --out/<name>): {names}")
    if args.ultralytics_model is not None and len(bundles) > 1:
        raise JetyoloError("--ultralytics-model is one model for one image size; give one BUNDLE "
                           "with it (run `jetyolo bench` once per size)")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise JetyoloError(f"--plot {args.plot}: give a .png path")
    settings.out.mkdir(parents=True, exist_ok=True)
    if settings.variant == "int8-qdq" and settings.backend != "tensorrt":
        log.warning("bench: the INT8 Q/DQ graph on ONNX Runtime is reported for accuracy only; "
                    "its CPU speed says nothing about TensorRT INT8")
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "jetyolo bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench" else " ".join(sys.argv),
        "machine": bench_report.machine_facts(settings.backend),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "settings": {k: str(v) if isinstance(v, Path) else v
                     for k, v in asdict(settings).items()},
        "note": args.note,
        "bundles": [],
    }
    for bundle in bundles:
        report["bundles"].append(bench_bundle(bundle, settings, _progress))
    _progress("bench: tracking cost at 1 and 4 sources")
    report["tracking"] = tracking_costs((1, 4))
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    write_outputs(report, settings.out, args.plot or settings.out / "bench.png", args.append_md)
    return 0  # a MISS is a finding to record, not a failure of the command


def write_outputs(
    report: Dict[str, Any], out: Path, plot: Path, append_md: Optional[Path]
) -> None:
    if bench_report.write_plot(report, plot):
        report["plot"] = str(plot)
    for record in report["bundles"]:
        del record["samples_ms"]  # kept per run under OUT/<bundle>/raw/
    atomic_write_json(out / "bench.json", report)
    markdown = bench_report.markdown(report)
    markdown += ("\n### tracking (device/bench/tracking.py: ByteTrack + one zone + one line per "
                 "source, no detector)\n\n" + "\n".join(markdown_lines(report["tracking"])) + "\n")
    atomic_write_bytes(out / "bench.md", markdown.encode())
    if append_md is not None:
        with open(append_md, "a") as handle:
            handle.write("\n" + markdown)
    print(markdown)
    log.info("bench: wrote %s, %s, %s%s", out / "bench.json", out / "bench.md", plot,
             f"; appended to {append_md}" if append_md else "")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
