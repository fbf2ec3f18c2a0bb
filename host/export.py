"""Export a trained YOLO11 .pt to a bundle: ONNX (static shape), graph-surgeon fixes, parity check
against the PyTorch model, manifest with hashes. The bundle is written atomically."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from device.bundle import SCHEMA_VERSION, Bundle, sha256_file, write_new_bundle
from device.errors import JetyoloError
from device.postprocess import PostprocessConfig
from host import surgeon
from host._env import require
from host.train import load_detect_model

log = logging.getLogger(__name__)
BASE_PASSES = (surgeon.fold_constants, surgeon.remove_identity, surgeon.split_head)


def ultralytics_onnx(yolo: Any, weights: Path, workdir: Path, imgsz: int, batch: int, opset: int) -> Path:
    """Plain ultralytics ONNX export (static shape), written in ``workdir``, not beside the .pt."""
    copied = workdir / weights.name
    shutil.copyfile(weights, copied)
    yolo = load_detect_model(str(copied), "export")
    exported = yolo.export(format="onnx", imgsz=imgsz, batch=batch, opset=opset, dynamic=False, simplify=True)
    return Path(exported)


def build_manifest(
    yolo: Any, name: str, imgsz: int, batch: int, head_nodes: List[str], weights: Path, passes: List[str]
) -> Dict[str, Any]:
    torch = require("torch", "export")
    onnx = require("onnx", "export")
    ultralytics = require("ultralytics", "export")
    class_names = [yolo.names[i] for i in range(len(yolo.names))]
    defaults = PostprocessConfig()
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "class_names": class_names,
        "preprocess": {
            "size": [imgsz, imgsz], "stride": int(max(yolo.model.stride)), "pad_value": 114,
            "color": "RGB", "scale": 1 / 255, "letterbox": "center",
        },
        "postprocess": {"conf": defaults.conf, "iou": defaults.iou, "max_det": defaults.max_det},
        "variants": {
            "fp32": {
                "file": "model.onnx",
                "input": {"name": "images", "shape": [batch, 3, imgsz, imgsz], "dtype": "float32", "layout": "NCHW"},
                "outputs": {
                    "boxes": "[B,4,N] float32: cx, cy, w, h in input pixels",
                    "scores": f"[B,{len(class_names)},N] float32: per-class scores after sigmoid",
                },
                "passes": passes,
            }
        },
        "head": {"postprocess_nodes": head_nodes},
        "files": {},
        "versions": {
            "ultralytics": ultralytics.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__, "opset": None,
        },
        "provenance": {"weights": weights.name, "weights_sha256": sha256_file(weights),
                       "dataset": str(yolo.ckpt.get("train_args", {}).get("data")) if yolo.ckpt else None},
    }


def export_bundle(
    weights: Path,
    out: Path,
    imgsz: int = 640,
    batch: int = 1,
    opset: int = 17,
    force: bool = False,
    name: Optional[str] = None,
) -> Bundle:
    weights, out = Path(weights), Path(out)
    onnx = require("onnx", "export")
    yolo = load_detect_model(str(weights), "export")
    with tempfile.TemporaryDirectory(prefix="jetyolo-export-") as tmp:
        workdir = Path(tmp)
        log.info("export: ultralytics ONNX export of %s at %dx%d, opset %d", weights, imgsz, imgsz, opset)
        raw = onnx.load(str(ultralytics_onnx(yolo, weights, workdir, imgsz, batch, opset)))
        log.info("export: graph-surgeon passes")
        head_nodes = surgeon.head_postprocess_nodes(surgeon.import_graph(raw))
        model, applied = surgeon.apply_passes(raw, BASE_PASSES)
        model_path = workdir / "model.onnx"
        onnx.save(model, str(model_path))
        manifest = build_manifest(yolo, name or out.name, imgsz, batch, head_nodes, weights, applied)
        manifest["versions"]["opset"] = opset
        bundle = write_new_bundle(out, {"model.onnx": model_path}, manifest, force=force)
    log.info("export: bundle written to %s", out)
    return bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="trained ultralytics detect model (.pt)")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--name", help="bundle name (default: the --out folder name)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    if not args.weights.is_file():
        raise JetyoloError(f"weights {args.weights} do not exist; pass the best.pt `jetyolo train` printed")
    bundle = export_bundle(args.weights, args.out, args.imgsz, args.batch, args.opset, args.force, args.name)
    print(f"bundle: {bundle.root} (model {bundle.model_id})")
    return 0
