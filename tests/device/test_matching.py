"""device.matching: pairing, per-image agreement (each failure category), mAP vs reference.

Parity of correct_matrix / ap_per_class / box_iou with ultralytics is in
tests/host/test_reference.py (the device side must not import ultralytics).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import pytest

from device.detections import Detections
from device.matching import (
    box_iou,
    compare_image,
    compute_ap,
    correct_matrix,
    map_vs_reference,
    match_pairs,
)

CONF = 0.25


def dets(*items: Tuple[Sequence[float], float, int]) -> Detections:
    """``dets(([x1, y1, x2, y2], score, class_id), ...)``."""
    if not items:
        return Detections.empty()
    return Detections(
        np.array([box for box, _, _ in items], np.float32),
        np.array([score for _, score, _ in items], np.float32),
        np.array([cls for _, _, cls in items], np.int32),
    )


BOX_A = [10.0, 10.0, 110.0, 110.0]
BOX_B = [200.0, 50.0, 260.0, 150.0]
REFERENCE = dets((BOX_A, 0.9, 0), (BOX_B, 0.6, 1))


def test_box_iou_known_values() -> None:
    half = [60.0, 10.0, 160.0, 110.0]  # shares half of BOX_A's width: IoU 50 / 150
    iou = box_iou(np.array([BOX_A]), np.array([BOX_A, half, BOX_B]))
    np.testing.assert_allclose(iou, [[1.0, 1 / 3, 0.0]], atol=1e-6)
    assert box_iou(np.zeros((0, 4)), np.array([BOX_A])).shape == (0, 1)


def test_pairs_prefer_same_class_on_one_box() -> None:
    # two classes on the same box on both sides must pair class with class, not by index order
    reference = dets((BOX_A, 0.9, 0), (BOX_A, 0.5, 1))
    device = dets((BOX_A, 0.5, 1), (BOX_A, 0.9, 0))
    pairs = {(r, d) for r, d, _ in match_pairs(reference, device, 0.5)}
    assert pairs == {(0, 1), (1, 0)}


@pytest.mark.parametrize(
    "device, expect",
    [
        # identical detections: everything agrees
        (REFERENCE, {"agreed": 2}),
        # class flip on one box
        (dets((BOX_A, 0.9, 0), (BOX_B, 0.6, 2)), {"agreed": 1, "class_mismatch": 1}),
        # one box shifted by 20 px: pairs (IoU 0.67) but misses min IoU 0.9
        (dets((BOX_A, 0.9, 0), ([200, 70, 260, 170], 0.6, 1)), {"agreed": 1, "box_mismatch": 1}),
        # score off by 0.3
        (dets((BOX_A, 0.6, 0), (BOX_B, 0.6, 1)), {"agreed": 1, "score_mismatch": 1}),
        # one reference box absent, one box the reference lacks
        (dets((BOX_A, 0.9, 0), ([300, 300, 400, 400], 0.7, 3)),
         {"agreed": 1, "missing": 1, "extra": 1}),
        # nothing detected at all
        (Detections.empty(), {"agreed": 0, "missing": 2}),
    ],
)
def test_compare_image_categories(device: Detections, expect: dict) -> None:
    result = compare_image(REFERENCE, device, CONF, min_iou=0.9, max_score_delta=0.05)
    counts = {key: getattr(result, key) for key in
              ("agreed", "missing", "extra", "class_mismatch", "box_mismatch", "score_mismatch")}
    assert counts == {**dict.fromkeys(counts, 0), **expect}
    assert result.agreement == pytest.approx(expect["agreed"] / result.judged)


def test_score_just_across_conf_is_a_small_delta_not_a_missing_box() -> None:
    # reference 0.26 (reported), device 0.24 (below conf but above the floor): a 0.02 delta
    reference = dets((BOX_A, 0.26, 0))
    device = dets((BOX_A, 0.24, 0))
    result = compare_image(reference, device, CONF, min_iou=0.9, max_score_delta=0.05)
    assert (result.agreed, result.missing, result.extra) == (1, 0, 0)
    assert result.worst_score_delta == pytest.approx(0.02, abs=1e-6)
    # ... but a larger drop is judged
    strict = compare_image(reference, device, CONF, min_iou=0.9, max_score_delta=0.01)
    assert (strict.agreed, strict.score_mismatch) == (0, 1)


def test_boxes_below_conf_on_both_sides_are_not_judged() -> None:
    reference = dets((BOX_A, 0.9, 0), (BOX_B, 0.1, 1))
    device = dets((BOX_A, 0.9, 0), ([300, 300, 400, 400], 0.12, 2))
    result = compare_image(reference, device, CONF)
    assert (result.judged, result.agreement) == (1, 1.0)
    assert compare_image(Detections.empty(), Detections.empty(), CONF).agreement == 1.0


def test_correct_matrix_by_threshold() -> None:
    truth = np.array([BOX_A, BOX_B], np.float32)
    shifted = [10.0, 20.0, 110.0, 120.0]  # IoU with BOX_A: 90*100 / (2*10000 - 9000) = 0.818
    pred = np.array([BOX_A, shifted, BOX_B], np.float32)
    correct = correct_matrix(truth, np.array([0, 1]), pred, np.array([0, 0, 2]))
    assert correct[0].all()  # exact box, right class
    assert not correct[1].any()  # BOX_A already claimed by the first prediction
    assert not correct[2].any()  # right box, wrong class
    alone = correct_matrix(truth, np.array([0, 1]), pred[1:2], np.array([0]))
    assert alone[0].tolist() == [t <= 0.818 for t in np.linspace(0.5, 0.95, 10)]


def test_compute_ap_perfect_and_empty() -> None:
    assert compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0])) == pytest.approx(0.995, abs=1e-3)
    assert compute_ap(np.array([0.0]), np.array([0.0])) == 0.0


def _many(seed: int, n: int) -> List[Detections]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        xy = rng.uniform(0, 500, (6, 2))
        wh = rng.uniform(60, 120, (6, 2))
        images.append(Detections(np.hstack([xy, xy + wh]), rng.uniform(0.3, 0.95, 6),
                                 rng.integers(0, 3, 6)))
    return images


def test_map_vs_reference_identical_degraded_and_empty() -> None:
    references = _many(0, 4)
    same = map_vs_reference(references, references, CONF)
    assert same["map50_95"] == pytest.approx(0.995, abs=1e-3)
    moved = [Detections(d.xyxy + 8.0, d.confidence, d.class_id) for d in references]
    worse = map_vs_reference(references, moved, CONF)
    assert 0.0 < worse["map50_95"] < 0.9 * same["map50_95"]
    assert worse["map50"] == pytest.approx(same["map50"], abs=0.05)  # IoU still >= 0.6
    nothing = map_vs_reference(references, [Detections.empty()] * 4, CONF)
    assert nothing["map50_95"] == 0.0
    no_truth = map_vs_reference([Detections.empty()], [references[0]], CONF)
    assert no_truth["map50_95"] is None and no_truth["predictions"] == 6
