"""TensorRT build and runtime.

Two kinds of tests:
- without TensorRT (run everywhere): the module imports, a missing TensorRT is one clear error
  naming the JetPack package, `jetyolo build` exits 2 with that line, the build heartbeat, and the
  detection-agreement check the device tests rely on (with a case that must fail);
- with TensorRT + pycuda + a GPU (a Jetson): build an FP16 engine from the bundle, reuse it, run
  it with the TensorRT backend and compare its detections with ONNX Runtime's on the same frames.
  These skip where TensorRT is absent; they never fake a TensorRT result.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from device.detections import Detections
from device.errors import JetyoloError

SKIP_REASON = "TensorRT is not installed (it ships with JetPack; this machine has no GPU)"


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return np.asarray(inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9))


def detections_agree(a: Detections, b: Detections, iou: float = 0.9, share: float = 0.9) -> bool:
    """At least ``share`` of the detections of each side have a same-class partner with IoU >=
    ``iou`` on the other side (FP16 moves boxes by a fraction of a pixel, not more)."""
    if len(a) == 0 or len(b) == 0:
        return len(a) == len(b)
    overlap = box_iou(a.xyxy, b.xyxy) * (a.class_id[:, None] == b.class_id[None, :])
    matched_a = (overlap.max(axis=1) >= iou).mean()
    matched_b = (overlap.max(axis=0) >= iou).mean()
    return bool(min(matched_a, matched_b) >= share)


def dets(*rows: List[float]) -> Detections:
    array = np.asarray(rows, dtype=np.float32).reshape(-1, 6)
    return Detections(array[:, :4], array[:, 4], array[:, 5].astype(np.int32))


@pytest.mark.parametrize(
    ("a", "b", "agree"),
    [
        (dets([10, 10, 50, 50, 0.9, 0]), dets([10.2, 10, 50, 50.3, 0.88, 0]), True),  # FP16 jitter
        (dets(), dets(), True),  # both empty
        (dets([10, 10, 50, 50, 0.9, 0]), dets([10, 10, 50, 50, 0.9, 1]), False),  # other class
        (dets([10, 10, 50, 50, 0.9, 0]), dets([30, 30, 70, 70, 0.9, 0]), False),  # moved box
        (dets([10, 10, 50, 50, 0.9, 0]), dets(), False),  # lost detection
        (dets([10, 10, 50, 50, 0.9, 0], [60, 60, 90, 90, 0.8, 2]),
         dets([10, 10, 50, 50, 0.9, 0]), False),  # half of one side unmatched
    ],
)
def test_detections_agree(a, b, agree):
    assert detections_agree(a, b) is agree


# ---- without TensorRT --------------------------------------------------------------------------
no_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)


def test_module_imports_without_tensorrt():
    import device.backends.tensorrt as module

    assert module.TensorRTBackend.kind == "tensorrt"


@no_tensorrt
def test_missing_tensorrt_is_one_clear_error():
    from device.backends.tensorrt_util import import_tensorrt

    with pytest.raises(JetyoloError, match="sudo apt install python3-libnvinfer"):
        import_tensorrt()


@no_tensorrt
def test_build_verb_without_tensorrt_exits_with_one_line(tmp_path, capsys):
    from device.bundle import write_new_bundle
    from device.cli import main

    (tmp_path / "m.onnx").write_bytes(b"onnx")
    variant = {"file": "model.onnx", "input": {}, "outputs": {}}
    manifest = {"schema_version": 1, "name": "t", "class_names": ["a"],
                "preprocess": {"size": [320, 320]}, "postprocess": {},
                "variants": {"fp32": variant}}
    write_new_bundle(tmp_path / "b", {"model.onnx": tmp_path / "m.onnx"}, manifest)
    assert main(["build", str(tmp_path / "b"), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jetyolo: error: TensorRT is not installed")
    assert "python3-libnvinfer" in err[0] and "--system-site-packages" in err[0]


def test_build_heartbeat_reports_elapsed_time():
    from device.backends.tensorrt_build import Heartbeat

    lines: List[str] = []
    with Heartbeat(lines.append, every=0.05):
        time.sleep(0.3)
    assert lines and all(line.startswith("engine: still building (0 min") for line in lines)
    count = len(lines)
    time.sleep(0.15)
    assert len(lines) == count  # stopped with the block


def test_an_unwritable_timing_cache_does_not_cost_the_engine(tmp_path):
    from device.backends.tensorrt_build import _save_timing_cache

    class Config:  # what _save_timing_cache reads of an IBuilderConfig
        def get_timing_cache(self) -> Any:
            return self

        def serialize(self) -> bytes:
            return b"timings"

    lines: List[str] = []
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _save_timing_cache(Config(), blocker / "timing.cache", lines.append)  # must not raise
    assert len(lines) == 1 and "not saved" in lines[0] and "the engine is kept" in lines[0]
    _save_timing_cache(Config(), tmp_path / "timing.cache", lines.append)
    assert (tmp_path / "timing.cache").read_bytes() == b"timings" and len(lines) == 1


class _FakeCudaContext:
    def __init__(self, log: List[str]) -> None:
        self.log = log

    def push(self) -> None:
        self.log.append("push")

    def pop(self) -> None:
        self.log.append("pop")

    def detach(self) -> None:
        self.log.append("detach")


def _fake_cuda_stack(monkeypatch, engine: Any) -> List[str]:
    """Stand-ins for ``tensorrt`` and ``pycuda.driver`` that reach TensorRTBackend's error paths
    (no inference result is faked: the engine never runs)."""
    import types

    log: List[str] = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"  # type: ignore[attr-defined]
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.init_libnvinfer_plugins = lambda logger, namespace: True  # type: ignore[attr-defined]
    trt.Runtime = lambda logger: types.SimpleNamespace(  # type: ignore[attr-defined]
        deserialize_cuda_engine=lambda data: engine
    )
    cuda = types.ModuleType("pycuda.driver")
    cuda.Error = type("Error", (Exception,), {})  # type: ignore[attr-defined]
    cuda.init = lambda: None  # type: ignore[attr-defined]
    cuda.Device = lambda index: types.SimpleNamespace(  # type: ignore[attr-defined]
        retain_primary_context=lambda: _FakeCudaContext(log)
    )
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    monkeypatch.setattr("device.backends.tensorrt_util._LOGGER", None)
    return log


def test_an_engine_without_gpu_memory_for_its_context_is_one_clear_error(tmp_path, monkeypatch):
    from device.backends.tensorrt import TensorRTBackend

    class NoMemoryEngine:
        def create_execution_context(self) -> None:
            return None  # what TensorRT returns when it cannot allocate the context's memory

    log = _fake_cuda_stack(monkeypatch, NoMemoryEngine())
    plan = tmp_path / "fp16.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(JetyoloError, match=r"cannot create an execution context.*GPU memory"):
        TensorRTBackend(plan).activate()
    assert log == ["push", "pop", "detach"]  # the CUDA context is not left pushed


def test_an_unreadable_engine_is_one_clear_error(tmp_path, monkeypatch):
    from device.backends.tensorrt import TensorRTBackend

    log = _fake_cuda_stack(monkeypatch, engine=None)
    plan = tmp_path / "fp16.plan"
    plan.mkdir()  # is_file() is False: refused before CUDA starts
    with pytest.raises(JetyoloError, match="does not exist; run `jetyolo build`"):
        TensorRTBackend(plan).activate()
    assert log == []
    plan.rmdir()
    plan.write_bytes(b"plan")

    def unreadable(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    with pytest.raises(JetyoloError, match=r"cannot be loaded .*Permission denied"):
        TensorRTBackend(plan).activate()
    assert log == ["push", "pop", "detach"]


# ---- with TensorRT (a Jetson) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt() -> Any:
    module = pytest.importorskip("tensorrt", reason=SKIP_REASON)
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed (build it on the Jetson)")
    return module


@pytest.fixture(scope="module")
def fp16_engine(trt, tiny_bundle_dir, tmp_path_factory):
    from device.backends.tensorrt_build import TensorRTBuildOps
    from device.bundle import Bundle
    from device.engine import BuildRequest, ensure_engine

    cache_dir = tmp_path_factory.mktemp("engines")
    bundle = Bundle.load(tiny_bundle_dir)  # device code only: no host/torch on the Jetson
    request = BuildRequest(precision="fp16", workspace_bytes=512 << 20, cache_dir=cache_dir)
    result = ensure_engine(bundle, request, TensorRTBuildOps(), print)
    assert result.built
    return bundle, request, result


def frames(count: int) -> List[np.ndarray]:
    """Camera-sized BGR frames with a few bright rectangles (no video file, no host code)."""
    rng = np.random.default_rng(1)
    images = []
    for _ in range(count):
        frame = np.full((480, 640, 3), 40, np.uint8)
        for _ in range(3):
            x, y = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            frame[y:y + 80, x:x + 80] = rng.integers(100, 255, 3, dtype=np.uint8)
        images.append(frame)
    return images


def test_fp16_engine_is_cached_and_reused(fp16_engine):
    from device.backends.tensorrt_build import TensorRTBuildOps
    from device.engine import ensure_engine
    from device.engine_cache import needs_rebuild

    bundle, request, first = fp16_engine
    assert first.plan.is_file() and needs_rebuild(first.plan, first.key)[0] is False
    again = ensure_engine(bundle, request, TensorRTBuildOps(), print)
    assert not again.built and again.plan == first.plan


def test_truncated_engine_is_rebuilt(fp16_engine, tmp_path):
    from device.backends.tensorrt_build import TensorRTBuildOps
    from device.engine import BuildRequest, ensure_engine
    from device.engine_cache import sidecar_path

    bundle, request, first = fp16_engine
    cache_dir = tmp_path / "engines"
    plan = cache_dir / first.plan.relative_to(request.cache_dir)
    plan.parent.mkdir(parents=True)
    shutil.copy(first.plan, plan)
    shutil.copy(sidecar_path(first.plan), sidecar_path(plan))
    plan.write_bytes(plan.read_bytes()[:1000])
    rebuilt = ensure_engine(
        bundle, BuildRequest(precision="fp16", workspace_bytes=512 << 20, cache_dir=cache_dir),
        TensorRTBuildOps(), print,
    )
    assert rebuilt.built and "truncated" in rebuilt.reason


def test_tensorrt_matches_onnxruntime(fp16_engine):
    from device.backends.onnxruntime import OnnxRuntimeBackend
    from device.backends.tensorrt import TensorRTBackend
    from device.postprocess import PostprocessConfig, postprocess
    from device.preprocess import Preprocessor

    bundle, _, result = fp16_engine
    config = PostprocessConfig()
    with TensorRTBackend(result.plan) as trt_backend, \
            OnnxRuntimeBackend(bundle.model_path("fp32")) as ort_backend:
        buffer = trt_backend.input_buffer
        assert buffer.flags.c_contiguous
        preprocess = Preprocessor(bundle.input_size, "float32", buffer=buffer)
        name = trt_backend.input_spec.name
        compared = 0
        for frame in frames(5):
            geometry = preprocess(frame)
            trt_out = trt_backend.infer({name: buffer})
            ort_out = ort_backend.infer({name: np.array(buffer)})
            assert set(trt_out) == set(ort_out)
            scores_gap = np.abs(trt_out["scores"] - ort_out["scores"]).max()
            assert scores_gap < 0.05, f"FP16 scores differ by {scores_gap}"
            found = postprocess(trt_out, geometry, config)
            expected = postprocess(ort_out, geometry, config)
            assert detections_agree(found, expected), (found.to_list(), expected.to_list())
            compared += 1
        assert compared == 5


def test_foreign_calibration_cache_is_refused_on_device(trt, tiny_bundle_dir, tmp_path):
    from device.backends.tensorrt_build import TensorRTBuildOps
    from device.bundle import Bundle, add_files
    from device.calibcache import write_cache
    from device.engine import BuildRequest, ensure_engine

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, copy)
    version = trt.__version__
    foreign = write_cache(tmp_path / "c.cache", {"images": 1.0, "not_in_network": 2.0}, version)
    bundle = add_files(Bundle.load(copy), {"calib/foreign.cache": foreign})
    with pytest.raises(JetyoloError, match="not_in_network"):
        ensure_engine(bundle, BuildRequest("int8", "cache", cache_dir=tmp_path / "e"),
                      TensorRTBuildOps(), print)
