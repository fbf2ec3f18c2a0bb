"""`jetyolo export` on the fixture model: bundle contents, variants, parity (and its failing case),
bad input through the CLI, and (slow) the whole chain synth -> train -> export -> bundle verify.

One export with every variant is made per module and shared; tests that change a bundle copy it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from device.bundle import Bundle
from device.cli import main
from device.errors import JetyoloError
from device.preprocess import Preprocessor
from host import parity, surgeon
from host.export import export_bundle

IMGSZ = 320


@pytest.fixture(scope="module")
def weights(fixture_weights: Path) -> Path:
    """tests/fixtures/synth_yolo11n.pt: yolo11n trained on the synthetic data (conftest)."""
    return fixture_weights


@pytest.fixture(scope="module")
def full_bundle(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Path:
    """The fixture model exported at 320 px with --uint8-input and --nms."""
    out = tmp_path_factory.mktemp("export") / "synth320"
    export_bundle(weights, out, imgsz=IMGSZ, uint8_input=True, nms=True)
    return out


@pytest.fixture(scope="module")
def torch_model(weights: Path) -> Any:
    from host.train import load_detect_model

    return load_detect_model(str(weights), "export").model


def cli(argv: List[str], capsys: pytest.CaptureFixture[str]) -> Tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("jetyolo: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# ---- the bundle ---------------------------------------------------------------------------------


def test_manifest_lists_every_variant_with_its_input(full_bundle: Path) -> None:
    bundle = Bundle.load(full_bundle)  # schema + hashes
    variants = bundle.manifest["variants"]
    assert set(variants) == {"fp32", "uint8", "nms", "fp16"}  # fp16: every export (TensorRT 11)
    models = {"model.onnx", "model_uint8.onnx", "model_nms.onnx", "model_fp16.onnx"}
    reference = {f"reference/{name}.json" for name in ("inputs", "outputs", "detections")}
    assert set(bundle.manifest["files"]) == models | reference  # export records the reference
    assert bundle.manifest["reference"]["num"] == 16
    assert variants["fp32"]["input"] == {
        "name": "images",
        "shape": [1, 3, IMGSZ, IMGSZ],
        "dtype": "float32",
        "layout": "NCHW",
    }
    assert variants["uint8"]["input"]["shape"] == [1, IMGSZ, IMGSZ, 3]
    assert (variants["uint8"]["input"]["dtype"], variants["uint8"]["input"]["layout"]) == (
        "uint8",
        "NHWC",
    )
    assert set(variants["nms"]["outputs"]) == set(surgeon.NMS_OUTPUTS)
    assert variants["nms"]["nms"]["plugin"] == "EfficientNMS_TRT"


def test_onnx_inputs_and_outputs_match_the_manifest(full_bundle: Path) -> None:
    bundle = Bundle.load(full_bundle)
    for name in ("fp32", "uint8"):
        session = ort.InferenceSession(
            str(bundle.model_path(name)), providers=["CPUExecutionProvider"]
        )
        spec = bundle.variant(name)["input"]
        (model_input,) = session.get_inputs()
        assert (model_input.name, model_input.shape) == (spec["name"], spec["shape"])
        assert model_input.type == f"tensor({spec['dtype'].replace('float32', 'float')})"
        outputs = {o.name: o.shape for o in session.get_outputs()}
        assert outputs == {"boxes": [1, 4, 2100], "scores": [1, 4, 2100]}


def test_nms_model_structure(full_bundle: Path) -> None:
    model = surgeon.load_onnx(full_bundle / "model_nms.onnx")  # passes onnx.checker
    (node,) = [n for n in model.graph.node if n.op_type == "EfficientNMS_TRT"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["score_activation"], attrs["box_coding"], attrs["background_class"]) == (0, 1, -1)
    assert attrs["max_output_boxes"] == 300
    shapes = {
        o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output
    }
    assert shapes == {
        "num_dets": [1, 1],
        "det_boxes": [1, 300, 4],
        "det_scores": [1, 300],
        "det_classes": [1, 300],
    }


def test_uint8_variant_equals_fp32_on_device_buffers(full_bundle: Path) -> None:
    frames = parity.synthetic_frames(4, 2, seed=5)
    worst = parity.uint8_difference(
        full_bundle / "model.onnx", full_bundle / "model_uint8.onnx", frames, (IMGSZ, IMGSZ)
    )
    assert worst == {"boxes": 0.0, "scores": 0.0}
    # and the uint8 buffer differs from the float one, so the check above compares two paths
    as_uint8, as_float = Preprocessor((IMGSZ, IMGSZ), "uint8"), Preprocessor((IMGSZ, IMGSZ))
    as_uint8(frames[0])
    as_float(frames[0])
    assert as_uint8.buffer.dtype == np.uint8 and as_float.buffer.dtype == np.float32


def test_parity_is_recorded_and_within_tolerance(full_bundle: Path) -> None:
    record = Bundle.load(full_bundle).manifest["parity"]
    limits = record["tolerance"]
    assert record["boxes"]["max_abs"] <= limits["boxes_atol"]
    assert record["scores"]["max_abs"] <= limits["scores_atol"]
    assert record["detections"]["reference"] > 0  # the fixture model detects synthetic objects
    assert record["detections"]["agreement"] >= limits["min_agreement"]
    assert record["uint8_vs_fp32"] == {"boxes": 0.0, "scores": 0.0}


def test_bundle_verify_accepts_the_export(
    full_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bundle", "verify", str(full_bundle)]) == 0
    assert "OK (7 files" in capsys.readouterr().out  # 4 models + 3 reference files


# ---- parity: the failing case -------------------------------------------------------------------


def broken_copy(source: Path, target: Path, factor: float) -> Path:
    """``source`` with the first Conv weight of the class branch scaled by ``factor``."""
    model = onnx.load(str(source))
    initializers = {init.name: init for init in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and "/cv3." in n.name)
    weight = initializers[conv.input[1]]
    weight.CopyFrom(
        onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * factor, weight.name)
    )
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(
    "factor, passes",
    [
        (1.0, True),  # the untouched export passes
        (1.01, False),  # one class-branch Conv weight 1% off: over tolerance
    ],
)
def test_parity_detects_a_broken_onnx(
    full_bundle: Path, torch_model: Any, tmp_path: Path, factor: float, passes: bool
) -> None:
    onnx_path = broken_copy(full_bundle / "model.onnx", tmp_path / "m.onnx", factor)
    frames = parity.synthetic_frames(4, 4)
    report = parity.compare(torch_model, onnx_path, frames, (IMGSZ, IMGSZ), "test")
    assert (not report.problems) is passes, report.lines()
    if passes:
        parity.check(report)
    else:
        with pytest.raises(JetyoloError, match="parity failed"):
            parity.check(report)


def report(boxes: float, scores: float, matched: int) -> parity.ParityReport:
    detections = {"reference": 10, "onnx": 10, "matched": matched, "agreement": matched / 10}
    made = parity.ParityReport(
        4,
        "test",
        {"max_abs": boxes, "max_rel": 0.0},
        {"max_abs": scores, "max_rel": 0.0},
        detections,
        {"boxes_atol": 5e-3, "scores_atol": 1e-4, "min_agreement": 0.99},
        [],
    )
    made.problems = parity.problems_of(made, parity.Tolerance())
    return made


@pytest.mark.parametrize(
    "boxes, scores, matched, failure",
    [
        (2e-4, 2e-6, 10, None),  # measured figures: passes
        (0.1, 2e-6, 10, "boxes differ by 0.1 px"),  # boxes over
        (2e-4, 1e-3, 10, "scores differ by 0.001"),  # scores over
        (2e-4, 2e-6, 9, "detection agreement 0.900"),  # one detection of ten lost
    ],
)
def test_parity_check_table(boxes: float, scores: float, matched: int, failure: str) -> None:
    made = report(boxes, scores, matched)
    if failure is None:
        parity.check(made)
    else:
        with pytest.raises(JetyoloError, match=failure):
            parity.check(made)


def test_match_detections_pairs_by_class_and_iou() -> None:
    from device.detections import Detections

    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    reference = Detections(boxes, np.array([0.9, 0.8], np.float32), np.array([0, 1]))
    same = Detections(boxes + 0.5, np.array([0.9, 0.8], np.float32), np.array([0, 1]))
    other_class = Detections(boxes, np.array([0.9, 0.8], np.float32), np.array([1, 0]))
    shifted = Detections(boxes + 8, np.array([0.9, 0.8], np.float32), np.array([0, 1]))
    assert parity.match_detections(reference, same) == 2
    assert parity.match_detections(reference, other_class) == 0
    assert parity.match_detections(reference, shifted) == 0  # IoU < 0.5


def test_export_over_tolerance_writes_nothing(weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    strict = parity.Tolerance(boxes_atol=0.0, scores_atol=0.0)  # no float difference allowed
    with pytest.raises(JetyoloError, match=r"parity failed.*nothing was written"):
        export_bundle(weights, out, imgsz=IMGSZ, parity_images=2, tolerance=strict)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# ---- bad input through the CLI: one line, exit 2, nothing on disk -------------------------------


def classify_weights(path: Path) -> Path:
    from host._env import ultralytics_offline

    ultralytics_offline("test").YOLO("yolo11n-cls.yaml").save(str(path))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "do not exist"),  # no such .pt
        ("garbage", "is not an ultralytics model"),  # random bytes named .pt
        ("classify", "is a 'classify' model"),  # an ultralytics model, but not a detector
    ],
)
def test_export_refuses_bad_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    pt = tmp_path / f"{case}.pt"
    if case == "garbage":
        pt.write_bytes(os.urandom(4096))
    elif case == "classify":
        classify_weights(pt)
    out = tmp_path / "bundle"
    code, stderr = cli(["export", str(pt), "--out", str(out), "--imgsz", "160"], capsys)
    assert code == 2
    assert message in error_line(stderr) and str(pt) in error_line(stderr)
    assert not out.exists()


def test_export_refuses_a_non_empty_out_without_force(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stderr = cli(["export", str(weights), "--out", str(out)], capsys)
    assert code == 2 and "not empty" in error_line(stderr) and "--force" in error_line(stderr)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def unwritable_parent(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through file modes; sysfs refuses new entries even to root
        return Path("/sys/jetyolo-test")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


def test_export_refuses_an_unwritable_out(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = unwritable_parent(tmp_path) / "bundle"
    code, stderr = cli(["export", str(weights), "--out", str(out)], capsys)
    assert code == 2 and "not writable" in error_line(stderr)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--imgsz", "330"], "not a multiple of the model stride 32"),  # ultralytics would round it
        (["--batch", "0"], "--batch must be at least 1"),
        (["--batch", "65"], "--batch 65 is more than 64"),
        (["--batch", "2", "--frame-input"], "--frame-input with --batch 2"),
        (["--parity-images", "0"], "--parity-images must be at least 1"),
        (["--data", "/nonexistent/data.yaml"], "does not exist"),  # parity images from a bad yaml
        (["--reference-images", "/nonexistent"], "--reference-images /nonexistent is not a folder"),
    ],
)
def test_export_refuses_bad_flags(
    weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: List[str],
    message: str,
) -> None:
    out = tmp_path / "bundle"
    code, stderr = cli(["export", str(weights), "--out", str(out), *flags], capsys)
    assert code == 2 and message in error_line(stderr)
    assert not out.exists()


def test_export_refuses_a_file_as_out(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    out.write_text("a file")
    code, stderr = cli(["export", str(weights), "--out", str(out)], capsys)
    assert code == 2 and "not a directory" in error_line(stderr)
    assert out.read_text() == "a file"


def damage(bundle: Path, how: str) -> None:
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    if how == "flip":  # same size, one byte changed in the weights
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif how == "truncate":
        model.write_bytes(bytes(data[: len(data) // 3]))
    elif how == "manifest":  # the file is intact, the manifest's hash is not
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"]["model_uint8.onnx"]["sha256"] = "0" * 64
        (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "how, message",
    [
        ("flip", "model.onnx sha256 does not match"),  # corrupted ONNX bytes
        ("truncate", "model.onnx has"),  # truncated ONNX: size differs
        ("manifest", "model_uint8.onnx sha256 does not match"),  # manifest hash edited
        ("none", None),  # untouched copy verifies
    ],
)
def test_bundle_verify_catches_damage(
    full_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, message: str
) -> None:
    bundle = Path(shutil.copytree(full_bundle, tmp_path / "bundle"))
    damage(bundle, how)
    code, stderr = cli(["bundle", "verify", str(bundle)], capsys)
    if message is None:
        assert code == 0 and stderr == ""
    else:
        assert code == 2 and message in error_line(stderr)


def test_truncated_onnx_gives_a_clear_error_when_loaded(full_bundle: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "model.onnx"
    truncated.write_bytes((full_bundle / "model.onnx").read_bytes()[:100_000])
    with pytest.raises(JetyoloError, match=r"not a valid ONNX model.*truncated or corrupted"):
        surgeon.load_onnx(truncated)


# ---- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_synth_train_export_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert (
        main(
            [
                "data",
                "synth",
                str(data),
                "--classes",
                "2",
                "--train",
                "8",
                "--val",
                "4",
                "--imgsz",
                "160",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(data / "data.yaml"),
                "--model",
                "yolo11n.yaml",
                "--epochs",
                "1",
                "--imgsz",
                "160",
                "--batch",
                "8",
                "--name",
                "e2e",
                "--project",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    best = tmp_path / "runs" / "e2e" / "weights" / "best.pt"
    out = tmp_path / "bundle"
    assert (
        main(
            [
                "export",
                str(best),
                "--out",
                str(out),
                "--imgsz",
                "160",
                "--uint8-input",
                "--data",
                str(data / "data.yaml"),
                "--parity-images",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "parity (4 images" in printed and "agreement" in printed
    assert main(["bundle", "verify", str(out)]) == 0
    assert "OK (6 files" in capsys.readouterr().out  # 3 models (one fp16) + 3 reference files


def _dead_pid() -> int:
    import subprocess
    import sys

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_killed_exports_leftovers_are_removed_by_the_next_one(tmp_path: Path) -> None:
    from host.export import clean_stale_exports

    dead, alive = _dead_pid(), os.getppid()
    stale = [f".b.export-{dead}", f"..b.export-{dead}.k2j3", f".other.export-{dead}.x9"]
    kept = [f".b.export-{alive}", ".b.exported", "b.export-7", f".b.export-{dead}.file"]
    for name in [*stale, *kept[:3]]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"x")
    (tmp_path / kept[3]).write_text("a file, not our folder")
    removed = clean_stale_exports(tmp_path)
    assert sorted(path.name for path in removed) == sorted(stale)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(kept)


def test_export_works_beside_out_not_in_tmp(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temporary files live in --out's own folder (the rename is atomic), and a failed export
    leaves none there."""
    seen: List[Path] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.extend(tmp_path.iterdir())
        raise JetyoloError("stop here")

    monkeypatch.setattr(parity, "compare", spy)
    with pytest.raises(JetyoloError, match="stop here"):
        export_bundle(weights, tmp_path / "b", imgsz=160, reference_num=0)
    assert [path.name.startswith(f".b.export-{os.getpid()}.") for path in seen] == [True]
    assert list(tmp_path.iterdir()) == []
