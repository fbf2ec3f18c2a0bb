"""Session fixtures shared by host and device tests: built once, reused everywhere.

Heavy work (training, export) is done once per session; a committed small model
(tests/fixtures/synth_yolo11n.pt, made by the command in tests/fixtures/README.md) stands in for a
model trained long enough to detect the synthetic objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_WEIGHTS = REPO / "tests" / "fixtures" / "synth_yolo11n.pt"
TINY_DETECTOR = REPO / "tests" / "fixtures" / "tiny_detector.onnx"  # make_tiny_detector.py
IMGSZ = 320
CLASSES = 4

# ultralytics must never reach the network in tests.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("JETYOLO_HOME", str(REPO / ".jetyolo"))


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (4 classes, 24 train / 8 val, 320 px); returns its data.yaml."""
    from host.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "synth", CLASSES, 24, 8, IMGSZ, seed=1)


@pytest.fixture(scope="session")
def synth_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 960x540, 40-frame synthetic MP4 with its ground-truth sidecar (<video>.json)."""
    from host.synth import make_video

    return make_video(
        tmp_path_factory.mktemp("video") / "synth.mp4", CLASSES, (960, 540), 40, seed=1
    )


@pytest.fixture(scope="session")
def fixture_weights() -> Path:
    if not FIXTURE_WEIGHTS.is_file():
        pytest.fail(f"{FIXTURE_WEIGHTS} is missing: it is committed; see tests/fixtures/README.md")
    return FIXTURE_WEIGHTS


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, fixture_weights: Path) -> Path:
    """A bundle exported from the fixture model at 320 px (read-only: copy it to change it)."""
    from host.export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "synth320"
    export_bundle(fixture_weights, out, imgsz=IMGSZ)
    return out


@pytest.fixture(scope="session")
def batch_bundle_dir(tmp_path_factory: pytest.TempPathFactory, fixture_weights: Path) -> Path:
    """The fixture model exported with --batch 3 (dim 0 symbolic, 1..3 frames per call) at
    320 px with --uint8-input and --nms (read-only: copy it to change it)."""
    from host.export import export_bundle

    out = tmp_path_factory.mktemp("batch") / "synth320x3"
    export_bundle(fixture_weights, out, imgsz=IMGSZ, batch=3, uint8_input=True, nms=True,
                  parity_images=4, reference_num=4)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px bundle around the committed tiny_detector.onnx, made with device code only: what
    the real-TensorRT tests use, so a Jetson venv with just the device extra runs them."""
    from device.bundle import write_new_bundle

    variant = {"file": "model.onnx",
               "input": {"name": "images", "shape": [1, 3, 64, 64], "dtype": "float32",
                         "layout": "NCHW"},
               "outputs": {"boxes": "[B,4,N] float32: cx, cy, w, h in input pixels",
                           "scores": "[B,4,N] float32: per-class scores after sigmoid"}}
    manifest = {"schema_version": 1, "name": "tiny64", "class_names": ["a", "b", "c", "d"],
                "preprocess": {"size": [64, 64], "stride": 32, "pad_value": 114, "color": "RGB",
                               "scale": 1 / 255, "letterbox": "center"},
                "postprocess": {"conf": 0.25, "iou": 0.45, "max_det": 300},
                "variants": {"fp32": variant}}
    out = tmp_path_factory.mktemp("tiny") / "tiny64"
    return write_new_bundle(out, {"model.onnx": TINY_DETECTOR}, manifest).root
