"""What the HTTP endpoint costs `jetyolo run`: FPS and CPU per frame with it off, on with
nobody watching, and on with one preview viewer; plus the per-frame cost of its frame observer,
timed in-process.

  python -m host.bench.http BUNDLE --source VIDEO [--runs 5] [--frames N] [--backend tensorrt]

Each run is a fresh `jetyolo run` process over the video (ONNX Runtime by default, JSONL sink
to /dev/null); the three modes alternate within each round, the order rotating per round, so a
busy machine slows them alike. The viewer reads the MJPEG stream for the whole run. Prints the
medians, the ratios to "off", the load before and after (`uptime`) and the command; appends
that as a Markdown section with --append-md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

MODES = ("off", "on, nobody watching", "on, one viewer")
FPS_LINE = re.compile(r"frames (\d+), seconds ([\d.]+), FPS ([\d.]+)")
SERVING = re.compile(r"http: serving http://([\d.]+):(\d+)")


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


class Viewer(threading.Thread):
    """Reads ``/preview/<source>.mjpg`` until the server closes; counts the JPEG parts."""

    def __init__(self, host: str, port: int, source: str) -> None:
        super().__init__(daemon=True)
        self.address, self.path = (host, port), f"/preview/{source}.mjpg"
        self.parts = 0

    def run(self) -> None:
        try:
            connection = http.client.HTTPConnection(*self.address, timeout=30)
            connection.request("GET", self.path)
            response = connection.getresponse()
            while True:
                line = response.fp.readline()
                if not line:
                    return
                if line.startswith(b"Content-Length:"):
                    response.fp.readline()
                    response.fp.read(int(line.split(b":")[1]))
                    self.parts += 1
        except OSError:
            return


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(bundle: Path, video: Path, mode: str, spool: Path,
            frames: Optional[int] = None, backend: str = "onnxruntime"
            ) -> Tuple[float, float, int]:
    """(FPS, CPU ms per frame, preview frames received) of one `jetyolo run` in ``mode``. CPU
    time (user + system of the run's process) resolves small costs on a shared machine, where
    wall-clock FPS swings with the other sessions' load."""
    cpu_before = children_cpu_s()
    command = [sys.executable, "-m", "device.cli", "run", str(bundle), "--source", str(video),
               "--backend", backend, "--sink", "jsonl:/dev/null", "--spool-dir", str(spool)]
    if frames is not None:
        command += ["--max-frames", str(frames)]
    if mode != "off":
        command += ["--http", "127.0.0.1:0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    viewer: Optional[Viewer] = None
    lines = []
    if process.stderr is None:  # Popen was asked for stderr=PIPE
        raise RuntimeError("the run has no stderr pipe")
    for line in process.stderr:
        lines.append(line)
        match = SERVING.search(line)
        if match and mode == "on, one viewer":
            viewer = Viewer(match.group(1), int(match.group(2)), video.stem)
            viewer.start()
    process.wait()
    found = FPS_LINE.search("".join(lines))
    if process.returncode != 0 or found is None:
        raise SystemExit(f"jetyolo run failed ({mode}):\n" + "".join(lines))
    cpu_ms = (children_cpu_s() - cpu_before) * 1000.0 / max(1, int(found.group(1)))
    if viewer is not None:
        viewer.join(5)
    return float(found.group(3)), cpu_ms, viewer.parts if viewer else 0


def observer_cost_us(watched: bool, frames: int = 2000) -> float:
    """Microseconds per frame of the endpoint's frame observer on a 1080p frame with 5 boxes
    (no viewer: histograms and counters only; a viewer: plus handing the frame over)."""
    from device.detections import Detections, FrameResult
    from device.ops.metrics import RunMetrics, RunSnapshot
    from device.ops.preview import PreviewHub

    image = np.zeros((1080, 1920, 3), np.uint8)
    detections = Detections(np.tile(np.array([[10, 10, 200, 200]], np.float32), (5, 1)),
                            np.full(5, 0.9, np.float32), np.zeros(5, np.int32))
    result = FrameResult("cam", 0, 0.0, (1920, 1080), detections,
                         {s: 1.0 for s in ("capture", "preprocess", "infer", "postprocess",
                                           "total")})
    metrics = RunMetrics(lambda: RunSnapshot(), process=False)
    previews = PreviewHub(["a"], max_fps=1e9)
    channel = previews.channel("cam")
    with channel.watching() if watched else contextlib.nullcontext():
        started = time.perf_counter()
        for _ in range(frames):
            metrics.observe(result)
            metrics.observe_batch(1)
            previews.offer(image, result)
        elapsed = time.perf_counter() - started
    return elapsed / frames * 1e6


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frames", type=int, help="stop each run after this many frames")
    parser.add_argument("--backend", default="onnxruntime",
                        help="onnxruntime (default) or tensorrt (on a Jetson)")
    parser.add_argument("--append-md", type=Path)
    args = parser.parse_args(argv)
    load_before = load_average()
    fps: Dict[str, List[float]] = {mode: [] for mode in MODES}
    cpu: Dict[str, List[float]] = {mode: [] for mode in MODES}
    parts: List[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.runs):
            order = MODES[round_index % 3:] + MODES[: round_index % 3]
            for mode in order:
                value, cpu_ms, received = one_run(args.bundle, args.source, mode,
                                                  Path(tmp) / "spool", args.frames,
                                                  args.backend)
                fps[mode].append(value)
                cpu[mode].append(cpu_ms)
                if mode == "on, one viewer":
                    parts.append(received)
                print(f"round {round_index + 1} {mode:<22} FPS {value:6.2f}  "
                      f"CPU {cpu_ms:6.2f} ms/frame", flush=True)
    load_after = load_average()
    idle_us, watched_us = observer_cost_us(False), observer_cost_us(True)
    lines = report(args, fps, cpu, parts, (idle_us, watched_us), (load_before, load_after))
    print("\n".join(lines))
    if args.append_md:
        with args.append_md.open("a", encoding="utf-8") as out:
            out.write("\n" + "\n".join(lines) + "\n")
    return 0


def report(args: argparse.Namespace, fps: Dict[str, List[float]], cpu: Dict[str, List[float]],
           parts: List[int], observer_us: Tuple[float, float], loads: Tuple[str, str]
           ) -> List[str]:
    median_fps = {mode: statistics.median(values) for mode, values in fps.items()}
    median_cpu = {mode: statistics.median(values) for mode, values in cpu.items()}
    rows = [f"| {mode} | {median_fps[mode]:.2f} | {median_fps[mode] / median_fps['off']:.3f} | "
            f"{median_cpu[mode]:.2f} | {median_cpu['off'] / median_cpu[mode]:.3f} | "
            f"{' '.join(f'{v:.1f}' for v in fps[mode])} |" for mode in MODES]
    fps_ratio = median_fps["on, nobody watching"] / median_fps["off"]
    cpu_ratio = median_cpu["off"] / median_cpu["on, nobody watching"]
    return [
        "## HTTP endpoint cost (`jetyolo run --http`)",
        "",
        f"{dt.date.today().isoformat()}, {platform.machine()} {platform.node()}, "
        f"{args.runs} alternating rounds over `{args.source.name}`"
        f"{f' ({args.frames} frames)' if args.frames else ''} ({args.backend}, JSONL sink).",
        f"Load before: `{loads[0]}`; after: `{loads[1]}`.",
        "",
        "| mode | median FPS | FPS × off | median CPU ms/frame | off CPU ÷ this | FPS per run |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Target on, nobody watching ≥ 0.98× off: FPS {fps_ratio:.3f}, CPU {cpu_ratio:.3f} "
        f"({'PASS' if min(fps_ratio, cpu_ratio) >= 0.98 else 'MISS'} on the lower of the two). "
        f"The viewer received {statistics.median(parts) if parts else 0:.0f} preview frames per "
        "run (median; at most http_preview_fps per second).",
        f"Frame observer per frame, in-process: {observer_us[0]:.1f} µs with nobody watching, "
        f"{observer_us[1]:.1f} µs with a viewer (hand-over only; the viewer's thread draws and "
        "encodes).",
        "",
        f"Command: `python -m host.bench.http {args.bundle} --source {args.source} "
        f"--runs {args.runs}{f' --frames {args.frames}' if args.frames else ''}`",
    ]


if __name__ == "__main__":
    sys.exit(main())
