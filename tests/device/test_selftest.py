"""`jetyolo selftest`: end to end on the CPU backend with the shared bundle, the engine matrix per
TensorRT version, and failures (a verify over its gates, a build error, no TensorRT) giving a
report and exit 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from device import selftest
from device.bundle import Bundle
from device.cli import main
from device.errors import JetyoloError
from device.verify import verify


def _report(out: Path) -> Dict[str, Any]:
    return dict(json.loads((out / selftest.REPORT_JSON).read_text()))


def _steps(report: Dict[str, Any]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    return {(step["case"], step["stage"]): step for step in report["steps"]}


def test_cpu_selftest_end_to_end(bundle_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(["selftest", str(bundle_dir), "--backend", "onnxruntime", "--out", str(out),
                 "--runs", "3"]) == 0
    report = _report(out)
    steps = _steps(report)
    assert report["passed"] and report["backend"] == "onnxruntime"
    assert steps[("", "doctor")]["status"] == "pass"
    for case in ("fp32 fp32", "fp16 fp16"):
        assert steps[(case, "verify")]["status"] == "pass", steps[(case, "verify")]["detail"]
        assert steps[(case, "verify")]["figures"]["passed"] is True
        assert steps[(case, "bench")]["figures"]["median_ms"] > 0
    assert not any(stage in ("build", "trtexec") for _, stage in steps)  # no TensorRT here
    text = (out / selftest.REPORT_MD).read_text()
    assert text.startswith("# jetyolo selftest: PASSED") and "| fp16 fp16 | verify | pass |" in text
    assert "selftest passed" in capsys.readouterr().out


class StrictVerify(selftest.Toolkit):
    """The real verify with an agreement no model reaches: a genuine verify failure."""

    def verify(self, bundle: Bundle, backend: str, case: selftest.Case,
               plan: Optional[Path]) -> Any:
        return verify(bundle.root, backend, case.variant, "fp32", None,
                      overrides={"min_agreement": 1.01})


def test_a_failed_verify_fails_the_run(bundle_dir: Path, tmp_path: Path) -> None:
    args = selftest.argparse.Namespace(bundle=bundle_dir, backend="onnxruntime",
                                       out=tmp_path / "r", runs=2)
    assert selftest.run(args, StrictVerify()) == 1
    report = _report(tmp_path / "r")
    assert not report["passed"]
    assert _steps(report)[("fp32 fp32", "verify")]["status"] == "fail"
    assert (tmp_path / "r" / selftest.REPORT_MD).read_text().startswith(
        "# jetyolo selftest: FAILED")


def test_tensorrt_asked_without_tensorrt_is_a_failed_report(bundle_dir: Path,
                                                            tmp_path: Path) -> None:
    assert main(["selftest", str(bundle_dir), "--backend", "tensorrt", "--out",
                 str(tmp_path / "r")]) == 1
    report = _report(tmp_path / "r")
    assert [step["stage"] for step in report["steps"]] == ["doctor"]
    assert "TensorRT, pycuda or the GPU unusable" in report["steps"][0]["detail"]
    assert any(check["status"] == "missing" for check in report["doctor"])


def _bundle_with_everything(root: Path) -> Bundle:
    fp32 = {"file": "model.onnx",
            "input": {"name": "images", "shape": [1, 3, 64, 64], "dtype": "float32"},
            "outputs": {"boxes": "", "scores": ""}}
    variants = {
        "fp32": fp32,
        "uint8": dict(fp32, file="model_uint8.onnx",
                      input={"name": "images", "shape": [1, 64, 64, 3], "dtype": "uint8"}),
        "nms": dict(fp32, file="model_nms.onnx", outputs={"num_dets": "", "det_boxes": ""}),
        "fp16": dict(fp32, file="model_fp16.onnx", float_dtype="float16"),
        "int8-qdq": dict(fp32, file="model_int8_qdq.onnx", quantization={"format": "QDQ"}),
    }
    caches = {name: {"caches": {"10.3.0": {"file": f"calibration/trt-10.3.0-{name}.cache"}}}
              for name in ("fp32", "uint8", "nms")}
    manifest = {"name": "b", "variants": variants, "files": {},
                "calibration": {"caches": caches["fp32"]["caches"], "variants": caches}}
    return Bundle(root, manifest)


@pytest.mark.parametrize("version, expected", [
    ("10.3.0", ["fp32 fp16", "uint8 fp16", "nms fp16", "fp32 int8 from cache",
                "uint8 int8 from cache", "nms int8 from cache", "int8-qdq int8 from qdq"]),
    ("8.5.2", ["fp32 fp16", "uint8 fp16", "nms fp16", "fp32 int8 from cache",
               "uint8 int8 from cache", "nms int8 from cache", "int8-qdq int8 from qdq"]),
    ("11.4.0", ["fp16 fp16", "int8-qdq int8 from qdq"]),  # strongly typed: no cache, no flag
])
def test_tensorrt_engine_matrix(tmp_path: Path, version: str, expected: List[str]) -> None:
    bundle = _bundle_with_everything(tmp_path)
    assert [case.name for case in selftest.tensorrt_cases(bundle, version)] == expected


class FakeReport:
    def __init__(self, passed: bool) -> None:
        self.passed = passed

    def format_text(self) -> str:
        return "verify fake\nline 2"

    def to_dict(self) -> Dict[str, Any]:
        return {"passed": self.passed}


class FakeTensorRT(selftest.Toolkit):
    """A Jetson as the toolkit sees it (the TensorRT stand-in plugs in here as ``ops``): the
    uint8 cache build is refused, every engine verifies, trtexec is absent."""

    def __init__(self) -> None:
        super().__init__(ops=None)
        self.built: List[str] = []

    def doctor(self) -> Tuple[bool, List[Dict[str, Any]]]:
        return True, [{"name": "TensorRT (tensorrt)", "status": "ok", "detail": "10.3.0"}]

    def trt_version(self) -> str:
        return "10.3.0"

    def build(self, bundle: Bundle, case: selftest.Case) -> Path:
        if case.variant == "uint8" and case.int8_from == "cache":
            raise JetyoloError("calibration cache lacks 3 network tensor(s)")
        self.built.append(case.name)
        return bundle.root / f"{case.variant}-{case.precision}.plan"

    def verify(self, bundle: Bundle, backend: str, case: selftest.Case,
               plan: Optional[Path]) -> Any:
        return FakeReport(True)

    def bench(self, bundle: Bundle, backend: str, case: selftest.Case,
              runs: int) -> Dict[str, Any]:
        return {"runs": runs, "median_ms": 1.5, "p90_ms": 2.0, "backend": "fake"}

    def trtexec(self, plan: Path) -> Optional[Dict[str, Any]]:
        return None


def test_tensorrt_run_builds_verifies_and_benches(bundle_dir: Path) -> None:
    toolkit = FakeTensorRT()
    report = selftest.selftest(bundle_dir, "auto", toolkit, runs=2)
    steps = _steps(report)
    assert report["passed"] and report["backend"] == "tensorrt" and report["tensorrt"] == "10.3.0"
    assert toolkit.built == ["fp32 fp16"]  # 10.x: the FP16 flag on the fp32 graph; no cache here
    assert [stage for case, stage in steps if case == "fp32 fp16"] == [
        "build", "verify", "bench", "trtexec"]
    assert steps[("fp32 fp16", "verify")]["status"] == "pass"
    assert steps[("fp32 fp16", "trtexec")]["status"] == "skip"
    assert "median 1.5 ms" in selftest.markdown(report)


def test_reference_cannot_judge_uint8_or_nms(tmp_path: Path) -> None:
    bundle = _bundle_with_everything(tmp_path)
    assert "takes uint8" in str(selftest.verify_skip_reason(bundle, selftest.Case("uint8", "fp16")))
    assert "num_dets" in str(selftest.verify_skip_reason(bundle, selftest.Case("nms", "fp16")))
    assert selftest.verify_skip_reason(bundle, selftest.Case("fp16", "fp16")) is None


def test_refused_build_fails_the_report(tmp_path: Path, bundle_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selftest, "cache_variants", lambda bundle: ["fp32", "uint8"])
    monkeypatch.setattr(selftest, "verify_skip_reason", lambda bundle, case: None)
    fake_uint8 = selftest.Case("uint8", "int8", "cache")
    monkeypatch.setattr(selftest, "tensorrt_cases",
                        lambda bundle, version: [selftest.Case("fp32", "fp16"), fake_uint8])
    report = selftest.selftest(bundle_dir, "tensorrt", FakeTensorRT(), runs=2)
    steps = _steps(report)
    assert not report["passed"]
    assert steps[("uint8 int8 from cache", "build")]["status"] == "fail"
    assert "lacks 3 network tensor" in steps[("uint8 int8 from cache", "build")]["detail"]
    assert ("uint8 int8 from cache", "verify") not in steps  # nothing to verify without a plan
    assert steps[("fp32 fp16", "verify")]["status"] == "pass"


def test_bad_arguments(bundle_dir: Path, tmp_path: Path) -> None:
    assert main(["selftest", str(bundle_dir), "--runs", "0"]) == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["selftest", str(bundle_dir), "--backend", "onnxruntime", "--runs", "1",
                 "--out", str(blocker)]) == 2
