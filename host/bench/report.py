"""What ``jetyolo bench`` needs besides measuring: the ultralytics model, machine facts, the
Markdown section and the PNG plot.

The ultralytics contender runs the *same graph* as jetyolo: the bundle's fp32 model with the
final ``Concat(boxes, scores)`` put back (onnx-graphsurgeon), so ultralytics sees the single
``output0 [1, 4+nc, N]`` it expects, plus the metadata an ultralytics export carries (names,
stride, imgsz). Re-exporting from a .pt would need weights the bundle does not ship and could
differ in simplification; re-adding one Concat keeps weights and every other node identical,
which ``ultralytics_model_for`` checks on ONNX Runtime before the benchmark starts.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

import cv2
import numpy as np

from device.bundle import Bundle
from device.errors import JetyoloError
from device.files import atomic_write_bytes
from host._env import installed_versions, require

log = logging.getLogger(__name__)

VERSIONED = ("onnxruntime", "opencv-python", "numpy", "ultralytics", "torch", "tensorrt")
JETSON_RELEASE = Path("/etc/nv_tegra_release")
LOAD_BUSY = 0.75  # load average per core above which the figures are marked noisy
PLOT_STAGES = ("preprocess", "infer", "postprocess", "total")
COLORS = {"ceiling": "#7f7f7f", "pipeline": "#1f77b4", "ultralytics": "#ff7f0e"}


# ---- the ultralytics model ---------------------------------------------------------------------


def join_head(graph: Any) -> Any:
    """Concat ``boxes`` [B,4,N] and ``scores`` [B,nc,N] into ``output0`` [B,4+nc,N] (the inverse
    of ``host.surgeon.split_head``)."""
    from host.surgeon import split_outputs

    gs = require("onnx_graphsurgeon", "bench")
    boxes, scores = split_outputs(graph, "bench's ultralytics contender",
                                  "re-export the bundle with `jetyolo export`")
    batch, _, anchors = boxes.shape
    output = gs.Variable("output0", dtype=np.float32,
                         shape=[batch, 4 + int(scores.shape[1]), anchors])
    graph.nodes.append(gs.Node("Concat", name="/bench/join_head", attrs={"axis": 1},
                               inputs=[boxes, scores], outputs=[output]))
    graph.outputs = [output]
    return graph


def ultralytics_metadata(bundle: Bundle) -> Dict[str, str]:
    """The metadata_props an ultralytics ONNX export writes, as strings (ultralytics parses them
    with ``ast.literal_eval``)."""
    height, width = bundle.input_size
    return {
        "description": f"jetyolo bench: bundle {bundle.root.name} with its output Concat restored",
        "task": "detect",
        "stride": str(int(bundle.manifest.get("preprocess", {}).get("stride", 32))),
        "batch": "1",
        "imgsz": str([height, width]),
        "names": str(dict(enumerate(bundle.class_names))),
        "channels": "3",
    }


def ultralytics_model_for(bundle: Bundle, path: Path) -> Path:
    """Write the single-output model for the ultralytics contender; check it matches the bundle."""
    from host import surgeon

    model, _ = surgeon.apply_passes(surgeon.load_onnx(bundle.model_path("fp32")), [join_head])
    del model.metadata_props[:]
    for key, value in ultralytics_metadata(bundle).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, model.SerializeToString())
    check_same_outputs(bundle, path)
    return path


def check_same_outputs(bundle: Bundle, joined: Path) -> None:
    """``output0`` of the joined model must equal ``concat(boxes, scores)`` of the bundle's."""
    ort = require("onnxruntime", "bench")
    original = ort.InferenceSession(str(bundle.model_path("fp32")),
                                    providers=["CPUExecutionProvider"])
    rejoined = ort.InferenceSession(str(joined), providers=["CPUExecutionProvider"])
    spec = original.get_inputs()[0]
    feed = {spec.name: np.random.default_rng(0).random(spec.shape, dtype=np.float32)}
    boxes, scores = original.run(["boxes", "scores"], feed)
    (output,) = rejoined.run(["output0"], feed)
    if not np.array_equal(output, np.concatenate([boxes, scores], axis=1)):
        raise JetyoloError(f"bench: {joined} does not compute the bundle's outputs; not comparing")


# ---- facts -------------------------------------------------------------------------------------


def video_frame_count(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise JetyoloError(f"--source {path}: OpenCV cannot open this video")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    if count < 2:
        raise JetyoloError(f"--source {path}: {count} frames; the benchmark needs at least 2")
    return count


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(backend: str) -> Dict[str, Any]:
    versions = {"python": platform.python_version(), **installed_versions(VERSIONED)}
    facts: Dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
        "system": platform.platform(terse=True), "versions": versions, "backend": backend,
    }
    if JETSON_RELEASE.is_file():
        facts["jetson_release"] = JETSON_RELEASE.read_text().splitlines()[0].strip("# ")
    return facts


# ---- Markdown ----------------------------------------------------------------------------------


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _triple(latency: Dict[str, Dict[str, float]], stage: str) -> str:
    values = latency.get(stage)
    if not values:
        return "-"
    return "/".join(f"{values[key]:.1f}" for key in ("p50", "p90", "p99"))


def load_line(report: Dict[str, Any]) -> str:
    cores = report["machine"].get("cores") or 1
    start, end = report["load_average_start"][0], report["load_average_end"][0]
    busy = max(start, end) / cores > LOAD_BUSY
    line = f"load average (1 min) {start:.2f} at start, {end:.2f} at end on {cores} cores"
    if busy:
        line += (" — **the machine was busy with other work: figures are noisy, ratios (taken "
                 "with contenders alternating) are the figures to quote**")
    return line


def contender_rows(record: Dict[str, Any]) -> List[str]:
    rows = ["| contender | frames | s | FPS (median; runs) | pre ms p50/p90/p99 | "
            "infer ms p50/p90/p99 | post ms p50/p90/p99 | frame latency ms p50/p90/p99 ‡ | "
            "pre+post CPU ms/frame | process CPU ms/frame | peak RSS MiB | cold start s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, figures in record["contenders"].items():
        latency = figures.get("latency_ms", {})
        runs = ", ".join(f"{fps:.1f}" for fps in figures.get("fps_per_run", []))
        rows.append(
            f"| {name} | {_frames(figures)} | {_num(figures['seconds'], 2)} | "
            f"**{_num(figures['fps'])}** ({runs}) | {_triple(latency, 'preprocess')} | "
            f"{_triple(latency, 'infer')} | {_triple(latency, 'postprocess')} | "
            f"{_triple(latency, 'total')}{INTERVAL_MARK if name == 'ultralytics' else ''} | "
            f"{_num(figures.get('prepost_cpu_ms_per_frame'), 2)} | "
            f"{_num(figures.get('process_cpu_ms_per_frame'))} | "
            f"{_num(figures.get('peak_rss_mib'), 0)} | {_num(figures.get('cold_start_s'), 2)} |"
        )
    return [*rows, "", LATENCY_NOTE]


def _frames(figures: Dict[str, Any]) -> str:
    """Frames published; on a live camera, of how many it served meanwhile (the rest dropped)."""
    served = figures.get("frames_served")
    return f"{figures['frames']} of {served:.0f} served" if served else str(figures["frames"])


INTERVAL_MARK = " †"
LATENCY_NOTE = (
    "‡ pipeline: frame in hand → published (a file source reads ahead as fast as it can, so this "
    "is mostly queueing: see `--live` for what a camera user feels). † ultralytics' stream mode "
    "exposes no capture time: its figure is the interval between consecutive results (1/FPS), "
    "not a latency."
)


def graphs_line(record: Dict[str, Any]) -> str:
    """Which graph each contender ran: ultralytics reads only the single-output fp32 graph; the
    bundle's split (and uint8) graphs compute the same numbers (export checks), so the FPS
    compare the same model, not the same file."""
    graphs = ", ".join(
        f"{name} `{figures['graph']}`" + (f" ({figures['threading']})" if figures.get("threading")
                                          else "")
        for name, figures in record["contenders"].items() if figures.get("graph"))
    return (f"Graphs: {graphs}. ultralytics reads only a single-output graph; the bundle's "
            "graphs compute the same outputs (export's parity check), so this compares the same "
            "model and thresholds, not the same file.")


def cpu_lines(record: Dict[str, Any]) -> List[str]:
    """Where the pipeline's CPU per frame goes, against the ceiling's process CPU (all of it the
    call); empty when the figures are missing (an older result, or a multi-thread ORT session)."""
    ceiling = record["contenders"].get("ceiling", {})
    pipeline = record["contenders"].get("pipeline", {})
    figures = (pipeline.get("process_cpu_ms_per_frame"), pipeline.get("infer_cpu_ms_per_frame"),
               pipeline.get("prepost_cpu_ms_per_frame"), ceiling.get("decode_cpu_ms_per_frame"),
               ceiling.get("process_cpu_ms_per_frame"))
    if any(figure is None for figure in figures):
        return []
    total, infer, prepost, decode, alone = (float(figure) for figure in figures)
    rest = total - infer - prepost - decode
    return [f"CPU ms per frame (medians): the ceiling's call alone {alone:.1f}; the pipeline "
            f"{total:.1f} = inference {infer:.1f} + decode {decode:.1f} (measured alone, in the "
            f"ceiling's process) + pre+post {prepost:.2f} + threads, queues and the sink "
            f"{rest:.1f}.", ""]


def target_rows(record: Dict[str, Any]) -> List[str]:
    rows = ["| ratio | value | target | result |", "|---|---|---|---|"]
    for check in record["targets"]:
        rows.append(f"| {check['label']} | {_num(check['value'], 3)} | "
                    f"{check['op']} {check['bound']} | **{check['status']}** |")
    bound = fps_bound(record["contenders"])
    if bound is not None:
        rows.append(f"| ceiling FPS / ultralytics FPS (the most the pipeline can reach against "
                    f"ultralytics on this backend) | {bound:.2f} | - | info |")
    if record.get("decode_bound") is not None:
        rows.append("| the most pipeline FPS / ceiling FPS can be while the decode and pre+post "
                    "share the call's cores (cores / (ceiling + decode + pre+post CPU per frame) "
                    f"/ ceiling FPS) | {record['decode_bound']:.2f} | - | info |")
    return rows


def fps_bound(contenders: Dict[str, Dict[str, Any]]) -> Optional[float]:
    """A pipeline cannot outrun its own backend call: ceiling/ultralytics bounds the FPS ratio."""
    ceiling = contenders.get("ceiling", {}).get("fps")
    ultralytics = contenders.get("ultralytics", {}).get("fps")
    return ceiling / ultralytics if ceiling and ultralytics else None


def profile_rows(profile: Dict[str, Any]) -> List[str]:
    threads = ", ".join(f"{name} {ms:.1f}" for name, ms in
                        sorted(profile.get("cpu_ms_per_frame_by_thread", {}).items(),
                               key=lambda item: -item[1]))
    rows = [f"Profile (one extra pipeline run under cProfile, CPU time; "
            f"{profile.get('fps_under_profiler', 0):.1f} FPS while profiled). Python-visible CPU "
            f"ms per frame by thread: {threads}.", "",
            "| function (own CPU time) | calls | own ms/frame | cumulative ms/frame |",
            "|---|---|---|---|"]
    for entry in profile.get("top_functions", [])[:10]:
        rows.append(f"| `{entry['function']}` | {entry['calls']} | "
                    f"{entry['own_ms_per_frame']:.2f} | {entry['cumulative_ms_per_frame']:.2f} |")
    return rows


def trtexec_rows(figures: Optional[Dict[str, Any]]) -> List[str]:
    if not figures:
        return ["trtexec: not on PATH, not run."]
    if "error" in figures:
        return [f"trtexec: {figures['error']} (`{figures['command']}`)"]
    gpu = figures.get("gpu_compute_time_ms", {})
    return [f"trtexec (`{figures['command']}`): {figures['throughput_qps']:.1f} qps, GPU compute "
            f"median {gpu.get('median', float('nan')):.2f} ms."]


def threads_text(settings: Dict[str, Any]) -> str:
    threads = settings.get("threads")
    return "threads: each contender's default" if threads is None else f"{threads} threads"


def markdown(report: Dict[str, Any]) -> str:
    machine = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    settings = report["settings"]
    lines = [
        f"## jetyolo bench, {report['date']} ({settings['backend']}, "
        f"{threads_text(settings)})", "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['arch']}, "
        f"{machine['system']}" + (f", {machine['jetson_release']}" if "jetson_release" in machine
                                  else ""),
        f"- Versions: {versions}",
        f"- Command: `{report['command']}`",
        f"- Video: `{Path(settings['source']).name}`, {settings['frames']} frames per run, "
        f"{settings['runs']} run(s) per contender, contenders alternating; FPS = results after "
        "the first / seconds from first to last result (start-up is in cold start); stage "
        "percentiles pooled over runs; cold start = process start to first result.",
        f"- {load_line(report)}",
    ]
    if report.get("note"):
        lines.append(f"- Note: {report['note']}")
    if report.get("plot"):
        lines.append(f"- Plot: `{report['plot']}`")
    for record in report["bundles"]:
        height, width = record["input_size"]
        lines += ["", f"### {record['bundle']} ({width}x{height}, batch 1)", ""]
        lines += [*contender_rows(record), "", graphs_line(record), "", *cpu_lines(record),
                  *target_rows(record)]
        if record.get("profile"):
            lines += ["", *profile_rows(record["profile"])]
        if "trtexec" in record:
            lines += ["", *trtexec_rows(record["trtexec"])]
    return "\n".join(lines) + "\n"


# ---- plot --------------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None (logged) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("bench: matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    return plt


def save_figure(plt: Any, figure: Any, path: Path, dpi: int) -> None:
    """Lay out, write to a temporary name beside ``path``, then rename (never a partial PNG)."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=dpi)
    plt.close(figure)
    os.replace(temporary, path)


def write_plot(report: Dict[str, Any], path: Path) -> bool:
    """Per-stage latency box plots and FPS bars, one row per bundle; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    records = report["bundles"]
    figure, axes = plt.subplots(len(records), 2, figsize=(13, 4.2 * len(records)), squeeze=False,
                                gridspec_kw={"width_ratios": [3, 1]})
    for row, record in zip(axes, records):
        _latency_boxes(row[0], record)
        _fps_bars(row[1], record)
    load = report.get("load_average_start", [0.0])[0]
    figure.suptitle(f"jetyolo bench {report['date'][:10]}: {report['machine']['cpu']}, "
                    f"{report['machine']['cores']} cores (load {load:.1f} at start), "
                    f"{threads_text(report['settings'])}, {report['settings']['backend']}")
    save_figure(plt, figure, path, dpi=90)
    return True


def _latency_boxes(axis: Any, record: Dict[str, Any]) -> None:
    data, positions, colors = [], [], []
    names = list(record["samples_ms"])
    width = 0.8 / max(len(names), 1)
    for stage_index, stage in enumerate(PLOT_STAGES):
        for offset, name in enumerate(names):
            samples = record["samples_ms"][name].get(stage)
            if samples:
                data.append(samples)
                positions.append(stage_index + (offset - (len(names) - 1) / 2) * width)
                colors.append(COLORS.get(name, "#2ca02c"))
    boxes = axis.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True,
                         showfliers=False, whis=(1, 99))
    for patch, color in zip(boxes["boxes"], colors):
        patch.set_facecolor(color)
    axis.set_xticks(range(len(PLOT_STAGES)), PLOT_STAGES)
    axis.set_xlabel("total: pipeline = frame in hand -> published (a file source reads ahead, so "
                    "mostly queueing); ultralytics = gap between results", fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel("ms per frame (whiskers p1-p99)")
    axis.set_title(f"{record['bundle']}: per-stage latency")
    axis.legend([plt_patch(COLORS.get(n, "#2ca02c")) for n in names], names, loc="upper left")


def plt_patch(color: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color)


def _fps_bars(axis: Any, record: Dict[str, Any]) -> None:
    names = list(record["contenders"])
    values = [record["contenders"][name]["fps"] or 0.0 for name in names]
    bars = axis.bar(names, values, color=[COLORS.get(name, "#2ca02c") for name in names])
    axis.bar_label(bars, fmt="%.1f")
    axis.set_ylabel("FPS (median of runs)")
    axis.set_title(f"{record['bundle']}: throughput")
