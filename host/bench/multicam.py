"""Several cameras in one process vs one process per camera: ``jetyolo bench BUNDLE --sources
1,2,4`` (issue 12's measurements).

For each N in ``--sources``, alternating within each run (the order rotating per run, so a busy
machine slows them alike):

  one      one `jetyolo run` pipeline with N sources (``--multi-bundle`` / ``--batch-size`` when
           given: the batched engine), default settings otherwise
  one1     only beside a batched ``one``: the same N sources on BUNDLE, unbatched
  procs    N single-source pipelines in parallel, default settings (what a user runs today)
  procs1t  N single-source pipelines in parallel, one ONNX Runtime thread each
           (``--threads 1 --infer-workers 1``)

At N = 1, ``procs`` is the single-source baseline (``one`` is the same process and is run only
when a batched bundle or batch size makes it differ). Each pipeline is ``device.bench.worker
pipeline`` (``run_configured``, what `jetyolo run` calls) in a fresh process, sources named
cam0..camN-1. Sources: N synthetic 1080p videos (or ``--source`` for all), read as fast as
possible ("file" phase); with ``--live FPS`` also N paced MJPEG cameras on loopback, one per
source ("live" phase).

Figures per configuration: aggregate FPS (results of every source while all of them were
publishing, over that window: start-up and the ragged end are left out), per-source p50/p99
capture->publish latency (the source's read time, before any queue, to the sink), the processes'
peak RSS summed, process CPU ms per published frame; ratios against issue 12's targets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from device.bundle import Bundle
from device.errors import JetyoloError
from device.files import atomic_write_bytes, atomic_write_json
from host.bench import Target, check_targets, run_workers
from host.bench import report as bench_report
from host.bench.http import load_average as uptime
from host.bench.live import PacedMjpegServer

log = logging.getLogger(__name__)

CONFIGS = {
    "one": "one process, N sources",
    "one1": "one process, N sources, BUNDLE unbatched",
    "procs": "N processes, default settings",
    "procs1t": "N processes, 1 ORT thread each",
}
ONE_THREAD = ["--threads", "1", "--infer-workers", "1"]
VIDEO_SIZE = (1920, 1080)
VIDEO_CLASSES = 4
DEFAULT_FRAMES = 120
LIVE_P99_BOUND = 2.0
FPS_VS_DEFAULT, FPS_VS_ONE_THREAD, RSS_BOUND = 1.3, 1.0, 0.4


@dataclass
class MulticamSettings:
    bundle: Path  # every single-source process runs this one
    counts: List[int]
    videos: List[Path]  # one per source index (cycled when fewer)
    frames: int  # per source and run
    runs: int
    out: Path
    backend: str = "onnxruntime"
    multi_bundle: Optional[Path] = None  # the N-source process's bundle (default: bundle)
    batch_size: Optional[int] = None
    live_fps: Optional[float] = None
    decode_scale: Optional[str] = None  # every pipeline's (None: their default)

    @property
    def batched(self) -> bool:
        return self.multi_bundle is not None or self.batch_size is not None

    def phases(self) -> List[str]:
        return ["file", "live"] if self.live_fps else ["file"]


# ---- parsing -----------------------------------------------------------------------------------


def parse_counts(text: str) -> List[int]:
    """``"1,2,4"`` -> [1, 2, 4]: distinct, ascending, each at least 1."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise JetyoloError(f"--sources {text!r}: give source counts like 1,2,4") from None
    if not counts or counts[0] < 1:
        raise JetyoloError(f"--sources {text!r}: every count must be at least 1, e.g. 1,2,4")
    return counts


def configurations(count: int, batched: bool) -> List[str]:
    """``one1`` (the N-source process on BUNDLE, no --batch-size) only beside a batched ``one``:
    what batching gives in the pipeline. At N = 1 it is ``procs``."""
    if count == 1:
        return (["one"] if batched else []) + ["procs", "procs1t"]
    return ["one"] + (["one1"] if batched else []) + ["procs", "procs1t"]


def key(phase: str, config: str, count: int) -> str:
    return f"{phase}/{config}-{count}"


# ---- aggregation -------------------------------------------------------------------------------


def window_fps(streams: Sequence[Sequence[float]]) -> Tuple[Optional[float], float]:
    """Aggregate results per second of several result streams (time.time() per result, one
    stream per source): every result inside the window in which all streams were publishing
    (latest first result -> earliest last result), ``(count - 1) / window``. Start-up (processes
    that begin publishing at different times) and the ragged end are left out. Returns (FPS,
    window seconds); (None, 0) when the streams never overlapped or a stream is empty."""
    if not streams or any(len(stream) < 1 for stream in streams):
        return None, 0.0
    start = max(stream[0] for stream in streams)
    end = min(stream[-1] for stream in streams)
    if end <= start:
        return None, 0.0
    inside = sum(1 for stream in streams for wall in stream if start <= wall <= end)
    return (inside - 1) / (end - start), end - start


def run_figures(results: Sequence[Dict[str, Any]], served: Optional[int] = None
                ) -> Dict[str, Any]:
    """One configuration's run (one or more processes) as one row."""
    streams = [walls for result in results for walls in result["result_walls"].values()]
    fps, window = window_fps(streams)
    frames = sum(result["frames"] for result in results)
    measured = [result for result in results if result["process_cpu_ms_per_frame"] is not None]
    cpu_ms = sum(result["process_cpu_ms_per_frame"] * result["frames"] for result in measured)
    cpu_frames = sum(result["frames"] for result in measured)
    latency: Dict[str, List[float]] = {}
    for result in results:
        for source, samples in result["capture_to_publish_ms"].items():
            latency.setdefault(source, []).extend(samples)
    return {
        "processes": len(results), "frames": frames, "fps": fps, "window_s": window,
        "rss_mib": sum(result["peak_rss_mib"] for result in results),
        "cpu_ms_per_frame": cpu_ms / cpu_frames if cpu_frames else None,
        "latency_samples_ms": latency, "frames_served": served,
    }


def summarize(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Medians over runs of the scalars; latency percentiles per source over every run's
    samples; ``p99_max_ms``: the worst source's p99."""
    summary: Dict[str, Any] = {"runs": len(runs), "processes": runs[0]["processes"]}
    for name in ("fps", "frames", "rss_mib", "cpu_ms_per_frame", "frames_served"):
        values = [run[name] for run in runs if run.get(name) is not None]
        summary[name] = statistics.median(values) if values else None
    summary["fps_per_run"] = [None if run["fps"] is None else round(run["fps"], 2)
                              for run in runs]
    pooled: Dict[str, List[float]] = {}
    for run in runs:
        for source, samples in run["latency_samples_ms"].items():
            pooled.setdefault(source, []).extend(samples)
    summary["latency_ms"] = {
        source: {f"p{p}": round(float(np.percentile(samples, p)), 1) for p in (50, 99)}
        for source, samples in sorted(pooled.items()) if samples
    }
    p99s = [values["p99"] for values in summary["latency_ms"].values()]
    summary["p99_max_ms"] = max(p99s) if p99s else None
    return summary


def targets(counts: Sequence[int], live: bool, batched: bool = False) -> List[Target]:
    """Issue 12's targets at every N >= 2 in the list (the issue states them at N = 4); with
    ``batched``, the memory and live-latency ones for the unbatched process too (on a CPU
    backend the batch-1 bundle is the one that keeps latency down)."""
    found: List[Target] = []
    for count in (n for n in counts if n >= 2):
        one, procs, single = key("file", "one", count), key("file", "procs", count), None
        found += [
            Target(f"fps_vs_default_{count}", f"{count} sources: one process / {count} default "
                   "processes, aggregate FPS", "fps", one, procs, ">=", FPS_VS_DEFAULT),
            Target(f"fps_vs_one_thread_{count}", f"{count} sources: one process / {count} "
                   "one-thread processes, aggregate FPS", "fps", one,
                   key("file", "procs1t", count), ">=", FPS_VS_ONE_THREAD),
            Target(f"rss_{count}", f"{count} sources: one process / {count} default processes, "
                   "summed peak RSS", "rss_mib", one, procs, "<=", RSS_BOUND),
        ]
        if live and 1 in counts:
            single = key("live", "procs", 1)
            found.append(Target(f"live_p99_{count}", f"{count} live sources in one process: "
                                "worst source's p99 / the single-source p99", "p99_max_ms",
                                key("live", "one", count), single, "<=", LIVE_P99_BOUND))
        if batched:
            found += unbatched_targets(count, live and 1 in counts)
    return found


def unbatched_targets(count: int, live: bool) -> List[Target]:
    one1 = key("file", "one1", count)
    found = [Target(f"rss_unbatched_{count}", f"{count} sources: one process (BUNDLE "
                    f"unbatched) / {count} default processes, summed peak RSS", "rss_mib",
                    one1, key("file", "procs", count), "<=", RSS_BOUND)]
    if live:
        found.append(Target(f"live_p99_unbatched_{count}", f"{count} live sources in one "
                            "process (BUNDLE unbatched): worst source's p99 / the single-source "
                            "p99", "p99_max_ms", key("live", "one1", count),
                            key("live", "procs", 1), "<=", LIVE_P99_BOUND))
    return found


# ---- running -----------------------------------------------------------------------------------


@dataclass
class Cameras:
    """The paced cameras of the live phase, one per source index; ``sent`` counts frames."""

    servers: List[PacedMjpegServer] = field(default_factory=list)

    def urls(self, count: int) -> List[str]:
        return [server.url for server in self.servers[:count]]

    def sent(self, count: int) -> int:
        return sum(server.sent for server in self.servers[:count])


@contextlib.contextmanager
def live_cameras(settings: MulticamSettings) -> Iterator[Cameras]:
    cameras = Cameras()
    with contextlib.ExitStack() as stack:
        if settings.live_fps:
            for index in range(max(settings.counts)):
                video = settings.videos[index % len(settings.videos)]
                cameras.servers.append(stack.enter_context(
                    PacedMjpegServer(video, settings.live_fps, settings.frames)))
        yield cameras


def pipeline_command(bundle: Path, sources: Sequence[Tuple[str, str]], frames: int,
                     result: Path, work: Path, backend: str, extra: Sequence[str]) -> List[str]:
    """A ``device.bench.worker pipeline`` child over ``sources`` ((name, location) pairs),
    ``frames`` published in all."""
    command = [sys.executable, "-m", "device.bench.worker", "pipeline", "--bundle", str(bundle),
               "--frames", str(frames), "--result", str(result), "--work", str(work),
               "--backend", backend, *extra]
    for name, location in sources:
        command += ["--source", location, "--name", name]
    return command


def jobs_for(settings: MulticamSettings, phase: str, config: str, count: int,
             locations: Sequence[str], folder: Path) -> List[Tuple[List[str], Path, Path]]:
    named = [(f"cam{index}", location) for index, location in enumerate(locations[:count])]
    common = ["--decode-scale", settings.decode_scale] if settings.decode_scale else []
    if config == "one":
        extra = ["--batch-size", str(settings.batch_size)] if settings.batch_size else []
        groups = [(settings.multi_bundle or settings.bundle, named, common + extra)]
    elif config == "one1":
        groups = [(settings.bundle, named, common)]
    else:
        extra = ONE_THREAD if config == "procs1t" else []
        groups = [(settings.bundle, [pair], common + extra) for pair in named]
    jobs = []
    for index, (bundle, sources, flags) in enumerate(groups):
        stem = folder / f"{phase}-{config}-{count}-p{index}"
        jobs.append((pipeline_command(bundle, sources, settings.frames * len(sources),
                                      stem.with_suffix(".json"), stem, settings.backend, flags),
                     stem.with_suffix(".json"), stem.with_suffix(".log")))
    return jobs


def schedule(settings: MulticamSettings, run_index: int) -> List[Tuple[str, int, str]]:
    """(phase, N, configuration) in this run's order: rotated by the run index."""
    order = [(phase, count, config) for phase in settings.phases() for count in settings.counts
             for config in configurations(count, settings.batched)]
    shift = run_index % len(order)
    return order[shift:] + order[:shift]


def measure(settings: MulticamSettings, progress: Callable[[str], None]) -> Dict[str, Any]:
    raw = settings.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    runs: Dict[str, List[Dict[str, Any]]] = {}
    files = [str(video) for video in settings.videos]
    with live_cameras(settings) as cameras:
        for run_index in range(settings.runs):
            for phase, count, config in schedule(settings, run_index):
                folder = raw / f"run{run_index + 1}"
                folder.mkdir(exist_ok=True)
                locations = cameras.urls(count) if phase == "live" else \
                    [files[index % len(files)] for index in range(count)]
                sent = cameras.sent(count)
                results = run_workers(jobs_for(settings, phase, config, count, locations, folder))
                served = cameras.sent(count) - sent if phase == "live" else None
                figures = run_figures(results, served)
                runs.setdefault(key(phase, config, count), []).append(figures)
                fps = "-" if figures["fps"] is None else f"{figures['fps']:.1f}"
                progress(f"bench multicam: run {run_index + 1}/{settings.runs} {phase} N={count} "
                         f"{config:<8} {figures['frames']} frames, {fps} FPS, "
                         f"{figures['rss_mib']:.0f} MiB")
    return {name: summarize(results) for name, results in runs.items()}


# ---- videos ------------------------------------------------------------------------------------


def synth_videos(folder: Path, count: int, frames: int) -> List[Path]:
    """``count`` different 1080p synthetic videos (seeds 0..count-1), made once per frame count."""
    from host.synth import make_video

    videos = []
    for index in range(count):
        path = folder / f"cam{index}-{frames}f.mp4"
        if not path.is_file():
            make_video(path, VIDEO_CLASSES, VIDEO_SIZE, frames, seed=index)
        videos.append(path)
    return videos


# ---- the verb ----------------------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> MulticamSettings:
    if len(args.bundles) != 1:
        raise JetyoloError("--sources takes one BUNDLE (the single-source processes' bundle); "
                           "give the N-source process another with --multi-bundle")
    if args.threads is not None:
        raise JetyoloError("--sources measures default settings and one-thread processes; "
                           "drop --threads")
    if args.runs < 1 or (args.frames is not None and args.frames < 2):
        raise JetyoloError("--runs must be at least 1 and --frames at least 2")
    if args.batch_size is not None and args.batch_size < 1:
        raise JetyoloError(f"--batch-size must be at least 1, got {args.batch_size}")
    counts = parse_counts(args.sources)
    Bundle.load(args.bundles[0])
    if args.multi_bundle is not None:
        Bundle.load(args.multi_bundle)
    if args.source is not None:
        if not args.source.is_file():
            raise JetyoloError(f"--source {args.source}: no such video file")
        available = bench_report.video_frame_count(args.source)
        frames = min(args.frames or available, available)
        videos = [args.source.resolve()]
    else:
        frames = args.frames or DEFAULT_FRAMES
        videos = synth_videos(args.out.resolve() / "videos", max(counts), frames)
    return MulticamSettings(
        bundle=args.bundles[0].resolve(), counts=counts, videos=videos, frames=frames,
        runs=args.runs, out=args.out.resolve(), backend=args.backend,
        multi_bundle=args.multi_bundle.resolve() if args.multi_bundle else None,
        batch_size=args.batch_size, live_fps=args.live, decode_scale=args.decode_scale,
    )


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    settings = settings_from_args(args)
    report: Dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "jetyolo bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench" else " ".join(sys.argv),
        "machine": bench_report.machine_facts(settings.backend),
        "uptime_start": uptime(),
        "settings": {k: [str(v) for v in value] if isinstance(value, list) and k == "videos"
                     else str(value) if isinstance(value, Path) else value
                     for k, value in asdict(settings).items()},
        "note": args.note,
    }
    summary = measure(settings, progress)
    checks = check_targets(summary, targets(settings.counts, bool(settings.live_fps),
                                                 settings.batched))
    report.update(uptime_end=uptime(), configurations=summary,
                  targets=[asdict(check) for check in checks])
    plot = args.plot or settings.out / "multicam.png"
    if write_plot(report, plot):
        report["plot"] = str(plot)
    atomic_write_json(settings.out / "multicam.json", report)
    text = markdown(report)
    atomic_write_bytes(settings.out / "multicam.md", text.encode())
    if args.append_md is not None:
        with open(args.append_md, "a") as handle:
            handle.write("\n" + text)
    print(text)
    return 0  # a MISS is a finding to record, not a failure of the command


# ---- Markdown and plot -------------------------------------------------------------------------


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def latency_cell(latency: Dict[str, Dict[str, float]]) -> str:
    return ", ".join(f"{source} {v['p50']:.0f}/{v['p99']:.0f}" for source, v in latency.items())


def configuration_rows(report: Dict[str, Any]) -> List[str]:
    rows = ["| phase | N | configuration | processes | frames published (of served) | "
            "aggregate FPS (median; runs) | capture→publish ms p50/p99 per source | "
            "summed peak RSS MiB | CPU ms/frame |", "|---|---|---|---|---|---|---|---|---|"]
    for name, figures in report["configurations"].items():
        phase, rest = name.split("/")
        config, count = rest.rsplit("-", 1)
        served = figures.get("frames_served")
        frames = f"{figures['frames']:.0f}" + (f" of {served:.0f}" if served else "")
        per_run = ", ".join(_num(fps) for fps in figures["fps_per_run"])
        rows.append(f"| {phase} | {count} | {CONFIGS[config]} | {figures['processes']} | "
                    f"{frames} | **{_num(figures['fps'])}** ({per_run}) | "
                    f"{latency_cell(figures['latency_ms'])} | {_num(figures['rss_mib'], 0)} | "
                    f"{_num(figures['cpu_ms_per_frame'])} |")
    return rows


def target_rows(checks: Sequence[Dict[str, Any]], summary: Dict[str, Any]) -> List[str]:
    rows = ["| ratio | value | target | result |", "|---|---|---|---|"]
    rows += [f"| {check['label']} | {_num(check['value'], 3)} | {check['op']} {check['bound']} | "
             f"**{check['status']}** |" for check in checks]
    for name, figures in summary.items():
        unbatched = summary.get(name.replace("/one-", "/one1-"), {}).get("fps")
        if "/one-" in name and unbatched and figures["fps"]:
            rows.append(f"| {name.split('/')[0]}, {name.rsplit('-', 1)[1]} sources: batched / "
                        f"unbatched one process, aggregate FPS | {figures['fps'] / unbatched:.3f} "
                        "| - | info |")
    return rows


def markdown(report: Dict[str, Any]) -> str:
    machine, settings = report["machine"], report["settings"]
    videos = ", ".join(Path(video).name for video in settings["videos"])
    lines = [
        f"### jetyolo bench --sources, {report['date']} ({settings['backend']})", "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['arch']}, "
        f"{machine['system']}; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        f"- Command: `{report['command']}`",
        f"- Load: `{report['uptime_start']}` before, `{report['uptime_end']}` after",
        f"- Bundle `{Path(settings['bundle']).name}`"
        + (f", N-source process `{Path(settings['multi_bundle']).name}`"
           if settings.get("multi_bundle") else "")
        + (f", batch size {settings['batch_size']}" if settings.get("batch_size") else "")
        + f"; videos {videos}; {settings['frames']} frames per source, {settings['runs']} "
        "run(s) per configuration, configurations alternating"
        + (f"; live: paced MJPEG cameras at {settings['live_fps']:g} FPS on loopback"
           if settings.get("live_fps") else ""),
        "- Aggregate FPS: results of every source while all were publishing / that window; RSS: "
        "the processes' peak RSS summed; CPU: process CPU time (every thread) / frames "
        "published; capture→publish: the source's read of the frame to the sink, pooled over "
        "runs (file phase: a file reads ahead, so mostly queueing).",
    ]
    if report.get("note"):
        lines.append(f"- Note: {report['note']}")
    if report.get("plot"):
        lines.append(f"- Plot: `{report['plot']}`")
    return "\n".join([*lines, "", *configuration_rows(report), "",
                      *target_rows(report["targets"], report["configurations"])]) + "\n"


def write_plot(report: Dict[str, Any], path: Path) -> bool:
    """Aggregate FPS per N and configuration, one panel per phase; False without matplotlib."""
    plt = bench_report.pyplot()
    if plt is None:
        return False
    phases = sorted({name.split("/")[0] for name in report["configurations"]})
    counts = sorted({int(name.rsplit("-", 1)[1]) for name in report["configurations"]})
    figure, axes = plt.subplots(1, len(phases), figsize=(7 * len(phases), 4), squeeze=False)
    for axis, phase in zip(axes[0], phases):
        for offset, config in enumerate(CONFIGS):
            points = [(counts.index(int(name.rsplit("-", 1)[1])), figures["fps"] or 0.0)
                      for name, figures in report["configurations"].items()
                      if name.startswith(f"{phase}/{config}-")]
            if points:
                xs, ys = zip(*sorted(points))
                axis.bar([x + (offset - 1.5) * 0.2 for x in xs], ys, width=0.2,
                         label=CONFIGS[config])
        axis.set_xticks(range(len(counts)), [str(count) for count in counts])
        axis.set_xlabel("sources (N)")
        axis.set_ylabel("aggregate FPS (median of runs)")
        axis.set_title(f"{phase} sources")
        axis.set_ylim(0, axis.get_ylim()[1] * 1.3)  # room above the bars for the legend
        axis.legend(fontsize=7, loc="upper left", ncol=2)
    figure.suptitle(f"jetyolo bench --sources {report['date'][:16]}: "
                    f"{report['machine']['cores']} cores; {report['uptime_start'][-32:]}",
                    fontsize=9)
    bench_report.save_figure(plt, figure, path, dpi=80)
    return True

