"""The device NMS (OpenCV's batched NMS inside ``decode_split_head``) keeps exactly the boxes
torchvision's ``batched_nms`` keeps, on random boxes."""

from __future__ import annotations

import numpy as np
import pytest

from device.postprocess import PostprocessConfig, decode_split_head, xywh_to_xyxy

torch = pytest.importorskip("torch")
ops = pytest.importorskip("torchvision.ops")


def random_outputs(seed: int, anchors: int, classes: int) -> tuple:
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0, 320, size=(anchors, 2))
    sizes = rng.uniform(8, 120, size=(anchors, 2))
    boxes = np.concatenate([centers, sizes], axis=1).T[None].astype(np.float32)  # (1, 4, N)
    scores = rng.uniform(0, 1, size=(1, classes, anchors)).astype(np.float32) ** 3
    return boxes, scores


def torchvision_keep(boxes: np.ndarray, scores: np.ndarray, config: PostprocessConfig) -> set:
    class_id = scores[0].argmax(axis=0)
    confidence = scores[0].max(axis=0)
    keep = np.nonzero(confidence > config.conf)[0]
    xyxy = xywh_to_xyxy(boxes[0][:, keep].T.copy())
    kept = ops.batched_nms(
        torch.from_numpy(xyxy),
        torch.from_numpy(confidence[keep]),
        torch.from_numpy(class_id[keep]),
        config.iou,
    )
    kept = kept[: config.max_det].numpy()
    return {(int(class_id[keep][i]), round(float(confidence[keep][i]), 6)) for i in kept}


def device_keep(boxes: np.ndarray, scores: np.ndarray, config: PostprocessConfig) -> set:
    detections = decode_split_head(boxes, scores, config)
    return {
        (int(c), round(float(s), 6)) for c, s in zip(detections.class_id, detections.confidence)
    }


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("iou", [0.3, 0.45, 0.7])
def test_nms_matches_torchvision_on_random_boxes(seed: int, iou: float) -> None:
    boxes, scores = random_outputs(seed, anchors=600, classes=4)
    config = PostprocessConfig(conf=0.25, iou=iou, max_det=300)
    expected = torchvision_keep(boxes, scores, config)
    assert len(expected) > 20  # enough survivors and enough suppression to mean something
    assert device_keep(boxes, scores, config) == expected


def test_the_reference_comparison_fails_for_class_agnostic_nms() -> None:
    # same boxes, but NMS across classes: a different set, which the comparison must notice
    boxes, scores = random_outputs(0, anchors=600, classes=4)
    config = PostprocessConfig(conf=0.25, iou=0.45, max_det=300)
    agnostic = scores.copy()
    agnostic[0] = 0
    agnostic[0, 0] = scores[0].max(axis=0)  # every box in class 0
    assert {s for _, s in device_keep(boxes, agnostic, config)} != {
        s for _, s in torchvision_keep(boxes, scores, config)
    }
