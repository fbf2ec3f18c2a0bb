"""`jetyolo eval`: mAP on the val split through the device pipeline, ultralytics' metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from device.bundle import Bundle
from device.cli import main
from device.errors import JetyoloError
from host.evaluate import evaluate_bundle, read_labels, val_image_paths


def test_fp32_bundle_scores_like_the_trained_model(bundle_dir: Path, synth_dataset: Path) -> None:
    result = evaluate_bundle(Bundle.load(bundle_dir), synth_dataset)
    assert result.images == 8 and result.instances > 8
    assert result.map50 > 0.9 and 0.6 < result.map50_95 <= result.map50


def test_wrong_labels_score_low(bundle_dir: Path, synth_dataset: Path, tmp_path: Path) -> None:
    """The failing side: the same detections against shifted class ids must score near zero."""
    copy = tmp_path / "data"
    shutil.copytree(synth_dataset.parent, copy)
    for label in (copy / "valid" / "labels").glob("*.txt"):
        rows = [line.split() for line in label.read_text().splitlines() if line.strip()]
        label.write_text("".join(f"{(int(r[0]) + 1) % 4} {' '.join(r[1:])}\n" for r in rows))
    result = evaluate_bundle(Bundle.load(bundle_dir), copy / "data.yaml")
    assert result.map50 < 0.1


def test_cli_prints_both_metrics(bundle_dir: Path, synth_dataset: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(bundle_dir), "--data", str(synth_dataset), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fp32: mAP50-95 0.") and "mAP50 0." in out and "(2 images" in out


def test_cli_draws_the_curves(bundle_dir: Path, synth_dataset: Path, tmp_path: Path) -> None:
    plots = tmp_path / "curves"
    args = ["eval", str(bundle_dir), "--data", str(synth_dataset), "--limit", "4"]
    assert main([*args, "--plots", str(plots)]) == 0
    for curve in ("BoxPR_curve", "BoxF1_curve", "BoxP_curve", "BoxR_curve"):
        assert (plots / f"{curve}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_variant_and_bad_dataset(bundle_dir: Path, synth_dataset: Path,
                                         tmp_path: Path) -> None:
    with pytest.raises(JetyoloError, match=r"no variant 'int8-qdq'.*jetyolo calibrate"):
        evaluate_bundle(Bundle.load(bundle_dir), synth_dataset, "int8-qdq")
    nms_bundle = Bundle.load(bundle_dir)
    nms_bundle.manifest["variants"]["nms"] = dict(
        nms_bundle.variant("fp32"), outputs={"num_dets": "", "det_boxes": ""})
    with pytest.raises(JetyoloError, match=r"variant 'nms' ends in .*EfficientNMS"):
        evaluate_bundle(nms_bundle, synth_dataset, "nms")
    data = yaml.safe_load(synth_dataset.read_text())
    no_val = tmp_path / "no_val.yaml"
    no_val.write_text(yaml.safe_dump({**data, "val": None, "path": str(synth_dataset.parent)}))
    with pytest.raises(JetyoloError, match="has no 'val:' entry"):
        val_image_paths(no_val)
    two_classes = tmp_path / "two.yaml"
    two_classes.write_text(yaml.safe_dump({**data, "nc": 2, "names": ["a", "b"],
                                           "path": str(synth_dataset.parent)}))
    with pytest.raises(JetyoloError, match="dataset has 2 classes, the bundle 4"):
        evaluate_bundle(Bundle.load(bundle_dir), two_classes)


def test_read_labels(tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    boxes, classes = read_labels(images / "background.jpg", (200, 100))
    assert boxes.shape == (0, 4) and classes.shape == (0,)
    (labels / "a.txt").write_text("2 0.5 0.5 0.2 0.4\n\n")
    boxes, classes = read_labels(images / "a.jpg", (200, 100))
    np.testing.assert_allclose(boxes, [[80, 30, 120, 70]])
    assert classes.tolist() == [2]
    (labels / "b.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(JetyoloError, match=r"b.txt:1: expected 'class x y w h'"):
        read_labels(images / "b.jpg", (200, 100))
    (labels / "d.txt").write_text("1 0.5 0.5 0.2 x\n")  # not a number: one line too
    with pytest.raises(JetyoloError, match=r"d.txt:1: expected 'class x y w h'"):
        read_labels(images / "d.jpg", (200, 100))
    # a polygon row (segmentation export, legal for `data check`) is its bounding box
    (labels / "c.txt").write_text("3 0.4 0.2 0.6 0.5 0.5 0.8\n")
    boxes, classes = read_labels(images / "c.jpg", (200, 100))
    np.testing.assert_allclose(boxes, [[80, 20, 120, 80]], rtol=1e-6)
    assert classes.tolist() == [3]
