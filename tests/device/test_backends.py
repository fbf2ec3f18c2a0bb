"""The backend interface: lifecycle, refusals that name the problem, ONNX Runtime results, and
how ``open_chosen`` chooses."""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import pytest

from device.backends import open_backend, open_chosen
from device.backends.base import Backend, TensorSpec
from device.backends.onnxruntime import OnnxRuntimeBackend
from device.bundle import Bundle
from device.choice import BackendChoice, ort_threading
from device.errors import JetyoloError

TENSORRT_PRESENT = importlib.util.find_spec("tensorrt") is not None


class DoublingBackend(Backend):
    """A pure-numpy backend: ``y = 2 * x``; counts lifecycle calls."""

    kind = "fake"

    def __init__(self) -> None:
        super().__init__("doubling")
        self.calls = {"activate": 0, "deactivate": 0, "infer": 0}

    def activate_impl(self) -> None:
        self.calls["activate"] += 1

    def input_specs_impl(self) -> Dict[str, TensorSpec]:
        return {"x": TensorSpec("x", (1, 3, 4, 4), np.dtype(np.float32))}

    def output_specs_impl(self) -> Dict[str, TensorSpec]:
        return {"y": TensorSpec("y", (1, 3, 4, 4), np.dtype(np.float32))}

    def infer_impl(
        self, feed: Mapping[str, np.ndarray], out: Optional[Dict[str, np.ndarray]]
    ) -> Dict[str, np.ndarray]:
        self.calls["infer"] += 1
        target = out if out is not None else {"y": np.empty((1, 3, 4, 4), np.float32)}
        np.multiply(feed["x"], 2, out=target["y"])
        return target

    def deactivate_impl(self) -> None:
        self.calls["deactivate"] += 1


def good_input() -> np.ndarray:
    return np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)


@pytest.mark.parametrize(
    "feed, message",
    [
        # wrong input name
        ({"images": good_input()}, "missing ['x']"),
        # an extra input next to the right one
        ({"x": good_input(), "z": good_input()}, "unknown ['z']"),
        # wrong shape
        ({"x": np.zeros((1, 3, 4, 5), np.float32)}, "shape [1, 3, 4, 5], model wants [1, 3, 4, 4]"),
        # wrong dtype
        ({"x": good_input().astype(np.float64)}, "dtype float64, model wants float32"),
        # not C-contiguous (a transposed view)
        ({"x": good_input().transpose(0, 1, 3, 2)}, "not C-contiguous"),
        # not an array at all
        ({"x": good_input().tolist()}, "is a list"),
    ],
)
def test_infer_refuses_bad_feeds_naming_the_problem(feed: dict, message: str) -> None:
    with DoublingBackend() as backend, pytest.raises(
        JetyoloError, match=message.replace("[", r"\[")
    ):
        backend.infer(feed)


def test_infer_before_activate_is_refused() -> None:
    backend = DoublingBackend()
    with pytest.raises(JetyoloError, match="before activate"):
        backend.infer({"x": good_input()})
    with pytest.raises(JetyoloError, match="before activate"):
        _ = backend.input_buffer
    assert backend.calls["infer"] == 0


def test_context_manager_activates_once_and_deactivates() -> None:
    backend = DoublingBackend()
    with backend:
        backend.activate()  # a second activate is a no-op
        assert backend.is_active
        result = backend.infer({"x": good_input()})
        np.testing.assert_array_equal(result["y"], good_input() * 2)
    assert not backend.is_active
    assert backend.calls == {"activate": 1, "deactivate": 1, "infer": 1}
    with pytest.raises(JetyoloError, match="before activate"):
        backend.infer({"x": good_input()})


def test_a_model_refused_at_activation_is_released() -> None:
    class DynamicBackend(DoublingBackend):
        def output_specs_impl(self) -> Dict[str, TensorSpec]:
            raise JetyoloError("ONNX tensor 'y' has dynamic shape")

    backend = DynamicBackend()
    with pytest.raises(JetyoloError, match="dynamic shape"):
        backend.activate()
    assert not backend.is_active
    assert backend.calls["deactivate"] == 1  # what activate_impl acquired is freed again


def test_out_arrays_are_checked_and_written_in_place() -> None:
    with DoublingBackend() as backend:
        out = backend.allocate_outputs()
        result = backend.infer({"x": good_input()}, out=out)
        assert result["y"] is out["y"]
        np.testing.assert_array_equal(out["y"], good_input() * 2)
        with pytest.raises(JetyoloError, match="allocate_outputs"):
            backend.infer({"x": good_input()}, out={"wrong": out["y"]})
        with pytest.raises(JetyoloError, match="output 'y' has dtype float16"):
            backend.infer({"x": good_input()}, out={"y": out["y"].astype(np.float16)})


def test_input_buffers_are_contiguous_distinct_and_stable() -> None:
    with DoublingBackend() as backend:
        ring = backend.allocate_inputs(3)
        assert len({buffer.ctypes.data for buffer in ring}) == 3
        assert all(buffer.flags.c_contiguous and buffer.shape == (1, 3, 4, 4) for buffer in ring)
        assert backend.input_buffer is ring[0]
        assert backend.allocate_inputs(2)[1] is ring[1]


@pytest.fixture(scope="module")
def ort_model(bundle_dir: Path) -> Path:
    return Bundle.load(bundle_dir).model_path("fp32")


def test_onnxruntime_specs_follow_the_bundle(ort_model: Path) -> None:
    with OnnxRuntimeBackend(ort_model, threads=1) as backend:
        assert backend.input_spec == TensorSpec("images", (1, 3, 320, 320), np.dtype(np.float32))
        assert backend.outputs == ["boxes", "scores"]
        assert backend.output_specs["scores"].shape[:2] == (1, 4)


def test_onnxruntime_io_binding_matches_session_run(ort_model: Path) -> None:
    rng = np.random.default_rng(0)
    with OnnxRuntimeBackend(ort_model, threads=1) as backend:
        backend.input_buffer[...] = rng.random(backend.input_buffer.shape, dtype=np.float32)
        feed = {"images": backend.input_buffer}
        plain = {name: array.copy() for name, array in backend.infer(feed).items()}
        out = backend.allocate_outputs()
        bound = backend.infer(feed, out=out)
        assert bound["boxes"] is out["boxes"]
        for name in plain:
            np.testing.assert_allclose(bound[name], plain[name], rtol=1e-5, atol=1e-4)
        # the comparison is not vacuous: a different input gives different scores
        backend.input_buffer[...] = 0.5
        other = backend.infer(feed)
        assert not np.allclose(other["scores"], plain["scores"], atol=1e-4)


def test_onnxruntime_missing_model_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(JetyoloError, match="does not exist"):
        OnnxRuntimeBackend(tmp_path / "nope.onnx").activate()


def test_open_chosen_onnxruntime_and_bad_kind(bundle_dir: Path) -> None:
    bundle = Bundle.load(bundle_dir)
    backend = open_chosen(BackendChoice("onnxruntime", threads=1), bundle)
    assert isinstance(backend, OnnxRuntimeBackend) and not backend.is_active
    with pytest.raises(JetyoloError, match="not one of auto, tensorrt, onnxruntime"):
        BackendChoice("cuda")
    with pytest.raises(JetyoloError, match="precision 'int4'"):
        BackendChoice("onnxruntime", precision="int4")
    with pytest.raises(JetyoloError, match="no variant 'uint8'"):
        open_chosen(BackendChoice("onnxruntime", variant="uint8"), bundle)


@pytest.mark.skipif(TENSORRT_PRESENT, reason="TensorRT is installed: the fallback is not taken")
def test_auto_falls_back_to_onnxruntime_and_says_why(
    bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="device.backends"):
        backend = open_chosen(BackendChoice("auto"), Bundle.load(bundle_dir))
    assert backend.kind == "onnxruntime"
    assert "auto: TensorRT unavailable: Python module 'tensorrt' is not installed" in caplog.text


@pytest.mark.skipif(TENSORRT_PRESENT, reason="TensorRT is installed here")
def test_explicit_tensorrt_without_tensorrt_names_the_jetpack_package(bundle_dir: Path) -> None:
    with pytest.raises(JetyoloError, match="python3-libnvinfer"):
        open_chosen(BackendChoice("tensorrt"), Bundle.load(bundle_dir))


def test_auto_falls_back_when_the_engine_cannot_be_built(
    bundle_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import device.backends as backends

    def failing_build(*_args: object) -> Backend:
        raise JetyoloError("engine built for Orin (sm_87) cannot load on this GPU")

    monkeypatch.setattr(backends, "tensorrt_missing", lambda: None)  # pretend TensorRT is here
    monkeypatch.setattr(backends, "_open_tensorrt", failing_build)
    with caplog.at_level(logging.INFO, logger="device.backends"):
        backend = open_chosen(BackendChoice("auto"), Bundle.load(bundle_dir))
    assert backend.kind == "onnxruntime"
    assert (
        "auto: TensorRT engine could not be built or loaded: engine built for Orin" in caplog.text
    )
    # asked for explicitly, the same failure is an error, not a silent CPU fallback
    with pytest.raises(JetyoloError, match="engine built for Orin"):
        open_chosen(BackendChoice("tensorrt"), Bundle.load(bundle_dir))


def test_onnxruntime_workers_run_calls_at_once_each_into_its_own_outputs(ort_model: Path) -> None:
    """Two 1-thread workers over one session: each submitted call writes its own outputs, equal
    to a synchronous call on the same input (the inputs differ, so a mix-up shows)."""
    rng = np.random.default_rng(1)
    inputs = [rng.random((1, 3, 320, 320), dtype=np.float32) for _ in range(4)]
    with OnnxRuntimeBackend(ort_model, threads=2, workers=1) as single:
        expected = [{k: v.copy() for k, v in single.infer({"images": x}).items()} for x in inputs]
        assert single.concurrency == 1 and single.intra_op_threads() == 2
    with OnnxRuntimeBackend(ort_model, threads=2, workers=2) as backend:
        assert backend.concurrency == 2 and backend.intra_op_threads() == 1
        outs = [backend.allocate_outputs() for _ in inputs]
        futures = [backend.submit({"images": x}, out) for x, out in zip(inputs, outs)]
        timings = [future.result() for future in futures]
        assert all(t.wall_s > 0 for t in timings)
        pool = [t for t in threading.enumerate() if t.name.startswith("jetyolo-ort")]
        assert len(pool) == 2
    for want, got in zip(expected, outs):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-4)
    assert not np.allclose(outs[0]["scores"], outs[1]["scores"], atol=1e-4)
    with pytest.raises(JetyoloError, match="workers must be at least 1"):
        OnnxRuntimeBackend(ort_model, workers=0)


def test_the_cpu_runs_the_uint8_graph_when_the_bundle_has_one(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """No --variant on ONNX Runtime: uint8 if the bundle has it (same numbers, less CPU work
    before inference), else fp32."""
    import shutil

    plain = open_backend("onnxruntime", Bundle.load(bundle_dir))
    assert isinstance(plain, OnnxRuntimeBackend) and plain.model_path.name == "model.onnx"
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    manifest = dict(Bundle.load(copy).manifest)
    manifest["variants"] = dict(manifest["variants"])
    manifest["variants"]["uint8"] = dict(manifest["variants"]["fp32"], file="model_u8.onnx")
    with_uint8 = open_backend("onnxruntime", Bundle(copy, manifest))
    assert isinstance(with_uint8, OnnxRuntimeBackend)
    assert with_uint8.model_path.name == "model_u8.onnx"
    chosen = open_backend("onnxruntime", Bundle(copy, manifest), variant="fp32")
    assert isinstance(chosen, OnnxRuntimeBackend) and chosen.model_path.name == "model.onnx"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, "fp32"),
        ({"precision": "fp16"}, "fp32"),  # ONNX Runtime runs the float graph as stored
        ({"variant": "int8-qdq"}, "int8"),  # the Q/DQ model
        ({"variant": "fp16"}, "fp16"),  # the float16 graph (its manifest's float_dtype)
    ],
)
def test_a_backend_says_the_precision_it_runs(bundle_dir: Path, tmp_path: Path,
                                              values: Dict[str, Any], expected: str) -> None:
    import shutil

    from device.bundle import add_files

    bundle = Bundle.load(bundle_dir)
    if "variant" in values:  # any graph will do: nothing runs
        shutil.copytree(bundle_dir, tmp_path / "b")
        bundle = Bundle.load(tmp_path / "b")
        variant = dict(bundle.variant("fp32"), file="model_qdq.onnx")
        bundle = add_files(bundle, {"model_qdq.onnx": bundle.model_path("fp32")},
                           {"variants": {"int8-qdq": variant}})
    backend = open_chosen(BackendChoice("onnxruntime", **values), bundle)
    assert backend.precision == expected


@pytest.mark.parametrize("threads, workers, cores, expected", [
    (None, None, 2, (2, 1)),  # the measured case: two 1-thread calls at once on 2 cores
    (None, None, 1, (1, None)),  # one core: one call, ORT's default threads
    (None, None, 6, (2, 3)),  # an Orin NX: capped at 2 workers (6 cores not measured)
    (2, None, 2, (1, 2)),  # threads chosen for one call (the bench's --threads)
    (4, 2, 8, (2, 2)),  # both set: threads shared
    (None, 3, 6, (3, 2)),  # workers set: the cores shared
    (1, 4, 2, (4, 1)),  # at least one thread each
])
def test_ort_threading_rule(threads: Optional[int], workers: Optional[int], cores: int,
                            expected: tuple) -> None:
    plan = ort_threading(threads, workers, cores)
    assert (plan.workers, plan.threads_per_call) == expected
    assert not plan.spin  # spinning starves capture and preprocess on a busy machine
