"""Every supported family end to end on the CPU: YOLOv8, YOLO11, YOLO12 and YOLO26 (both heads).

Each case is a small model trained from its family's yaml (tests/fixtures/README.md has the
recipes and their mAP: a model at mAP 0 would pass every check trivially), exported once per
module at the size it was trained at, then: export parity, the synthetic video, verify, eval,
calibrate + gate, and agreement with ultralytics' own ``predict`` on the same frames with the same
thresholds. YOLO11 reuses the session's shared bundle (conftest ``bundle_dir``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from device.bundle import Bundle
from device.detections import Detections
from device.postprocess import PostprocessConfig, postprocess
from device.preprocess import Preprocessor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FAMILY_IMGSZ = 256  # what the YOLOv8/12/26 fixtures were trained at
AGREEMENT = 0.99
VIDEO_FRAMES = 12


@dataclass(frozen=True)
class Case:
    family: str
    weights: str
    head: str
    min_map50: float  # floor well under the fixture's own val mAP50 (README), far above 0

    @property
    def id(self) -> str:
        return f"{self.family}-{self.head}"


CASES = [
    Case("yolov8", "synth_yolov8n.pt", "one2many", 0.3),
    Case("yolo11", "synth_yolo11n.pt", "one2many", 0.8),
    Case("yolo12", "synth_yolo12n.pt", "one2many", 0.2),
    Case("yolo26", "synth_yolo26n.pt", "one2many", 0.3),
    Case("yolo26", "synth_yolo26n.pt", "end2end", 0.2),
]


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    weights = FIXTURES / request.param.weights
    if not weights.is_file():
        pytest.fail(f"{weights} is missing: it is committed; see tests/fixtures/README.md")
    return request.param


@pytest.fixture(scope="module")
def exported(case: Case, synth_dataset: Path, bundle_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    from host.export import export_bundle

    if case.family == "yolo11":
        return Bundle.load(bundle_dir)
    out = tmp_path_factory.mktemp("family") / case.id
    return export_bundle(FIXTURES / case.weights, out, imgsz=FAMILY_IMGSZ, head=case.head,
                         data=synth_dataset, parity_images=6, reference_num=6)


def test_manifest_records_family_head_and_contract(case: Case, exported: Bundle) -> None:
    manifest = exported.manifest
    contract = "end2end" if case.head == "end2end" else "split_head"
    assert manifest["family"] == case.family
    assert manifest["head"]["kind"] == case.head and manifest["head"]["contract"] == contract
    assert manifest["variants"]["fp32"]["contract"] == contract
    assert manifest["head"]["end2end_available"] == (case.family == "yolo26")
    head = set(manifest["head"]["postprocess_nodes"])
    if case.family == "yolo26":  # no DFL: the head list must not be keyed on it
        assert not [n for n in head if "/dfl/" in n]
    import onnx

    graph = onnx.load(str(exported.model_path("fp32"))).graph
    selecting = [n.name for n in graph.node if n.op_type in ("TopK", "GatherElements")]
    if case.head == "end2end":  # TopK/Gather pick rows: INT8 must not touch them
        assert any(n.op_type == "TopK" for n in graph.node)
    assert set(selecting) <= head


def test_export_parity_with_detections(exported: Bundle) -> None:
    parity = exported.manifest["parity"]
    assert parity["detections"]["reference"] > 0, "the fixture detects nothing: retrain it"
    assert parity["detections"]["agreement"] >= AGREEMENT
    assert parity["boxes"]["max_abs"] <= parity["tolerance"]["boxes_atol"]


def test_eval_detects(case: Case, exported: Bundle, synth_dataset: Path) -> None:
    from host.evaluate import evaluate_bundle

    result = evaluate_bundle(exported, synth_dataset)
    assert result.map50 >= case.min_map50, result.line()


def test_verify_passes_on_onnxruntime(exported: Bundle) -> None:
    from device.verify import verify

    report = verify(exported.root, backend="onnxruntime")
    assert report.passed, report.to_dict()["gate_results"]
    assert report.detections.judged > 0


def test_runs_on_the_video(exported: Bundle, synth_video: Path) -> None:
    from device.config import config_from_mapping
    from device.setup import run_configured

    class Collect:
        def __init__(self) -> None:
            self.detections: List[int] = []

        def publish_frame(self, result: Any) -> None:
            self.detections.append(len(result.detections))

        def publish_stats(self, stats: Dict[str, object]) -> None:
            pass

    sink = Collect()
    config = config_from_mapping({"bundle": str(exported.root), "source": str(synth_video),
                                  "backend": "onnxruntime", "max_frames": VIDEO_FRAMES})
    run_configured(config, sinks=sink, handle_signals=False)
    assert len(sink.detections) == VIDEO_FRAMES
    assert sum(count > 0 for count in sink.detections) >= VIDEO_FRAMES // 2


def test_detections_agree_with_ultralytics_predict(
    case: Case, exported: Bundle, synth_dataset: Path
) -> None:
    """Same frames, same thresholds (ultralytics' predict defaults, which jetyolo adopted), the
    square letterbox the static ONNX has (``rect=False``), the head the bundle was exported with
    (``nms=False`` is ultralytics' switch to the end-to-end head)."""
    import cv2
    import onnxruntime as ort

    from host._env import ultralytics_offline
    from host.parity import match_detections

    config = PostprocessConfig()
    frames = [cv2.imread(str(p)) for p in
              sorted((synth_dataset.parent / "valid" / "images").glob("*.jpg"))]
    yolo = ultralytics_offline("predict").YOLO(str(FIXTURES / case.weights))
    theirs = yolo.predict(frames, imgsz=max(exported.input_size), conf=config.conf, iou=config.iou,
                          max_det=config.max_det, rect=False, verbose=False,
                          nms=False if case.head == "end2end" else None)
    session = ort.InferenceSession(str(exported.model_path("fp32")),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    preprocessor = Preprocessor(exported.input_size, "float32")
    matched = compared = reference = 0
    for frame, result in zip(frames, theirs):
        geometry = preprocessor(frame)
        outputs = dict(zip(names, session.run(names, {"images": preprocessor.buffer})))
        ours = postprocess(outputs, geometry, config)
        boxes = result.boxes
        their = Detections(boxes.xyxy.numpy(), boxes.conf.numpy(), boxes.cls.numpy())
        matched += match_detections(their, ours)
        compared += max(len(their), len(ours))
        reference += len(their)
    assert reference > 0, "ultralytics detects nothing on these frames: the check would be empty"
    assert matched / compared >= AGREEMENT, (matched, compared)


def test_calibrate_and_gate(case: Case, exported: Bundle, synth_dataset: Path,
                            tmp_path: Path) -> None:
    """The default recipe (percentile: the histogram path YOLO12/YOLO26's near-constant attention
    Softmax outputs broke) with the mAP gate on a few val images."""
    from host.calibrate import DEFAULT_RECIPE, calibrate

    target = tmp_path / "bundle"
    shutil.copytree(exported.root, target)
    images = synth_dataset.parent / "train" / "images"
    # 8 calibration and 8 val images: the drop is noise-sized (YOLO12: Q/DQ 0.64, cache
    # simulation 1.60 points); this checks that calibrate and both gates run, not the accuracy
    recipe = dict(DEFAULT_RECIPE, num=8, min_images=8, sensitivity_images=2, max_fp16_layers=2,
                  trt_versions=["10.3.0"], max_drop=3.0)
    calibrated = calibrate(target, images, recipe, data_yaml=synth_dataset, eval_limit=8)
    section = calibrated.manifest["variants"]["int8-qdq"]
    assert section["contract"] == exported.manifest["variants"]["fp32"]["contract"]
    calibration = calibrated.manifest["calibration"]
    uncached = set(calibration["uncached_tensors"])  # TensorRT keeps these out of INT8
    assert set(exported.manifest["variants"]["fp32"]["outputs"]) <= uncached
    head = set(exported.manifest["head"]["postprocess_nodes"])
    assert head <= set(calibration["fp16_layers"])  # whatever the family's head nodes are
    accuracy = calibration["accuracy"]
    assert accuracy["passed"] and np.isfinite(accuracy["drop"]), accuracy
    assert accuracy["fp32_map50_95"] > 0


@pytest.mark.parametrize("yaml, family", [("yolov8n.yaml", "yolov8"), ("yolo12n.yaml", "yolo12")])
def test_untrained_family_exports_and_calibrates(
    yaml: str, family: str, synth_dataset: Path, tmp_path: Path
) -> None:
    """Untrained models (no detection check: they detect nothing): the export is at tensor parity,
    the manifest names the family, and percentile calibration of an untrained YOLO12, whose
    attention Softmax outputs span a few float32 steps, ends with ranges instead of ``Too many
    bins for data range`` (it raised that before the fix)."""
    from host._env import ultralytics_offline
    from host.calibrate import DEFAULT_RECIPE, calibrate
    from host.export import export_bundle

    weights = tmp_path / f"{family}.pt"
    ultralytics_offline("export").YOLO(yaml).save(str(weights))
    bundle = export_bundle(weights, tmp_path / "bundle", imgsz=160, parity_images=2,
                           reference_num=0)
    assert bundle.manifest["family"] == family
    assert bundle.manifest["parity"]["scores"]["max_abs"] <= bundle.manifest["parity"]["tolerance"][
        "scores_atol"]
    recipe = dict(DEFAULT_RECIPE, num=8, min_images=8, sensitivity_images=1,
                  trt_versions=["10.3.0"])
    calibrated = calibrate(bundle.root, synth_dataset.parent / "train" / "images", recipe)
    assert calibrated.manifest["calibration"]["method"] == "percentile"
