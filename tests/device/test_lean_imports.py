"""The device runtime stays lean: importing it and running ``jetyolo run`` on the CPU backend
loads no torch, ultralytics, onnx, onnx-graphsurgeon or host code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "torchvision", "ultralytics", "onnx", "onnx_graphsurgeon", "host")


def forbidden_modules(names: List[str]) -> List[str]:
    """Modules in ``names`` that are, or live inside, a forbidden package."""
    return sorted(n for n in names if n.split(".")[0] in FORBIDDEN)


def loaded_modules(code: str) -> List[str]:
    """``sys.modules`` after running ``code`` in a fresh interpreter (its last stdout line)."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_jetyolo_run_on_the_cpu_backend_imports_nothing_heavy(
    bundle_dir: Path, synth_video: Path, tmp_path: Path
) -> None:
    argv = [
        "run",
        str(bundle_dir),
        "--source",
        str(synth_video),
        "--backend",
        "onnxruntime",
        "--max-frames",
        "3",
        "--sink",
        f"jsonl:{tmp_path / 'out.jsonl'}",
        "--spool-dir",
        str(tmp_path / "spool"),
    ]
    code = (
        "import device, device.backends, device.pipeline, device.run, device.sources\n"
        "from device.cli import main\n"
        f"assert main({argv!r}) == 0\n"
    )
    modules = loaded_modules(code)
    assert "onnxruntime" in modules and "device.pipeline" in modules  # it really ran
    assert (tmp_path / "out.jsonl").read_text().count('"type":"detections"') == 3
    assert forbidden_modules(modules) == []
    assert "prometheus_client" not in modules  # only with --http (device/ops/extension.py)


def test_the_check_catches_a_heavy_import() -> None:
    modules = loaded_modules("import onnx")
    assert "onnx" in forbidden_modules(modules)
    assert forbidden_modules(["onnxruntime", "onnxruntime.capi", "hosting", "torch.nn"]) == [
        "torch.nn"
    ]
