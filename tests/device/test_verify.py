"""`jetyolo verify` on the CPU: FP32 passes against its own reference; the Q/DQ INT8 model passes
the detection gate and fails the FP32 tensor gate; a perturbed model fails with a clear report;
tampered or stale reference data is refused; TensorRT paths skip (or refuse) with a reason.

The bundle is the session fixture copied once per module, with a reference (host.reference),
the ``int8-qdq`` variant `jetyolo calibrate` adds (host.calibrate, MinMax on 16 train images) and
a ``perturbed`` variant (the first conv's weight scaled by 1.3).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest

from device.backends import tensorrt_missing
from device.bundle import Bundle, add_files
from device.cli import main
from device.errors import JetyoloError
from device.verify import VerifyReport, gates_for, parse_tolerances, verify

NUM = 6


def scale_one_conv(model_path: Path, out: Path, factor: float) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    weight = next(init for init in model.graph.initializer if init.name == conv.input[1])
    scaled = numpy_helper.to_array(weight) * np.float32(factor)
    weight.CopyFrom(numpy_helper.from_array(scaled, weight.name))
    onnx.save(model, str(out))
    return out


def add_variant(bundle: Bundle, name: str, file: str, source: Path) -> Bundle:
    variant = dict(bundle.variant("fp32"), file=file)
    return add_files(bundle, {file: source}, {"variants": {name: variant}})


@pytest.fixture(scope="module")
def verify_bundle(
    bundle_dir: Path, synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from host.calibrate import DEFAULT_RECIPE, calibrate
    from host.reference import make_reference

    work = tmp_path_factory.mktemp("verify")
    root = work / "bundle"
    shutil.copytree(bundle_dir, root)
    bundle = make_reference(root, synth_dataset.parent / "valid" / "images", num=NUM)
    recipe = {**DEFAULT_RECIPE, "num": 16, "method": "minmax"}  # minmax: 1 s, entropy: 5 s
    bundle = calibrate(root, synth_dataset.parent / "train" / "images", recipe)
    add_variant(bundle, "perturbed", "model_perturbed.onnx",
                scale_one_conv(bundle.model_path("fp32"), work / "perturbed.onnx", 1.3))
    return root


def gate(report: VerifyReport, name: str) -> bool:
    return next(ok for gate_name, ok, _ in report.gate_results() if gate_name == name)


def test_fp32_onnxruntime_passes_against_its_own_reference(verify_bundle: Path) -> None:
    report = verify(verify_bundle, backend="onnxruntime")
    assert report.passed, report.format_text()
    assert [check.name for check in report.outputs] == ["boxes", "scores"]
    assert all(check.max_absdiff <= 1e-4 and check.passed == NUM for check in report.outputs)
    assert report.detections.judged > 0
    assert report.detections.agreement == 1.0
    assert report.detections.map_vs_reference["map50_95"] == pytest.approx(0.995, abs=1e-3)


def test_int8_qdq_passes_detection_gate_and_fails_fp32_tensor_gate(verify_bundle: Path) -> None:
    int8 = verify(verify_bundle, backend="onnxruntime", variant="int8-qdq")
    assert int8.gates.precision == "int8" and not int8.gates.tensor_gated
    assert int8.passed, int8.format_text()
    assert gate(int8, "agreement") and gate(int8, "mAP50-95 vs reference")
    as_fp32 = verify(verify_bundle, backend="onnxruntime", variant="int8-qdq", precision="fp32")
    assert not as_fp32.passed
    assert not gate(as_fp32, "tensor boxes"), as_fp32.format_text()
    boxes = next(check for check in as_fp32.outputs if check.name == "boxes")
    assert boxes.max_absdiff > 100 * boxes.atol


def test_perturbed_model_fails_with_a_clear_report(
    verify_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    report_path = tmp_path / "verify.json"
    code = main(["verify", str(verify_bundle), "--backend", "onnxruntime",
                 "--variant", "perturbed", "--report", str(report_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL boxes" in out and "FAIL scores" in out
    assert "RESULT: FAIL (tensor boxes, tensor scores" in out
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    failed = {g["gate"] for g in report["gate_results"] if not g["passed"]}
    assert {"tensor boxes", "tensor scores"} <= failed
    assert len(report["detections"]["images"]) == NUM


def test_cli_passes_and_writes_report(verify_bundle: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    report_path = tmp_path / "fp32.json"
    code = main(["verify", str(verify_bundle), "--backend", "onnxruntime",
                 "--report", str(report_path)])
    assert code == 0, capsys.readouterr().out
    assert "RESULT: PASS" in capsys.readouterr().out
    assert json.loads(report_path.read_text())["passed"] is True


def test_an_unwritable_report_path_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    class Passed:
        passed = True

        def format_text(self) -> str:
            return "RESULT: PASS"

        def to_dict(self) -> Dict[str, bool]:
            return {"passed": True}

    monkeypatch.setattr("device.verify.verify", lambda *args, **kwargs: Passed())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["verify", str(tmp_path), "--report", str(blocker / "verify.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jetyolo: error: cannot write the report") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [blocker]  # nothing partial


def test_gate_flags_override_defaults(verify_bundle: Path, capsys: pytest.CaptureFixture) -> None:
    # an impossible agreement gate fails even for identical outputs
    code = main(["verify", str(verify_bundle), "--backend", "onnxruntime", "--min-map", "0.999"])
    assert code == 1
    assert "RESULT: FAIL (mAP50-95 vs reference)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "values, expected",
    [
        (["1e-3"], {"": 1e-3}),  # one tolerance for every output
        (["1e-3", "boxes:0.5"], {"": 1e-3, "boxes": 0.5}),  # per-output, polygraphy's syntax
        (None, {}),  # flag absent
    ],
)
def test_parse_tolerances(values: List[str] | None, expected: Dict[str, float]) -> None:
    assert parse_tolerances(values, "--atol") == expected


def test_parse_tolerances_refuses_garbage_and_gates_merge() -> None:
    with pytest.raises(JetyoloError, match="--atol 'boxes:big'"):
        parse_tolerances(["boxes:big"], "--atol")
    gates = gates_for("fp32", {"atol": {"boxes": 0.5}, "min_map": None})
    assert gates.atol["boxes"] == 0.5 and gates.atol["scores"] == gates_for("fp32").atol["scores"]
    assert gates.min_map == gates_for("fp32").min_map
    with pytest.raises(JetyoloError, match="precision 'int4'"):
        gates_for("int4")


def _copy(verify_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(verify_bundle, copy)
    return copy


def _drop_first_detections(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["images"][0]["detections"] = []
    path.write_text(json.dumps(doc))


def _flip_one_base64_char(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b'"array": "') + 200  # inside the first array's payload; same size
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "relative, tamper, message",
    [
        # detections edited: size differs
        ("reference/detections.json", _drop_first_detections, "manifest says"),
        # one byte of a saved output changed: same size, sha256 differs
        ("reference/outputs.json", _flip_one_base64_char, "sha256 does not match the manifest"),
    ],
)
def test_tampered_reference_is_refused(
    verify_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    relative: str, tamper: Callable[[Path], None], message: str,
) -> None:
    copy = _copy(verify_bundle, tmp_path)
    tamper(copy / relative)
    assert main(["verify", str(copy), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert relative in err and message in err


def test_reference_of_another_model_is_refused(verify_bundle: Path, tmp_path: Path) -> None:
    copy = _copy(verify_bundle, tmp_path)
    bundle = Bundle.load(copy)
    add_files(bundle, {"model.onnx": copy / "model_perturbed.onnx"})  # re-hashed, reference stale
    with pytest.raises(JetyoloError, match="re-run `jetyolo reference`"):
        verify(copy, backend="onnxruntime")


def test_bundle_without_reference_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    # export records a reference; take it out again (a consistent manifest, no reference files)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("reference")
    files = manifest["files"]
    manifest["files"] = {k: v for k, v in files.items() if not k.startswith("reference/")}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(copy / "reference")
    with pytest.raises(JetyoloError, match="no reference data"):
        verify(copy, backend="onnxruntime")


def test_fp16_on_onnxruntime_is_refused(verify_bundle: Path) -> None:
    with pytest.raises(JetyoloError, match="FP16 is a TensorRT build setting"):
        verify(verify_bundle, backend="onnxruntime", precision="fp16")


@pytest.mark.skipif(tensorrt_missing() is None, reason="TensorRT is installed here")
def test_tensorrt_backend_refuses_with_the_reason_when_absent(verify_bundle: Path) -> None:
    with pytest.raises(JetyoloError, match=r"'tensorrt' is not installed.*python3-libnvinfer"):
        verify(verify_bundle, backend="tensorrt", precision="fp16")
    assert verify(verify_bundle).backend == "onnxruntime"  # auto falls back to the CPU


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_reference(verify_bundle: Path, precision: str) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (runs on a Jetson / GPU)")
    report = verify(verify_bundle, backend="tensorrt", precision=precision)
    assert report.passed, report.format_text()


@pytest.mark.parametrize("version", ["8.5.2", "10.3", "11"])
def test_tensorrt_verify_loads_the_engine_run_uses_from_its_cache_dir(
    verify_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    """On the TensorRT stand-in (tests/trt_standin): verify opens the plan `jetyolo run` and
    `jetyolo build` name, in the engine cache it is given, building it when missing. The
    stand-in computes with ONNX Runtime, so the fp32 gates must pass."""
    from trt_standin.standin import install

    from device.backends import open_chosen
    from device.choice import BackendChoice

    world = install(monkeypatch, version)
    choice = BackendChoice("tensorrt", precision="fp32", cache_dir=tmp_path / "engines")
    open_chosen(choice, Bundle.load(verify_bundle))  # what run does: builds the plan
    assert len(world.builds) == 1
    report = verify(verify_bundle, backend="tensorrt", precision="fp32",
                    cache_dir=tmp_path / "engines")
    assert report.passed and report.backend == "tensorrt", report.format_text()
    assert len(world.builds) == 1  # the same plan, reused
    assert "fp32.plan" in report.runner


def test_verify_imports_nothing_from_the_host_side(verify_bundle: Path) -> None:
    # torch is left out: polygraphy itself imports it when installed (util.array.is_torch);
    # jetyolo's device code does not, and a Jetson without torch runs verify without it.
    script = (
        "import sys; from device.verify import verify; "
        "verify(sys.argv[1], backend='onnxruntime'); "
        "print(sorted(m for m in ('host', 'ultralytics', 'onnx', 'onnx_graphsurgeon') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script, str(verify_bundle)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_fp16_variant_on_onnxruntime_is_judged_by_the_fp16_gates(verify_bundle: Path) -> None:
    fp16 = verify(verify_bundle, backend="onnxruntime", variant="fp16")
    assert fp16.gates.precision == "fp16" and "fp16" in fp16.runner
    assert fp16.passed, fp16.format_text()
    # the fp32 gates (what it was judged by before) fail the same float16 arithmetic
    as_fp32 = verify(verify_bundle, backend="onnxruntime", variant="fp16", precision="fp32")
    assert not as_fp32.passed and not gate(as_fp32, "tensor boxes"), as_fp32.format_text()
