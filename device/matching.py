"""Detections of a device against reference detections of the same images.

Two measures, both numpy only (the device never imports ultralytics):

- **agreement**: one-to-one matching of device boxes to reference boxes (IoU, same class first),
  then each relevant detection is judged: same class, IoU of at least ``min_iou``, score within
  ``max_score_delta``. A detection is relevant when its score (or its partner's) reaches the
  reporting threshold ``conf``; both sides are decoded down to a lower ``floor`` so that a box
  scoring 0.26 on one side and 0.24 on the other is a small score delta, not a missing box.
- **mAP50-95 of device vs reference**: the reference detections (score >= ``conf``) are the
  ground truth, the device detections (down to ``floor``) the predictions. ``correct_matrix``,
  ``compute_ap`` and ``ap_per_class`` mirror ultralytics 8.4 (``BaseValidator.match_predictions``
  without scipy, ``utils.metrics.compute_ap`` with COCO 101-point interpolation,
  ``utils.metrics.ap_per_class``); tests/host/test_reference.py checks them against ultralytics.
  As in ultralytics, identical detections score 0.995, not 1.0 (the 101-point interpolation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from device.detections import Detections

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
_AP_X = np.linspace(0, 1, 101)
# numpy >= 2 calls it trapezoid; JetPack 5/6 system Pythons ship numpy 1.x (trapz).
_TRAPZ = getattr(np, "trapezoid", None) or getattr(np, "trapz")  # noqa: B009


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (len(a), len(b))."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(1, -1, 4)
    inter_wh = (np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2])).clip(0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return np.asarray(inter / (area_a + area_b - inter + eps))


def match_pairs(
    reference: Detections, device: Detections, min_iou: float
) -> List[Tuple[int, int, float]]:
    """Greedy one-to-one pairs ``(reference_index, device_index, iou)`` with IoU >= ``min_iou``.

    Same-class pairs are taken before cross-class ones, each group by IoU, highest first, so a
    class flip still pairs (and is reported as one) while two classes on one box pair correctly.
    """
    iou = box_iou(reference.xyxy, device.xyxy)
    if iou.size == 0:
        return []
    same_class = reference.class_id[:, None] == device.class_id[None, :]
    priority = np.where(iou >= min_iou, iou + same_class, -1.0)
    order = np.argsort(-priority, axis=None, kind="stable")
    ref_used = np.zeros(len(reference), bool)
    dev_used = np.zeros(len(device), bool)
    pairs = []
    for flat in order:
        r, d = np.unravel_index(flat, priority.shape)
        if priority[r, d] < 0:
            break
        if not ref_used[r] and not dev_used[d]:
            ref_used[r] = dev_used[d] = True
            pairs.append((int(r), int(d), float(iou[r, d])))
    return pairs


@dataclass
class ImageAgreement:
    """How one image's device detections agree with its reference detections."""

    reference: int  # reference detections with score >= conf
    device: int  # device detections with score >= conf
    agreed: int
    missing: int  # reference detections with no device box
    extra: int  # device detections with no reference box
    class_mismatch: int
    box_mismatch: int  # paired, same class, IoU below min_iou
    score_mismatch: int
    worst_iou: float  # lowest IoU among relevant pairs (1.0 when none)
    worst_score_delta: float  # largest |score delta| among relevant pairs

    @property
    def judged(self) -> int:
        disagreed = self.class_mismatch + self.box_mismatch + self.score_mismatch
        return self.agreed + self.missing + self.extra + disagreed

    @property
    def agreement(self) -> float:
        return self.agreed / self.judged if self.judged else 1.0

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), agreement=round(self.agreement, 4))


def _unpaired_above(detections: Detections, paired: set, conf: float) -> int:
    scores = detections.confidence
    return sum(1 for i in range(len(detections)) if i not in paired and scores[i] >= conf)


def compare_image(
    reference: Detections,
    device: Detections,
    conf: float,
    min_iou: float = 0.5,
    max_score_delta: float = 0.05,
    pair_iou: float = 0.5,
) -> ImageAgreement:
    """Judge one image: see the module docstring for what counts as agreement.

    Boxes pair at IoU >= ``pair_iou``; a relevant pair agrees when the classes are equal, the IoU
    reaches ``min_iou`` and the scores differ by at most ``max_score_delta``.
    """
    pairs = match_pairs(reference, device, min(pair_iou, min_iou))
    missing = _unpaired_above(reference, {r for r, _, _ in pairs}, conf)
    extra = _unpaired_above(device, {d for _, d, _ in pairs}, conf)
    agreed = class_mismatch = box_mismatch = score_mismatch = 0
    worst_iou, worst_delta = 1.0, 0.0
    for r, d, iou in pairs:
        ref_score, dev_score = float(reference.confidence[r]), float(device.confidence[d])
        if max(ref_score, dev_score) < conf:
            continue
        delta = abs(ref_score - dev_score)
        worst_iou, worst_delta = min(worst_iou, iou), max(worst_delta, delta)
        if reference.class_id[r] != device.class_id[d]:
            class_mismatch += 1
        elif iou < min_iou:
            box_mismatch += 1
        elif delta > max_score_delta:
            score_mismatch += 1
        else:
            agreed += 1
    return ImageAgreement(
        reference=int((reference.confidence >= conf).sum()),
        device=int((device.confidence >= conf).sum()),
        agreed=agreed,
        missing=missing,
        extra=extra,
        class_mismatch=class_mismatch,
        box_mismatch=box_mismatch,
        score_mismatch=score_mismatch,
        worst_iou=round(worst_iou, 4),
        worst_score_delta=round(worst_delta, 6),
    )


def correct_matrix(
    true_xyxy: np.ndarray,
    true_classes: np.ndarray,
    pred_xyxy: np.ndarray,
    pred_classes: np.ndarray,
    thresholds: np.ndarray = IOU_THRESHOLDS,
) -> np.ndarray:
    """(n_pred, n_thresholds) bool: prediction j is a true positive at threshold t.

    Predictions must be in descending confidence order. Mirrors ultralytics'
    ``BaseValidator.match_predictions(use_scipy=False)``.
    """
    correct = np.zeros((len(pred_classes), len(thresholds)), dtype=bool)
    if len(pred_classes) == 0 or len(true_classes) == 0:
        return correct
    same_class = np.asarray(true_classes)[:, None] == np.asarray(pred_classes)[None, :]
    iou = box_iou(true_xyxy, pred_xyxy) * same_class
    claimed = np.zeros((iou.shape[0], len(thresholds)), dtype=bool)
    columns = np.arange(len(thresholds))
    for j in np.flatnonzero((iou >= thresholds.min()).any(0)):
        available = np.where(claimed, 0, iou[:, j, None])
        best = available.argmax(0)
        correct[j] = available[best, columns] >= thresholds
        claimed[best, columns] |= correct[j]
    return correct


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope, COCO 101-point interpolation (ultralytics' compute_ap)."""
    last = recall[-1] if len(recall) else 1.0
    mrec = np.concatenate(([0.0], recall, [last], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    return float(_TRAPZ(np.interp(_AP_X, mrec, mpre), _AP_X))


def ap_per_class(
    tp: np.ndarray,
    conf: np.ndarray,
    pred_cls: np.ndarray,
    target_cls: np.ndarray,
    eps: float = 1e-16,
) -> Tuple[np.ndarray, np.ndarray]:
    """AP per ground-truth class at each IoU threshold: ``(ap (nc, T), classes (nc,))``."""
    order = np.argsort(-conf, kind="stable")
    tp, pred_cls = tp[order], pred_cls[order]
    classes, counts = np.unique(target_cls, return_counts=True)
    ap = np.zeros((len(classes), tp.shape[1]))
    for ci, (cls, n_labels) in enumerate(zip(classes, counts)):
        mask = pred_cls == cls
        if not mask.any():
            continue
        tpc = tp[mask].cumsum(0)
        fpc = (1 - tp[mask]).cumsum(0)
        recall = tpc / (n_labels + eps)
        precision = tpc / (tpc + fpc)
        for j in range(tp.shape[1]):
            ap[ci, j] = compute_ap(recall[:, j], precision[:, j])
    return ap, classes.astype(int)


def map_vs_reference(
    references: Sequence[Detections], devices: Sequence[Detections], conf: float
) -> Dict[str, Any]:
    """mAP50 and mAP50-95 of device detections judged against reference detections (>= conf).

    Returns ``{"map50", "map50_95", "per_class": {class_id: map50_95}, "labels", "predictions"}``;
    ``map50_95`` is None when the reference has no detection at all (nothing to judge).
    """
    tps, confs, pred_cls, target_cls = [], [], [], []
    for reference, device in zip(references, devices):
        truth = reference[reference.confidence >= conf]
        order = np.argsort(-device.confidence, kind="stable")
        device = device[order]
        tps.append(correct_matrix(truth.xyxy, truth.class_id, device.xyxy, device.class_id))
        confs.append(device.confidence)
        pred_cls.append(device.class_id)
        target_cls.append(truth.class_id)
    labels = np.concatenate(target_cls) if target_cls else np.zeros(0, np.int32)
    n_pred = int(sum(len(c) for c in confs))
    if len(labels) == 0:
        return {"map50": None, "map50_95": None, "per_class": {}, "labels": 0,
                "predictions": n_pred}
    tp = np.concatenate(tps).astype(np.float64)
    ap, classes = ap_per_class(tp, np.concatenate(confs), np.concatenate(pred_cls), labels)
    return {
        "map50": round(float(ap[:, 0].mean()), 4),
        "map50_95": round(float(ap.mean()), 4),
        "per_class": {int(c): round(float(a), 4) for c, a in zip(classes, ap.mean(1))},
        "labels": len(labels),
        "predictions": n_pred,
    }
