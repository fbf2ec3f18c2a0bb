"""Model outputs -> ``Detections`` in frame pixels.

Three output contracts (the bundle manifest's variant ``contract``), told apart by output names:
- ``split_head`` (``boxes`` [1, 4, N] xywh in input pixels, ``scores`` [1, nc, N] in [0, 1]; the
  one-to-many head of YOLOv8/11/12/26): confidence pre-filter, class-aware NMS with OpenCV,
  ``max_det``;
- ``end2end`` (``det_boxes`` [1, K, 4] corners, ``det_scores`` [1, K], ``det_classes`` [1, K]; the
  NMS-free one-to-one head of YOLO26 after its TopK): confidence threshold only, no NMS;
- ``efficient_nms`` (``num_dets`` and the three ``det_*`` outputs): NMS was done by TensorRT.
Anything else is refused with one line naming the outputs found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np

from device.detections import Detections
from device.errors import JetyoloError
from device.preprocess import Letterbox

SPLIT_HEAD_OUTPUTS = ("boxes", "scores")
END2END_OUTPUTS = ("det_boxes", "det_scores", "det_classes")
EFFICIENT_NMS_OUTPUTS = ("num_dets", *END2END_OUTPUTS)
CONTRACTS = {
    "split_head": SPLIT_HEAD_OUTPUTS,
    "end2end": END2END_OUTPUTS,
    "efficient_nms": EFFICIENT_NMS_OUTPUTS,
}


@dataclass(frozen=True)
class PostprocessConfig:
    """ultralytics' ``predict`` defaults (conf 0.25, iou 0.7, max_det 300), so that ``yolo
    predict`` and jetyolo agree on the same frames (docs/export.md, "Matching ultralytics")."""

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    xyxy = np.empty_like(xywh)
    half_w, half_h = xywh[:, 2] / 2, xywh[:, 3] / 2
    xyxy[:, 0] = xywh[:, 0] - half_w
    xyxy[:, 1] = xywh[:, 1] - half_h
    xyxy[:, 2] = xywh[:, 0] + half_w
    xyxy[:, 3] = xywh[:, 1] + half_h
    return xyxy


def decode_split_head(
    boxes: np.ndarray, scores: np.ndarray, config: PostprocessConfig
) -> Detections:
    """Split-head outputs of one image -> Detections in *input* pixels (before un-letterbox)."""
    scores_2d = scores[0]  # (nc, N)
    # max first, argmax over the few columns that pass: argmax along the short class axis of
    # every anchor cost 10x the max (55 vs 5 us at 320 px, docs/BENCHMARKS.md); same ids and ties
    confidence = scores_2d.max(axis=0)
    keep = np.flatnonzero(confidence > config.conf)
    if not len(keep):
        return Detections.empty()
    xywh = boxes[0][:, keep].T.astype(np.float32)  # (k, 4)
    confidence, class_id = confidence[keep], scores_2d[:, keep].argmax(axis=0)
    top_left_wh = xywh.copy()
    top_left_wh[:, :2] -= xywh[:, 2:] / 2
    # OpenCV's batched NMS beat a vectorised numpy NMS 7-10x here (docs/BENCHMARKS.md).
    indices = cv2.dnn.NMSBoxesBatched(
        top_left_wh.tolist(), confidence.tolist(), class_id.tolist(), config.conf, config.iou
    )
    kept = np.asarray(indices, dtype=np.int64).reshape(-1)
    kept = kept[np.argsort(-confidence[kept], kind="stable")][: config.max_det]
    return Detections(xywh_to_xyxy(xywh[kept]), confidence[kept], class_id[kept])


def decode_efficient_nms(outputs: Mapping[str, np.ndarray], max_det: int) -> Detections:
    """EfficientNMS_TRT outputs of one image -> Detections in input pixels."""
    count = int(np.asarray(outputs["num_dets"]).reshape(-1)[0])
    count = min(count, max_det)
    # Copies: the output arrays are reused by the backend for later frames.
    return Detections(
        np.array(outputs["det_boxes"][0, :count], dtype=np.float32),
        np.array(outputs["det_scores"][0, :count], dtype=np.float32),
        np.array(outputs["det_classes"][0, :count], dtype=np.int32),
    )


def decode_end2end(outputs: Mapping[str, np.ndarray], config: PostprocessConfig) -> Detections:
    """End-to-end (NMS-free) outputs of one image -> Detections in input pixels: the head already
    picked its top K, so only the confidence threshold and ``max_det`` are left (no NMS)."""
    scores = np.asarray(outputs["det_scores"][0], dtype=np.float32).reshape(-1)
    keep = np.flatnonzero(scores > config.conf)
    keep = keep[np.argsort(-scores[keep], kind="stable")][: config.max_det]
    return Detections(
        np.array(outputs["det_boxes"][0].reshape(-1, 4)[keep], dtype=np.float32),
        scores[keep],
        np.rint(np.asarray(outputs["det_classes"][0]).reshape(-1)[keep]).astype(np.int32),
    )


def contract_of(output_names: Iterable[str]) -> str:
    """Which contract these output names are, or one line naming the layout found."""
    names = set(output_names)
    for contract, expected in CONTRACTS.items():
        if names == set(expected):
            return contract
    known = "; ".join(f"{name}: {', '.join(outputs)}" for name, outputs in CONTRACTS.items())
    raise JetyoloError(
        f"model outputs {sorted(names)} are no output layout jetyolo decodes ({known}); "
        "re-export the model with `jetyolo export`"
    )


def model_class_count(output_shapes: Mapping[str, Sequence[Any]]) -> Optional[int]:
    """How many classes the outputs score: dim 1 of split_head's ``scores`` [batch, nc, N];
    None where the outputs do not say (end2end and efficient_nms carry class ids only, or a
    symbolic dim)."""
    scores = output_shapes.get("scores")
    if scores is None or len(scores) != 3 or not isinstance(scores[1], int):
        return None
    return int(scores[1])


def class_count_problem(
    class_names: Sequence[str], output_shapes: Mapping[str, Sequence[Any]]
) -> Optional[str]:
    """What is wrong when the model scores another number of classes than ``class_names``
    names (messages would carry labels "2", "3" or miss classes); None when they agree or the
    outputs do not say. ``bundle verify`` and the run (each backend it activates) ask this."""
    count = model_class_count(output_shapes)
    if count is None or count == len(class_names):
        return None
    return f"the model scores {count} classes, class_names has {len(class_names)}"


def postprocess(
    outputs: Mapping[str, np.ndarray], geometry: Letterbox, config: PostprocessConfig
) -> Detections:
    """Decode whichever head the model has, then map boxes back into frame pixels."""
    contract = contract_of(outputs)
    if contract == "efficient_nms":
        detections = decode_efficient_nms(outputs, config.max_det)
        detections = detections[detections.confidence > config.conf]
    elif contract == "end2end":
        detections = decode_end2end(outputs, config)
    else:
        detections = decode_split_head(outputs["boxes"], outputs["scores"], config)
    if len(detections):
        detections.xyxy = geometry.to_frame(detections.xyxy)
    return detections
