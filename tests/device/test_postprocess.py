"""Decoding model outputs into Detections: thresholds, class-aware NMS, max_det, frame pixels."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pytest

from device.postprocess import (
    PostprocessConfig,
    decode_efficient_nms,
    decode_split_head,
    postprocess,
)
from device.preprocess import Letterbox

NUM_CLASSES = 3
Candidate = Tuple[Tuple[float, float, float, float], int, float]  # (cx, cy, w, h), class, score


def split_head(candidates: List[Candidate], anchors: int = 64) -> Dict[str, np.ndarray]:
    """Split-head outputs whose first anchors hold ``candidates``; the rest score 0.01."""
    boxes = np.zeros((1, 4, anchors), np.float32)
    scores = np.full((1, NUM_CLASSES, anchors), 0.01, np.float32)
    for anchor, (xywh, class_id, score) in enumerate(candidates):
        boxes[0, :, anchor] = xywh
        scores[0, class_id, anchor] = score
    return {"boxes": boxes, "scores": scores}


CONFIG = PostprocessConfig(conf=0.25, iou=0.45, max_det=300)
A = (100.0, 100.0, 40.0, 40.0)
A_SHIFTED = (104.0, 102.0, 40.0, 40.0)  # IoU with A about 0.75
FAR = (250.0, 250.0, 30.0, 30.0)


@pytest.mark.parametrize(
    "candidates, config, expected",
    [
        # overlapping boxes of one class: the higher score survives
        ([(A, 0, 0.9), (A_SHIFTED, 0, 0.8)], CONFIG, [(0, 0.9)]),
        # the same overlap in two classes: NMS is per class, both survive
        ([(A, 0, 0.9), (A_SHIFTED, 1, 0.8)], CONFIG, [(0, 0.9), (1, 0.8)]),
        # below the confidence threshold: gone
        ([(A, 0, 0.2), (FAR, 2, 0.3)], CONFIG, [(2, 0.3)]),
        # a loose IoU threshold keeps the overlapping pair
        (
            [(A, 0, 0.9), (A_SHIFTED, 0, 0.8)],
            PostprocessConfig(0.25, 0.9, 300),
            [(0, 0.9), (0, 0.8)],
        ),
        # max_det keeps the best ones, sorted by score
        (
            [(A, 0, 0.5), (FAR, 1, 0.7), ((50.0, 200.0, 20.0, 20.0), 2, 0.6)],
            PostprocessConfig(0.25, 0.45, 2),
            [(1, 0.7), (2, 0.6)],
        ),
        # nothing above the threshold: empty
        ([], CONFIG, []),
    ],
)
def test_split_head_decoding(
    candidates: List[Candidate], config: PostprocessConfig, expected: List[Tuple[int, float]]
) -> None:
    outputs = split_head(candidates)
    detections = decode_split_head(outputs["boxes"], outputs["scores"], config)
    got = [(int(c), round(float(s), 3)) for c, s in zip(detections.class_id, detections.confidence)]
    assert got == expected


def test_boxes_are_corners_in_frame_pixels() -> None:
    geometry = Letterbox.fit((960, 540), (320, 320))  # scale 1/3, 70 px padding on top
    outputs = split_head([(A, 1, 0.9)])
    detections = postprocess(outputs, geometry, CONFIG)
    x1, y1, x2, y2 = 80.0, 80.0, 120.0, 120.0  # corners of A in input pixels
    expected = [x1 * 3, (y1 - geometry.pad_top) * 3, x2 * 3, (y2 - geometry.pad_top) * 3]
    np.testing.assert_allclose(detections.xyxy[0], expected, atol=1e-3)
    assert geometry.pad_top == 70


def test_efficient_nms_outputs_are_read_and_copied() -> None:
    outputs = {
        "num_dets": np.array([[2]], np.int32),
        "det_boxes": np.array([[[10, 20, 50, 60], [0, 0, 5, 5], [9, 9, 9, 9]]], np.float32),
        "det_scores": np.array([[0.9, 0.2, 0.0]], np.float32),
        "det_classes": np.array([[2, 1, 0]], np.int32),
    }
    detections = decode_efficient_nms(outputs, max_det=300)
    assert len(detections) == 2 and detections.class_id.tolist() == [2, 1]
    outputs["det_scores"][...] = 0  # the backend reuses its output arrays for the next frame
    assert detections.confidence.tolist() == pytest.approx([0.9, 0.2])
    geometry = Letterbox.fit((320, 320), (320, 320))
    filtered = postprocess(
        {**outputs, "det_scores": np.array([[0.9, 0.2, 0.0]], np.float32)}, geometry, CONFIG
    )
    assert filtered.class_id.tolist() == [2]  # the conf threshold applies to NMS outputs too


def end2end_outputs(rows: List[Tuple[Tuple[float, float, float, float], float, int]]) -> dict:
    """YOLO26's one-to-one head after TopK: K rows of corners, score, class id (float)."""
    return {
        "det_boxes": np.array([[box for box, _, _ in rows]], np.float32).reshape(1, -1, 4),
        "det_scores": np.array([[score for _, score, _ in rows]], np.float32),
        "det_classes": np.array([[cls for _, _, cls in rows]], np.float32),
    }


def test_end2end_outputs_are_thresholded_not_suppressed() -> None:
    """Two heavily overlapping boxes of one class both survive (no NMS: the one-to-one head was
    trained not to emit duplicates); boxes are corners already; below conf is dropped."""
    rows = [((10, 10, 50, 50), 0.6, 1), ((11, 11, 51, 51), 0.9, 1), ((0, 0, 5, 5), 0.1, 0)]
    geometry = Letterbox.fit((320, 320), (320, 320))
    detections = postprocess(end2end_outputs(rows), geometry, CONFIG)
    assert detections.class_id.tolist() == [1, 1]
    assert detections.confidence.tolist() == pytest.approx([0.9, 0.6])  # sorted by score
    np.testing.assert_allclose(detections.xyxy, [[11, 11, 51, 51], [10, 10, 50, 50]])
    capped = postprocess(end2end_outputs(rows), geometry, PostprocessConfig(0.25, 0.7, 1))
    assert capped.confidence.tolist() == pytest.approx([0.9])


def test_end2end_boxes_map_back_to_frame_pixels() -> None:
    geometry = Letterbox.fit((960, 540), (320, 320))  # scale 1/3, 70 px padding on top
    detections = postprocess(end2end_outputs([((80, 80, 120, 120), 0.9, 2)]), geometry, CONFIG)
    expected = [240, (80 - 70) * 3, 360, (120 - 70) * 3]
    np.testing.assert_allclose(detections.xyxy[0], expected, atol=1e-3)


def test_unknown_output_layout_is_refused_naming_it() -> None:
    from device.errors import JetyoloError

    geometry = Letterbox.fit((320, 320), (320, 320))
    with pytest.raises(JetyoloError, match=r"model outputs \['output0'\] are no output layout"):
        postprocess({"output0": np.zeros((1, 300, 6), np.float32)}, geometry, CONFIG)


def test_each_box_gets_its_best_class_and_a_tie_goes_to_the_lower_id() -> None:
    # anchor 0: class 2 best; anchor 1: classes 0 and 1 tie at 0.8 -> class 0 (argmax's first)
    outputs = split_head([((50, 50, 20, 20), 2, 0.9), ((200, 200, 20, 20), 1, 0.8)])
    outputs["scores"][0, 0, 1] = 0.8
    outputs["scores"][0, 1, 0] = 0.5  # a runner-up class on anchor 0 does not win
    found = decode_split_head(outputs["boxes"], outputs["scores"], PostprocessConfig())
    assert found.class_id.tolist() == [2, 0]
    assert found.confidence.tolist() == pytest.approx([0.9, 0.8])


def test_split_head_matches_the_argmax_of_every_anchor_on_random_outputs() -> None:
    """The decode takes the max first and the argmax of the passing anchors only: the same
    detections as the argmax of every anchor (the reference here), ties included."""
    rng = np.random.default_rng(3)
    anchors = 400
    boxes = np.stack([rng.uniform(20, 300, anchors), rng.uniform(20, 300, anchors),
                      rng.uniform(5, 60, anchors), rng.uniform(5, 60, anchors)])[None]
    scores = rng.uniform(0, 0.5, (1, NUM_CLASSES, anchors)).round(2)  # rounded: many ties
    scores[0, :, ::7] += 0.45
    boxes, scores = boxes.astype(np.float32), scores.astype(np.float32)
    config = PostprocessConfig(conf=0.3, iou=0.5)
    found = decode_split_head(boxes, scores, config)
    class_id = scores[0].argmax(axis=0)
    confidence = scores[0].max(axis=0)
    keep = confidence > config.conf
    reference = decode_split_head(boxes[:, :, keep], _one_hot(class_id[keep], confidence[keep]),
                                  config)
    assert len(found) > 20
    assert found.class_id.tolist() == reference.class_id.tolist()
    assert np.array_equal(found.xyxy, reference.xyxy)
    assert np.array_equal(found.confidence, reference.confidence)


def _one_hot(class_id: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Scores [1, nc, k] where each anchor scores only its class: no argmax choice left."""
    scores = np.zeros((1, NUM_CLASSES, len(class_id)), np.float32)
    scores[0, class_id, np.arange(len(class_id))] = confidence
    return scores
