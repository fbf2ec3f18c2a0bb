"""Model outputs -> ``Detections`` in frame pixels.

Two output contracts (see the bundle manifest's ``outputs``):
- split head (``boxes`` [1, 4, N] xywh in input pixels, ``scores`` [1, nc, N] in [0, 1]):
  confidence pre-filter, class-aware NMS with OpenCV, ``max_det``;
- EfficientNMS (``num_dets``, ``det_boxes`` corners, ``det_scores``, ``det_classes``): NMS was done
  by TensorRT, only the mapping back to frame pixels is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import cv2
import numpy as np

from device.detections import Detections
from device.preprocess import Letterbox


@dataclass(frozen=True)
class PostprocessConfig:
    """Defaults are ultralytics' ``predict`` defaults (conf 0.25, iou 0.7, max_det 300), so that
    ``yolo predict`` and jetyolo agree on the same frames (docs/export.md, "Matching ultralytics")."""

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
    class_id = scores_2d.argmax(axis=0)
    confidence = np.take_along_axis(scores_2d, class_id[None], axis=0)[0]
    keep = confidence > config.conf
    if not keep.any():
        return Detections.empty()
    xywh = boxes[0][:, keep].T.astype(np.float32)  # (k, 4)
    confidence, class_id = confidence[keep], class_id[keep]
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


def postprocess(
    outputs: Mapping[str, np.ndarray], geometry: Letterbox, config: PostprocessConfig
) -> Detections:
    """Decode whichever head the model has, then map boxes back into frame pixels."""
    if "num_dets" in outputs:
        detections = decode_efficient_nms(outputs, config.max_det)
        detections = detections[detections.confidence > config.conf]
    else:
        detections = decode_split_head(outputs["boxes"], outputs["scores"], config)
    if len(detections):
        detections.xyxy = geometry.to_frame(detections.xyxy)
    return detections
