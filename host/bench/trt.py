"""``trtexec --loadEngine`` as the TensorRT ceiling of ``jetyolo bench`` (on a Jetson).

The engine is the plain plan the TensorRT backend cached (``device/engine.py`` writes no header),
so trtexec loads it as is. Its summary lines look like (samples/common/sampleReporting.cpp)::

    [I] Throughput: 412.3 qps
    [I] Latency: min = 2.1 ms, ... mean = 2.3 ms, median = 2.3 ms, percentile(99%) = 2.9 ms
    [I] GPU Compute Time: min = 1.9 ms, max = ..., median = 2.1 ms, percentile(99%) = 2.6 ms
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

TRTEXEC_TIMEOUT_S = 600
SUMMARY_LINES = ("Latency", "End-to-End Host Latency", "Enqueue Time", "H2D Latency",
                 "GPU Compute Time", "D2H Latency")
_THROUGHPUT = re.compile(r"Throughput:\s*([0-9.eE+-]+)\s*qps")
_FIGURE = re.compile(r"(min|max|mean|median|percentile\(\d+(?:\.\d+)?%\))\s*=\s*([0-9.eE+-]+)\s*ms")


def trtexec_command(plan: Path, iterations: int) -> List[str]:
    return ["trtexec", f"--loadEngine={plan}", f"--iterations={iterations}",
            f"--avgRuns={min(iterations, 100)}", "--warmUp=500", "--duration=0",
            "--percentile=99"]


def parse_trtexec(text: str) -> Dict[str, Any]:
    """Throughput (qps) and the min/mean/median/percentile figures (ms) of each summary line."""
    figures: Dict[str, Any] = {}
    throughput = _THROUGHPUT.search(text)
    if throughput:
        figures["throughput_qps"] = float(throughput.group(1))
    for line in text.splitlines():
        for name in SUMMARY_LINES:
            marker = f"] {name}: "
            if marker in line or line.startswith(f"{name}: "):
                values = {key: float(value) for key, value in _FIGURE.findall(line)}
                if values:
                    figures[name.lower().replace(" ", "_").replace("-", "_") + "_ms"] = values
    return figures


def trtexec_figures(
    plan: Path, iterations: int, folder: Path, progress: Callable[[str], None]
) -> Optional[Dict[str, Any]]:
    """Run trtexec on ``plan`` when it is on PATH; None (and a note) when it is not."""
    if shutil.which("trtexec") is None:
        progress("bench: trtexec is not on PATH (JetPack: /usr/src/tensorrt/bin); skipped")
        return None
    command = trtexec_command(plan, iterations)
    progress("bench: " + " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TRTEXEC_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command), "error": f"timed out after {TRTEXEC_TIMEOUT_S} s"}
    (folder / "trtexec.log").write_text(done.stdout + done.stderr)
    figures = parse_trtexec(done.stdout)
    figures["command"] = " ".join(command)
    if done.returncode != 0 or "throughput_qps" not in figures:
        figures["error"] = f"trtexec exit {done.returncode}; see {folder / 'trtexec.log'}"
    return figures
