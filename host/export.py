"""Export a trained YOLO11 .pt to a bundle: ONNX (static shape), graph-surgeon fixes, parity check
against the PyTorch model, manifest with hashes. The bundle is written atomically; on any error
(including parity over tolerance) nothing is written. See docs/export.md."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from device import argtypes
from device.bundle import SCHEMA_VERSION, Bundle, write_new_bundle
from device.errors import JetyoloError
from device.files import check_output_dir, replace_dir, sha256_file
from device.postprocess import PostprocessConfig
from device.preprocess import FRAME_INPUT
from host import fp16, parity, surgeon
from host._env import require
from host.reference import DEFAULT_NUM as REFERENCE_NUM
from host.reference import make_reference, select_images
from host.train import load_detect_model

log = logging.getLogger(__name__)
BASE_PASSES = (surgeon.fold_constants, surgeon.remove_identity, surgeon.split_head)
PARITY_IMAGES = 16
FRAME_MIN_AGREEMENT = 0.99  # letterbox in the graph vs on the CPU, at the detection level
MAX_BATCH = 64
BATCH_ROWS_ATOL = 1e-4  # row i of a batch-N call vs the same image alone (kernels may differ)
UINT8_ATOL = 1e-6  # the uint8 graph must compute what the fp32 one does on the device's float input
Size = Tuple[int, int]  # (height, width) of the model input


def input_size(imgsz: Union[int, Sequence[int]]) -> Size:
    """``640`` -> (640, 640); ``(384, 640)`` -> (384, 640): the model input as (height, width)."""
    if isinstance(imgsz, int):
        return (imgsz, imgsz)
    height, width = imgsz
    return (int(height), int(width))


def parse_imgsz(text: str) -> Size:
    """``--imgsz`` as the CLI takes it: ``640`` (square) or ``H,W`` (e.g. ``384,640``)."""
    parts = text.split(",")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; give one side (640) or height,width (384,640)"
        )
    return input_size(sides[0] if len(sides) == 1 else (sides[0], sides[1]))


def parse_frame_size(text: str) -> Size:
    """``--source-size WxH`` (the camera's frame, width first as cameras state it) as (w, h)."""
    return argtypes.frame_size(text)


def rectangle_for(frame_size: Size, side: int, stride: int) -> Size:
    """The smallest (h, w) input, each a multiple of ``stride``, that holds a ``frame_size``
    (w, h) frame scaled so its long side is ``side`` — what ultralytics' ``.pt`` predict pads
    to, fixed once for a static engine."""
    scale = side / max(frame_size)
    width, height = (max(stride, -(-round(length * scale) // stride) * stride)
                     for length in frame_size)
    return (height, width)


def fitted_input(frame_size: Size, imgsz: Size, stride: int) -> Size:
    """``--source-size``: the rectangle for the camera's frames, said out loud."""
    chosen = rectangle_for(frame_size, max(imgsz), stride)
    saved = 1 - chosen[0] * chosen[1] / max(imgsz) ** 2
    log.info("export: input %dx%d (HxW) for %dx%d frames: %.0f%% fewer pixels than %dx%d",
             *chosen, *frame_size, 100 * saved, max(imgsz), max(imgsz))
    return chosen


HEADS = ("one2many", "end2end")
# Measured on the YOLO26n fixture (docs/export.md, "Families and heads"): see DEFAULT_HEAD's why.
DEFAULT_HEAD = "one2many"
# The device's decoder per head (device.postprocess.CONTRACTS) and its manifest description.
HEAD_CONTRACTS = {"one2many": "split_head", "end2end": "end2end"}
FAMILY_PATTERN = re.compile(r"(yolov?\d+)", re.IGNORECASE)


def ultralytics_onnx(
    weights: Path, workdir: Path, imgsz: Size, batch: int, opset: int, head: str = DEFAULT_HEAD
) -> Path:
    """Plain ultralytics ONNX export, written in ``workdir``, not beside the .pt (of a copy of
    ``weights`` loaded there: ultralytics writes beside the model file). Batch 1: static shape.
    Batch N > 1: ultralytics' ``dynamic=True`` (batch, height, width symbolic, every reshape
    computed from the input's shape rather than baked), then height and width pinned again
    (``surgeon.pin_spatial``): only dim 0 stays symbolic. A static batch-N export bakes N into
    its reshape constants, so it could not run fewer rows.
    ``nms=False`` is ultralytics' switch to the NMS-free one-to-one head, ``None`` its default
    one-to-many head (ultralytics cfg/default.yaml, exporter: ``end2end = nms is False``)."""
    copied = workdir / weights.name
    shutil.copyfile(weights, copied)
    yolo = load_detect_model(str(copied), "export")
    exported = Path(yolo.export(
        format="onnx", imgsz=list(imgsz), batch=batch, opset=opset, dynamic=batch > 1,
        simplify=True, nms=False if head == "end2end" else None,
    ))
    if batch > 1:
        pinned = surgeon.pin_spatial(surgeon.load_onnx(exported), *imgsz)
        require("onnx", "export").save(pinned, str(exported))
    return exported


def model_family(yolo: Any) -> str:
    """``yolov8``, ``yolo11``, ``yolo12``, ``yolo26``... from the yaml the model was built from."""
    yaml = getattr(yolo.model, "yaml", None) or {}
    match = FAMILY_PATTERN.search(str(yaml.get("yaml_file", "")))
    return match.group(1).lower() if match else "unknown"


def has_end2end_head(yolo: Any) -> bool:
    return getattr(yolo.model.model[-1], "one2one_cv2", None) is not None


def check_head(yolo: Any, head: str, weights: Path) -> None:
    if head not in HEADS:
        raise JetyoloError(f"--head {head!r} is not one of {', '.join(HEADS)}")
    if head == "end2end" and not has_end2end_head(yolo):
        raise JetyoloError(
            f"--head end2end: {weights} ({model_family(yolo)}) has no NMS-free one-to-one head; "
            "only YOLO26 (and YOLOv10) models have one: drop --head or pass --head one2many"
        )


def contract_outputs(head: str, classes: int, max_det: int) -> Dict[str, str]:
    """The manifest's description of a variant's outputs for ``head``."""
    if head == "end2end":
        return {
            "det_boxes": f"[B,K,4] float32: x1, y1, x2, y2 in input pixels (K <= {max_det})",
            "det_scores": "[B,K] float32: score of each row, highest first (TopK)",
            "det_classes": "[B,K] float32: class id of each row (whole numbers)",
        }
    return {
        "boxes": "[B,4,N] float32: cx, cy, w, h in input pixels",
        "scores": f"[B,{classes},N] float32: per-class scores after sigmoid",
    }


def build_manifest(
    yolo: Any,
    name: str,
    imgsz: Size,
    batch: int,
    head_nodes: List[str],
    weights: Path,
    passes: List[str],
    opset: int,
    head: str = DEFAULT_HEAD,
) -> Dict[str, Any]:
    torch = require("torch", "export")
    onnx = require("onnx", "export")
    ultralytics = require("ultralytics", "export")
    onnxruntime = require("onnxruntime", "export")
    class_names = [yolo.names[i] for i in range(len(yolo.names))]
    defaults = PostprocessConfig()
    height, width = imgsz
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "family": model_family(yolo),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "class_names": class_names,
        "preprocess": {
            "size": [height, width],
            "stride": int(max(yolo.model.stride)),
            "pad_value": 114,
            "color": "RGB",
            "scale": 1 / 255,
            "letterbox": "center",
        },
        "postprocess": {"conf": defaults.conf, "iou": defaults.iou, "max_det": defaults.max_det},
        "variants": {
            "fp32": {
                "file": "model.onnx",
                "input": {
                    "name": "images",
                    "shape": [batch, 3, height, width],
                    "dtype": "float32",
                    "layout": "NCHW",
                },
                "contract": HEAD_CONTRACTS[head],
                "outputs": contract_outputs(head, len(class_names), defaults.max_det),
                "passes": passes,
            }
        },
        "head": {
            "kind": head,
            "contract": HEAD_CONTRACTS[head],
            "end2end_available": has_end2end_head(yolo),
            "postprocess_nodes": head_nodes,
        },
        "files": {},
        "versions": {
            "ultralytics": ultralytics.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": opset,
        },
        "provenance": {
            "weights": weights.name,
            "weights_sha256": sha256_file(weights),
            "dataset": str(yolo.ckpt.get("train_args", {}).get("data")) if yolo.ckpt else None,
        },
    }


def _load_weights(weights: Path) -> Any:
    if not weights.is_file():
        raise JetyoloError(
            f"weights {weights} do not exist; pass the best.pt `jetyolo train` printed"
        )
    try:
        return load_detect_model(str(weights), "export")
    except JetyoloError as exc:  # ultralytics/torch errors can span many lines: keep the first
        raise JetyoloError(str(exc).strip().splitlines()[0]) from exc


def uint8_variant(fp32: Dict[str, Any], batch: int, imgsz: Size) -> Dict[str, Any]:
    return dict(
        fp32,
        file="model_uint8.onnx",
        passes=[*fp32["passes"], "uint8_input"],
        input={
            "name": "images",
            "shape": [batch, imgsz[0], imgsz[1], 3],
            "dtype": "uint8",
            "layout": "NHWC",
            "color": "RGB",
            "note": "the graph casts, transposes and scales",
        },
    )


def frame_variant(fp32: Dict[str, Any]) -> Dict[str, Any]:
    return dict(
        fp32,
        file="model_frame.onnx",
        passes=[*fp32["passes"], "frame_input"],
        input={
            "name": FRAME_INPUT,
            "shape": [1, "frame_height", "frame_width", 3],
            "dtype": "uint8",
            "layout": "NHWC",
            "color": "BGR",
            "note": "the camera frame as decoded; the graph letterboxes, swaps to RGB and scales. "
                    "TensorRT: the frame size is pinned by the optimisation profile at build time",
        },
    )


def nms_variant(fp32: Dict[str, Any], config: PostprocessConfig) -> Dict[str, Any]:
    m = config.max_det
    return dict(
        fp32,
        file="model_nms.onnx",
        contract="efficient_nms",
        passes=[*fp32["passes"], "efficient_nms"],
        outputs={
            "num_dets": "[B,1] int32: valid detections per image",
            "det_boxes": f"[B,{m},4] float32: x1, y1, x2, y2 in input pixels",
            "det_scores": f"[B,{m}] float32: score of each detection",
            "det_classes": f"[B,{m}] int32: class id of each detection",
        },
        nms={
            "plugin": "EfficientNMS_TRT",
            "score_threshold": config.conf,
            "iou_threshold": config.iou,
            "max_output_boxes": m,
            "class_agnostic": False,
        },
        runtime="TensorRT only (EfficientNMS_TRT plugin); ONNX Runtime cannot run it",
    )


def export_bundle(
    weights: Path,
    out: Path,
    imgsz: Union[int, Size] = 640,
    batch: int = 1,
    opset: int = 17,
    force: bool = False,
    name: Optional[str] = None,
    *,
    uint8_input: bool = False,
    nms: bool = False,
    frame_input: bool = False,
    source_size: Optional[Size] = None,
    data: Optional[Path] = None,
    parity_images: int = PARITY_IMAGES,
    tolerance: Optional[parity.Tolerance] = None,
    reference_images: Optional[Path] = None,
    reference_num: int = REFERENCE_NUM,
    head: str = DEFAULT_HEAD,
) -> Bundle:
    """Export ``weights`` to the bundle ``out``; raises JetyoloError (writing nothing) on bad input
    or when the ONNX is not at parity with the PyTorch model."""
    weights, out, imgsz = Path(weights), Path(out), input_size(imgsz)
    check_output_dir(out, force)
    yolo = _load_weights(weights)
    if source_size is not None:
        imgsz = fitted_input(source_size, imgsz, int(max(yolo.model.stride)))
    check_shape_args(yolo, imgsz, batch)
    check_head(yolo, head, weights)
    if frame_input and batch > 1:
        raise JetyoloError(
            f"--frame-input with --batch {batch}: the frame variant takes one camera frame at "
            "the camera's own size, so it is batch 1; export the batch-N bundle without "
            "--frame-input, or a batch-1 bundle with it"
        )
    if nms and head == "end2end":
        raise JetyoloError(
            "--nms appends EfficientNMS_TRT to the one-to-many head; the end2end head is "
            "NMS-free already: drop --nms or pass --head one2many"
        )
    frames, source = parity.frames_for(data, len(yolo.names), parity_images)  # bad --data: fail now
    if reference_images is not None and reference_num:
        select_images(reference_images, reference_num, "--reference-images")  # fail now too
    config = PostprocessConfig()
    beside = existing_parent(out)
    clean_stale_exports(beside)
    work_prefix = f".{out.name}.export-{os.getpid()}."
    with tempfile.TemporaryDirectory(prefix=work_prefix, dir=beside) as tmp:
        workdir = Path(tmp)
        model, applied = fp32_model(weights, workdir, imgsz, batch, opset, head)
        files = {"model.onnx": _save(model, workdir / "model.onnx")}
        head_nodes = surgeon.head_postprocess_nodes(surgeon.import_graph(model))
        manifest = build_manifest(
            yolo, name or out.name, imgsz, batch, head_nodes, weights, applied, opset, head
        )
        manifest["parity"] = checked_parity(
            yolo, files["model.onnx"], frames, source, (batch, imgsz), tolerance, head
        )
        if batch > 1:
            manifest["parity"]["batch_rows"] = checked_batch_rows(
                files["model.onnx"], frames, imgsz, batch
            )
        if uint8_input:
            files["model_uint8.onnx"] = _save(
                _variant(model, surgeon.uint8_input), workdir / "model_uint8.onnx"
            )
            manifest["parity"]["uint8_vs_fp32"] = _check_uint8(files, frames, imgsz, batch)
            manifest["variants"]["uint8"] = uint8_variant(
                manifest["variants"]["fp32"], batch, imgsz
            )
        if frame_input:
            files["model_frame.onnx"] = _save(
                _variant(model, surgeon.frame_input), workdir / "model_frame.onnx"
            )
            manifest["parity"]["frame_vs_cpu_letterbox"] = _check_frame(
                files, frames, imgsz, config
            )
            manifest["variants"]["frame"] = frame_variant(manifest["variants"]["fp32"])
        if nms:
            nms_pass = surgeon.efficient_nms(config.conf, config.iou, config.max_det)
            files["model_nms.onnx"] = _save(_variant(model, nms_pass), workdir / "model_nms.onnx")
            manifest["variants"]["nms"] = nms_variant(manifest["variants"]["fp32"], config)
        _add_fp16(model, head_nodes, files, manifest, frames, (batch, imgsz), workdir)
        reference = _reference_images(frames, workdir, reference_images) if reference_num else None
        bundle = _write(out, files, manifest, force, reference, reference_num)
    log.info("export: bundle written to %s", out)
    return bundle


def _add_fp16(
    model: Any, head_nodes: List[str], files: Dict[str, Path], manifest: Dict[str, Any],
    frames: List[Any], shape: Tuple[int, Size], workdir: Path,
) -> None:
    """The fp16 variant (host/fp16.py), at parity with fp32 on ONNX Runtime or not written.
    Split-head graphs only for now: the parity check decodes boxes/scores."""
    batch, imgsz = shape
    if sorted(manifest["variants"]["fp32"]["outputs"]) != ["boxes", "scores"]:
        log.info("export: no fp16 variant for the %s head (only the split boxes/scores head)",
                 sorted(manifest["variants"]["fp32"]["outputs"]))
        return
    log.info("export: variant float16 (head post-processing in float32)")
    path = _save(fp16.fp16_model(model, head_nodes), workdir / fp16.FP16_FILE)
    files[fp16.FP16_FILE] = path
    manifest["parity"]["fp16_vs_fp32"] = fp16.checked_fp16(
        files["model.onnx"], path, frames, imgsz, batch
    )
    manifest["variants"]["fp16"] = fp16.fp16_variant(manifest["variants"]["fp32"])


def _reference_images(
    frames: List[Any], workdir: Path, reference_images: Optional[Path]
) -> Union[Path, List[Path]]:
    """Images for the bundle's reference: the user's folder, else the parity frames as PNG
    (lossless, so the reference sees exactly the pixels parity saw)."""
    if reference_images is not None:
        return reference_images
    import cv2

    folder = workdir / "reference-images"
    folder.mkdir()
    paths = []
    for index, frame in enumerate(frames):
        path = folder / f"frame_{index:03d}.png"
        cv2.imwrite(str(path), frame)
        paths.append(path)
    return paths


def checked_parity(
    yolo: Any,
    onnx_path: Path,
    frames: List[Any],
    source: str,
    shape: Tuple[int, Size],
    tolerance: Optional[parity.Tolerance],
    head: str = DEFAULT_HEAD,
) -> Dict[str, Any]:
    """The parity record for the manifest; over tolerance, logs the figures and raises.
    ``shape`` is (batch, (height, width))."""
    log.info("export: parity with the PyTorch model (%s head)", head)
    batch, imgsz = shape
    if has_end2end_head(yolo):
        yolo.model.model[-1].end2end = head == "end2end"  # what ultralytics' exporter sets
    report = parity.compare(yolo.model, onnx_path, frames, imgsz, source, tolerance,
                            PostprocessConfig(), batch, HEAD_CONTRACTS[head])
    for line in report.lines() if report.problems else []:
        log.warning(line)
    parity.check(report)
    return report.as_manifest()


def check_shape_args(yolo: Any, imgsz: Size, batch: int) -> None:
    """ultralytics would silently round --imgsz up to the stride; the manifest must not lie."""
    stride = int(max(yolo.model.stride))
    for side in imgsz:
        if side < stride or side % stride:
            raise JetyoloError(
                f"--imgsz {side} is not a multiple of the model stride {stride}; "
                f"use e.g. {max(stride, round(side / stride) * stride)}"
            )
    if batch < 1:
        raise JetyoloError(f"--batch must be at least 1, got {batch}")
    if batch > MAX_BATCH:
        raise JetyoloError(f"--batch {batch} is more than {MAX_BATCH}; one engine call rarely "
                           "serves more cameras than that: export --batch 4 or 8")


def fp32_model(
    weights: Path, workdir: Path, imgsz: Size, batch: int, opset: int, head: str = DEFAULT_HEAD
) -> Tuple[Any, List[str]]:
    """ultralytics' export, checked to have the asked-for input, then the base passes."""
    log.info("export: ultralytics ONNX export of %s at %dx%d (HxW), opset %d, %s head",
             weights, *imgsz, opset, head)
    try:
        exported = ultralytics_onnx(weights, workdir, imgsz, batch, opset, head)
    except Exception as exc:  # ultralytics raises many types; keep its first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise JetyoloError(
            f"ultralytics ONNX export of {weights} failed "
            f"({type(exc).__name__}: {first}); check --opset and --imgsz"
        ) from exc
    raw = surgeon.load_onnx(exported)
    shape = [d.dim_value or d.dim_param for d in raw.graph.input[0].type.tensor_type.shape.dim]
    wanted = [batch if batch == 1 else surgeon.BATCH_DIM, 3, *imgsz]
    if shape != wanted:
        raise JetyoloError(f"ultralytics exported input {shape}, asked for {wanted}")
    log.info("export: graph-surgeon passes")
    model, applied = surgeon.apply_passes(raw, BASE_PASSES)
    return model, applied


def _save(model: Any, path: Path) -> Path:
    require("onnx", "export").save(model, str(path))
    return path


# What an export leaves beside --out while it works (its pid in the name): the staging bundle
# `.OUT.export-PID`, its write_new_bundle temp `..OUT.export-PID.XXXX` and the work folder
# `.OUT.export-PID.XXXX`. A killed export leaves them behind; the next one removes them.
STALE_EXPORT = re.compile(r"^\.+.+\.export-(?P<pid>\d+)(\..+)?$")


def existing_parent(out: Path) -> Path:
    """The folder ``out`` will be renamed into, or its nearest existing ancestor: temporary files
    go there (same filesystem as --out, so the final rename is atomic; not /tmp)."""
    parent = out.resolve().parent
    while not parent.is_dir():
        parent = parent.parent
    return parent


def clean_stale_exports(folder: Path) -> List[Path]:
    """Remove the temporary folders of exports that were killed: ours by name and owner, and
    only when the pid in the name is no longer running. Returns what was removed."""
    removed = []
    for path in folder.iterdir():
        match = STALE_EXPORT.match(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        if path.stat().st_uid != os.getuid() or _pid_running(int(match["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("export: removed %s, left by a killed export (pid %s)", path, match["pid"])
        removed.append(path)
    return removed


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True


def _variant(model: Any, graph_pass: surgeon.GraphPass) -> Any:
    log.info("export: variant %s", graph_pass.__name__)
    return surgeon.apply_passes(model, [graph_pass])[0]


def _write(
    out: Path,
    files: Dict[str, Path],
    manifest: Dict[str, Any],
    force: bool,
    reference: Optional[Union[Path, List[Path]]],
    reference_num: int,
) -> Bundle:
    """Write the bundle beside ``out``, record its reference there, then rename it into place:
    a failure at any step leaves ``out`` as it was."""
    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        bundle = write_new_bundle(staging, files, manifest, force=False)
        if reference is not None:
            bundle = make_reference(bundle, reference, num=reference_num)
        if force and out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
            log.warning("export: --force replaces %s, which was not a bundle", out)
        replace_dir(staging, out)
    except OSError as exc:
        raise JetyoloError(
            f"cannot write the bundle {out} ({exc}); choose a writable --out with free space"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Bundle(out, bundle.manifest)


def checked_batch_rows(
    onnx_path: Path, frames: List[Any], imgsz: Size, batch: int
) -> Dict[str, Any]:
    """A batch-N graph must run any 1..N rows, each row as if alone (``parity.batch_rows``);
    a constant that baked the batch would fail here, before anything is written."""
    worst = parity.batch_rows(onnx_path, frames, imgsz, batch)
    log.info("  batch rows 1..%d vs each image alone: max abs %.3g", batch, worst)
    if worst > BATCH_ROWS_ATOL:
        raise JetyoloError(
            f"the batch-{batch} model gives a row {worst:.3g} away from the same image run "
            f"alone (> {BATCH_ROWS_ATOL:g}); nothing was written"
        )
    return {"rows": list(range(1, batch + 1)), "max_abs": worst}


def _check_uint8(
    files: Dict[str, Path], frames: List[Any], imgsz: Size, batch: int
) -> Dict[str, float]:
    worst = parity.uint8_difference(
        files["model.onnx"], files["model_uint8.onnx"], frames, imgsz, batch
    )
    log.info("  uint8 input vs fp32 input: %s",
             ", ".join(f"{name} max abs {value:.3g}" for name, value in worst.items()))
    if max(worst.values()) > UINT8_ATOL:
        raise JetyoloError(
            f"the uint8-input variant differs from the fp32 model by {max(worst.values()):.3g} "
            f"(> {UINT8_ATOL:g}); nothing was written"
        )
    return worst


def _check_frame(
    files: Dict[str, Path], frames: List[Any], imgsz: Size, config: PostprocessConfig
) -> Dict[str, Any]:
    record = parity.frame_difference(
        files["model.onnx"], files["model_frame.onnx"], frames, imgsz, config
    )
    log.info(
        "  frame input (letterbox in the graph) vs CPU letterbox: agreement %.4f, boxes %.2f px",
        record["agreement"], record["max_box_px"],
    )
    if record["agreement"] < FRAME_MIN_AGREEMENT:
        raise JetyoloError(
            f"the frame-input variant agrees with the CPU letterbox on only "
            f"{record['agreement']:.4f} of detections (< {FRAME_MIN_AGREEMENT}); "
            "nothing was written"
        )
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="trained ultralytics detect model (.pt)")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    parser.add_argument(
        "--imgsz",
        type=parse_imgsz,
        default=(640, 640),
        help="model input: one side for a square (640) or HEIGHT,WIDTH for a rectangle "
             "(384,640), each a multiple of the stride (default 640)",
    )
    parser.add_argument(
        "--source-size",
        type=parse_frame_size,
        help="the camera's frame WIDTHxHEIGHT (e.g. 1920x1080): the input becomes the smallest "
             "stride-aligned rectangle of that aspect whose long side is --imgsz's",
    )
    parser.add_argument(
        "--batch", type=int, default=1,
        help="most frames per engine call (default 1, fully static); N > 1 makes dim 0 "
             "symbolic, so a call may carry 1..N frames (several cameras, one engine)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--name", help="bundle name (default: the --out folder name)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--head",
        choices=HEADS,
        default=DEFAULT_HEAD,
        help="YOLO26: one2many (boxes + scores, NMS on the device; works with every TensorRT "
        "INT8 path) or end2end (NMS-free top-300 rows, confidence threshold only); "
        f"default {DEFAULT_HEAD} (docs/export.md)",
    )
    parser.add_argument(
        "--uint8-input",
        action="store_true",
        help="also write model_uint8.onnx: uint8 NHWC RGB input, cast/scale in the graph",
    )
    parser.add_argument(
        "--frame-input",
        action="store_true",
        help="also write model_frame.onnx: the camera frame (uint8 BGR, any size) in, the "
             "letterbox done in the graph (on the GPU under TensorRT)",
    )
    parser.add_argument(
        "--nms",
        action="store_true",
        help="also write model_nms.onnx with TensorRT's EfficientNMS_TRT appended",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="data.yaml whose val images the parity check uses (default: synthetic frames)",
    )
    parser.add_argument(
        "--parity-images",
        type=int,
        default=PARITY_IMAGES,
        help=f"images for the parity check (default {PARITY_IMAGES})",
    )
    parser.add_argument(
        "--reference-images",
        type=Path,
        help="folder of images for the bundle's polygraphy reference (default: the parity images)",
    )
    parser.add_argument(
        "--reference-num",
        type=int,
        default=REFERENCE_NUM,
        help=f"reference images to record; 0 writes no reference (default {REFERENCE_NUM})",
    )


def run(args: argparse.Namespace) -> int:
    if args.parity_images < 1:
        raise JetyoloError("--parity-images must be at least 1")
    if args.reference_num < 0:
        raise JetyoloError("--reference-num must be 0 (no reference) or more")
    bundle = export_bundle(
        args.weights,
        args.out,
        args.imgsz,
        args.batch,
        args.opset,
        args.force,
        args.name,
        uint8_input=args.uint8_input,
        nms=args.nms,
        frame_input=args.frame_input,
        source_size=args.source_size,
        data=args.data,
        parity_images=args.parity_images,
        reference_images=args.reference_images,
        reference_num=args.reference_num,
        head=args.head,
    )
    for line in parity.report_lines(bundle.manifest["parity"]):
        print(line)
    variants = ", ".join(bundle.manifest["variants"])
    print(f"bundle: {bundle.root} (model {bundle.model_id}; variants {variants})")
    return 0
