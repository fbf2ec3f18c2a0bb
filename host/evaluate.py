"""Accuracy of a bundle variant on a dataset's val split, the way the device computes detections.

Images go through the device's ``Preprocessor``, the model runs on ONNX Runtime (the device's CPU
backend), boxes come out of ``device.postprocess`` (class-aware NMS, mapped back to image pixels),
and ultralytics' own matching (``DetectionValidator.match_predictions``, IoU 0.50:0.95) and metrics
(``DetMetrics`` / ``ap_per_class``) turn them into mAP50-95 and mAP50. Confidence 0.001, NMS IoU
0.7 and 300 detections per image are ultralytics' ``val`` defaults, so figures compare with
``yolo val``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from device.backends.onnxruntime import OnnxRuntimeBackend
from device.bundle import Bundle
from device.errors import JetyoloError
from device.postprocess import PostprocessConfig, contract_of, postprocess
from device.preprocess import Preprocessor
from host._env import ultralytics_offline

log = logging.getLogger(__name__)

EVAL_CONFIG = PostprocessConfig(conf=0.001, iou=0.7, max_det=300)


@dataclass(frozen=True)
class ValImage:
    image: Path
    boxes: np.ndarray  # (k, 4) x1, y1, x2, y2 in image pixels
    classes: np.ndarray  # (k,) int


@dataclass
class EvalResult:
    variant: str
    map50_95: float
    map50: float
    images: int
    instances: int
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return {key: (round(value, 5) if isinstance(value, float) else value)
                for key, value in asdict(self).items()}

    def line(self) -> str:
        return (f"{self.variant}: mAP50-95 {self.map50_95:.4f}  mAP50 {self.map50:.4f}  "
                f"({self.images} images, {self.instances} boxes, {self.seconds:.1f} s)")


# ---- the val split ------------------------------------------------------------------------------
def val_image_paths(data_yaml: Path) -> Tuple[List[Path], List[str]]:
    """Val images (resolved the way ultralytics and `jetyolo data check` do) and class names."""
    from host.dataset import split_images

    report, images = split_images(data_yaml, ("val",))
    split = report.splits.get("val")
    if split is None or not split.sources:
        report.errors.append("it has no resolvable 'val' split")
    report.raise_if_errors()
    if not images.get("val"):
        raise JetyoloError(f"dataset {data_yaml}: the val split has no images; "
                           f"run `jetyolo data check {data_yaml}`")
    return images["val"], report.names


def read_labels(image: Path, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """YOLO label file of ``image`` (missing = background image) -> (xyxy pixels, class ids).
    A polygon row (a segmentation export) counts as its bounding box, as in ultralytics'
    ``segments2boxes`` and `jetyolo data check`."""
    from host.dataset import img2label_path, row_kind

    label = Path(img2label_path(str(image)))
    rows = []
    for number, line in enumerate(label.read_text().splitlines() if label.is_file() else [], 1):
        values = line.split()
        if not values:
            continue
        try:
            if row_kind(values) == "bad":
                raise ValueError
            rows.append(_normalized_xyxy([float(v) for v in values]))
        except ValueError:
            raise JetyoloError(f"{label}:{number}: expected 'class x y w h' or a polygon "
                               f"'class x1 y1 x2 y2 ...', got {line!r}; run `jetyolo data check`"
                               ) from None
    if not rows:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    table = np.asarray(rows, dtype=np.float32)
    width, height = size
    scale = np.asarray([width, height, width, height], dtype=np.float32)
    return table[:, 1:] * scale, table[:, 0].astype(np.int64)


def _normalized_xyxy(numbers: List[float]) -> List[float]:
    """``[class, x1, y1, x2, y2]`` (normalized) of a box row or a polygon row."""
    if len(numbers) == 5:
        class_id, cx, cy, w, h = numbers
        return [class_id, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    xs, ys = numbers[1::2], numbers[2::2]
    return [numbers[0], min(xs), min(ys), max(xs), max(ys)]


# ---- metrics ------------------------------------------------------------------------------------
class Metrics:
    """ultralytics' detection metrics fed one image at a time."""

    def __init__(self, class_names: Sequence[str], workdir: Path) -> None:
        ultralytics_offline("eval")
        import torch
        from ultralytics.models.yolo.detect import DetectionValidator
        from ultralytics.utils.metrics import DetMetrics, box_iou

        self._torch, self._box_iou = torch, box_iou
        self._validator = DetectionValidator(save_dir=workdir, args={"plots": False})
        self.metrics = DetMetrics(names=dict(enumerate(class_names)))
        self.instances = 0

    def add(self, name: str, boxes: np.ndarray, classes: np.ndarray, pred_xyxy: np.ndarray,
            pred_conf: np.ndarray, pred_cls: np.ndarray) -> None:
        torch, niou = self._torch, int(self._validator.niou)
        self.instances += len(classes)
        if len(classes) and len(pred_cls):
            iou = self._box_iou(torch.from_numpy(boxes.astype(np.float32)),
                                torch.from_numpy(pred_xyxy.astype(np.float32)))
            tp = self._validator.match_predictions(
                torch.from_numpy(pred_cls.astype(np.int64)), torch.from_numpy(classes), iou
            ).numpy()
        else:
            tp = np.zeros((len(pred_cls), niou), dtype=bool)
        self.metrics.update_stats({
            "tp": tp, "conf": pred_conf.astype(np.float32), "pred_cls": pred_cls.astype(np.int64),
            "target_cls": classes, "target_img": np.unique(classes), "im_name": name,
        })

    def result(self, plot_dir: Optional[Path] = None) -> Tuple[float, float]:
        """mAP50-95 and mAP50; with ``plot_dir``, also ultralytics' PR, F1, P and R curves."""
        if plot_dir is not None:
            plot_dir.mkdir(parents=True, exist_ok=True)
            self.metrics.process(save_dir=plot_dir, plot=True)
        else:
            self.metrics.process()
        return float(self.metrics.box.map), float(self.metrics.box.map50)


# ---- evaluation ---------------------------------------------------------------------------------
def evaluate_model(
    model_path: Path,
    bundle: Bundle,
    images: Sequence[Path],
    class_names: Sequence[str],
    variant: str = "fp32",
    config: PostprocessConfig = EVAL_CONFIG,
    plot_dir: Optional[Path] = None,
) -> EvalResult:
    """mAP of the ONNX model at ``model_path`` (a graph with the bundle's input/output contract)."""
    if len(class_names) != len(bundle.class_names):
        raise JetyoloError(f"the dataset has {len(class_names)} classes, the bundle "
                           f"{len(bundle.class_names)} ({bundle.class_names}); evaluate it on "
                           "the dataset it was trained on")
    started = time.perf_counter()
    # a --batch N graph runs 1 row too; an INT8 graph's accuracy is TensorRT's, not that of the
    # CPU's int8 kernels (OnnxRuntimeBackend.qdq_in_float)
    backend = OnnxRuntimeBackend(model_path, max_batch=1, qdq_in_float=True)
    with tempfile.TemporaryDirectory(prefix="jetyolo-eval-") as tmp, backend:
        spec = backend.input_spec
        dtype = "uint8" if spec.dtype == np.uint8 else "float32"
        preprocessor = Preprocessor(bundle.input_size, dtype, buffer=backend.input_buffer)
        metrics = Metrics(class_names, Path(tmp))
        for index, image_path in enumerate(images, 1):
            frame = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
            if frame is None:
                raise JetyoloError(f"{image_path}: OpenCV cannot read this val image; "
                                   "run `jetyolo data check` on the dataset")
            geometry = preprocessor(frame)
            detections = postprocess(backend.infer({spec.name: preprocessor.buffer}),
                                     geometry, config)
            boxes, classes = read_labels(image_path, (frame.shape[1], frame.shape[0]))
            metrics.add(image_path.name, boxes, classes, detections.xyxy,
                        detections.confidence, detections.class_id)
            if index % 50 == 0:
                log.info("eval %s: %d/%d images", variant, index, len(images))
        map50_95, map50 = metrics.result(plot_dir)
    return EvalResult(variant, map50_95, map50, len(images), metrics.instances,
                      time.perf_counter() - started)


def evaluate_bundle(
    bundle: Bundle,
    data_yaml: Path,
    variant: str = "fp32",
    limit: Optional[int] = None,
    plot_dir: Optional[Path] = None,
) -> EvalResult:
    outputs = bundle.variant(variant)["outputs"]  # names the bundle's variants if it lacks this
    if "num_dets" in outputs or contract_of(outputs) == "efficient_nms":
        raise JetyoloError(
            f"variant {variant!r} ends in {sorted(outputs)} (TensorRT's EfficientNMS plugin), "
            "which ONNX Runtime cannot run; evaluate the pre-NMS graphs: fp32, uint8, int8-qdq"
        )
    images, names = val_image_paths(data_yaml)
    if limit is not None:
        images = images[:limit]
    return evaluate_model(
        bundle.model_path(variant), bundle, images, names, variant, plot_dir=plot_dir
    )


# ---- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory (from `jetyolo export`)")
    parser.add_argument("--data", type=Path, required=True, help="data.yaml; its val split is used")
    parser.add_argument("--variant", default="fp32",
                        help="bundle graph to evaluate: fp32 (default), int8-qdq, uint8")
    parser.add_argument("--limit", type=int, help="evaluate only the first N val images")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--plots", type=Path, help="write PR, F1, precision and recall curves (PNG) here"
    )


def run(args: argparse.Namespace) -> int:
    import json

    if args.limit is not None and args.limit < 1:
        raise JetyoloError(f"--limit must be >= 1, got {args.limit}")
    bundle = Bundle.load(args.bundle)
    result = evaluate_bundle(bundle, args.data, args.variant, args.limit, args.plots)
    print(json.dumps(result.to_dict()) if args.json else result.line())
    if args.plots is not None:
        print(f"curves: {args.plots}/BoxPR_curve.png (and F1, P, R)", file=sys.stderr)
    return 0
