"""`jetyolo reference`: what it writes into the bundle, that polygraphy's own CLI accepts the files
(and fails on a changed model), image selection errors; and that device.matching's mAP pieces
compute exactly what ultralytics computes (the device cannot import ultralytics to check).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List

import numpy as np
import onnx
import pytest

from device import matching
from device.bundle import Bundle
from device.cli import main
from device.errors import JetyoloError
from device.reference import REFERENCE_FILES
from host.reference import make_reference, select_images

POLYGRAPHY = Path(sys.executable).with_name("polygraphy")
NUM = 6


@pytest.fixture(scope="module")
def val_images(synth_dataset: Path) -> Path:
    return synth_dataset.parent / "valid" / "images"


@pytest.fixture(scope="module")
def reference_bundle(
    bundle_dir: Path, val_images: Path, tmp_path_factory: pytest.TempPathFactory
) -> Bundle:
    copy = tmp_path_factory.mktemp("reference") / "bundle"
    shutil.copytree(bundle_dir, copy)
    return make_reference(copy, val_images, num=NUM)


def test_reference_files_are_hashed_and_described(
    reference_bundle: Bundle, val_images: Path
) -> None:
    bundle = Bundle.load(reference_bundle.root, verify=True)  # every new file hashed
    for name in REFERENCE_FILES:
        assert name in bundle.manifest["files"]
    section = bundle.manifest["reference"]
    chosen = select_images(val_images, NUM)
    assert section["num"] == NUM
    assert [image["name"] for image in section["images"]] == [p.name for p in chosen]
    assert section["model_sha256"] == bundle.model_sha256("fp32")
    assert "onnxruntime" in section["runner"]
    doc = json.loads(bundle.path("reference/detections.json").read_text())
    assert doc["conf"] == bundle.manifest["postprocess"]["conf"]
    image = doc["images"][0]
    assert image["geometry"]["input_size"] == list(bundle.input_size)
    reported = [d for d in image["detections"] if d["score"] >= doc["conf"]]
    assert section["detections_at_conf"] > 0, "the fixture model detects the synthetic shapes"
    for det in reported:
        assert set(det) == {"class_id", "label", "score", "box", "box_input"}
        assert det["label"] == bundle.class_names[det["class_id"]]


def test_polygraphy_cli_loads_the_reference_and_fails_on_a_changed_model(
    reference_bundle: Bundle, tmp_path: Path
) -> None:
    root = reference_bundle.root
    args = ["--onnxrt", "--load-inputs", str(root / "reference/inputs.json"),
            "--load-outputs", str(root / "reference/outputs.json")]
    same = subprocess.run([str(POLYGRAPHY), "run", str(root / "model.onnx"), *args],
                          capture_output=True, text=True, timeout=120)
    assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
    assert "PASSED" in same.stdout
    changed = tmp_path / "changed.onnx"
    scale_first_conv(root / "model.onnx", changed, 1.3)
    differs = subprocess.run([str(POLYGRAPHY), "run", str(changed), *args],
                             capture_output=True, text=True, timeout=120)
    assert differs.returncode != 0
    assert "FAILED" in differs.stdout


def scale_first_conv(model_path: Path, out: Path, factor: float) -> None:
    model = onnx.load(str(model_path))
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    weight = next(init for init in model.graph.initializer if init.name == conv.input[1])
    scaled = onnx.numpy_helper.to_array(weight) * np.float32(factor)
    weight.CopyFrom(onnx.numpy_helper.from_array(scaled, weight.name))
    onnx.save(model, str(out))


def test_select_images_spreads_and_refuses_bad_input(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"{i:02d}.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.stem for p in select_images(tmp_path, 4)] == ["00", "03", "06", "09"]
    assert len(select_images(tmp_path, 50)) == 10
    with pytest.raises(JetyoloError, match="not a folder"):
        select_images(tmp_path / "missing", 4)
    with pytest.raises(JetyoloError, match="at least one"):
        select_images(tmp_path, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JetyoloError, match="no images"):
        select_images(empty, 4)


def test_cli_refuses_unreadable_image_and_leaves_bundle_unchanged(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    before = {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()}
    assert main(["reference", str(copy), "--images", str(images)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    # the reference export recorded, and the manifest, are exactly as they were
    assert {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()} == before


# ---- device.matching mirrors ultralytics ---------------------------------------------------------
@pytest.fixture(scope="module")
def ultralytics_metrics() -> SimpleNamespace:
    from host._env import ultralytics_offline

    ultralytics_offline("test")
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils import metrics

    validator: Any = SimpleNamespace(iouv=torch.linspace(0.5, 0.95, 10))  # all it reads of self

    def match(*args: Any) -> Any:
        return BaseValidator.match_predictions(validator, *args)

    return SimpleNamespace(torch=torch, metrics=metrics, match=match)


def random_image(rng: np.random.Generator, n: int, nc: int = 3) -> List[np.ndarray]:
    xy = rng.uniform(0, 300, (n, 2))
    boxes = np.hstack([xy, xy + rng.uniform(10, 80, (n, 2))]).astype(np.float32)
    return [boxes, rng.uniform(0.01, 1.0, n).astype(np.float32), rng.integers(0, nc, n)]


@pytest.mark.parametrize("seed", range(6))
def test_matching_and_ap_equal_ultralytics(seed: int, ultralytics_metrics: SimpleNamespace) -> None:
    torch, metrics = ultralytics_metrics.torch, ultralytics_metrics.metrics
    rng = np.random.default_rng(seed)
    tps, confs, pred_cls, target_cls = [], [], [], []
    for _ in range(5):
        truth_boxes, _, truth_cls = random_image(rng, int(rng.integers(0, 8)))
        # predictions: jittered copies of the truth (some lost, classes sometimes flipped) + noise
        keep = rng.random(len(truth_boxes)) < 0.8
        jitter = rng.normal(0, 6, (int(keep.sum()), 4)).astype(np.float32)
        noise_boxes, noise_conf, noise_cls = random_image(rng, int(rng.integers(0, 5)))
        boxes = np.vstack([truth_boxes[keep] + jitter, noise_boxes])
        flipped = np.where(rng.random(keep.sum()) < 0.1, 2, truth_cls[keep])
        cls = np.concatenate([flipped, noise_cls])
        conf = np.concatenate([rng.uniform(0.3, 1.0, keep.sum()), noise_conf]).astype(np.float32)
        order = np.argsort(-conf, kind="stable")
        boxes, cls, conf = boxes[order], cls[order], conf[order]
        ours_iou = matching.box_iou(truth_boxes, boxes)
        theirs_iou = metrics.box_iou(torch.from_numpy(truth_boxes), torch.from_numpy(boxes)).numpy()
        np.testing.assert_allclose(ours_iou, theirs_iou, atol=1e-5)
        ours = matching.correct_matrix(truth_boxes, truth_cls, boxes, cls)
        theirs = ultralytics_metrics.match(torch.from_numpy(cls), torch.from_numpy(truth_cls),
                                           torch.from_numpy(theirs_iou)).numpy()
        np.testing.assert_array_equal(ours, theirs)
        tps.append(ours)
        confs.append(conf)
        pred_cls.append(cls)
        target_cls.append(truth_cls)
    tp, conf, pcls, tcls = (np.concatenate(x) for x in (tps, confs, pred_cls, target_cls))
    ours_ap, ours_classes = matching.ap_per_class(tp.astype(float), conf, pcls, tcls)
    theirs = metrics.ap_per_class(tp, conf, pcls, tcls)
    theirs_ap, theirs_classes = theirs[5], theirs[6]
    np.testing.assert_array_equal(ours_classes, theirs_classes)
    np.testing.assert_allclose(ours_ap, theirs_ap, atol=1e-9)
    assert 0.0 < ours_ap.mean() < 0.995  # a case with hits, misses and flips, not a trivial one


def test_a_batch_n_export_records_and_verifies_its_reference(
    fixture_weights: Path, val_images: Path, tmp_path: Path
) -> None:
    # `jetyolo export --batch 2` records the reference itself: each image fed twice (entry 0
    # is the reference); before, the batch-2 input was refused and the export failed
    from device.verify import verify
    from host.export import export_bundle

    bundle = export_bundle(fixture_weights, tmp_path / "b2", imgsz=160, batch=2, parity_images=2)
    inputs = json.loads(bundle.path("reference/inputs.json").read_text())
    assert bundle.variant("fp32")["input"]["shape"][0] == 2 and inputs
    report = verify(bundle.root, backend="onnxruntime", variant="fp32", precision="fp32")
    assert report.passed, report.format_text()
