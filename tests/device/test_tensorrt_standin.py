"""jetyolo's TensorRT code (engine build, cache checks, runner) against the TensorRT stand-in, one
profile per supported version (tests/trt_standin/profiles.py cites each fact).

These say that our code uses each version's API as its sources describe; they say nothing about
TensorRT's arithmetic (the stand-in runs the ONNX model on ONNX Runtime's CPU). Real-TensorRT
tests are in test_tensorrt.py and skip without a GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from trt_standin.profiles import PROFILES
from trt_standin.standin import World, install

from device.backends import open_chosen
from device.bundle import Bundle, add_files
from device.calibcache import write_cache
from device.choice import BackendChoice
from device.engine import BuildRequest, EngineResult, ensure_engine
from device.engine_cache import timing_cache_path
from device.errors import JetyoloError

VERSIONS = list(PROFILES)
CALIBRATED = [version for version in VERSIONS if PROFILES[version].calibrators]


@pytest.fixture(params=VERSIONS)
def standin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> World:
    return install(monkeypatch, request.param)


def onnx_float_tensors(path: Path) -> List[str]:
    """What the host records as ``calibration.tensors``: the graph's float input and the float
    outputs of its nodes (Constant nodes give TensorRT no layer)."""
    import onnx
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {value.name: value.type.tensor_type.elem_type
             for value in (*graph.input, *graph.value_info, *graph.output)}
    names = [value.name for value in graph.input if types[value.name] == onnx.TensorProto.FLOAT]
    names += [out for node in graph.node if node.op_type != "Constant" for out in node.output
              if types.get(out) == onnx.TensorProto.FLOAT]
    return names


@pytest.fixture(scope="module")
def graph_tensors(bundle_dir: Path) -> List[str]:
    return onnx_float_tensors(bundle_dir / "model.onnx")


def build(bundle: Bundle, tmp_path: Path, log: List[str], **request: Any) -> EngineResult:
    from device.backends.tensorrt_build import TensorRTBuildOps

    options: Dict[str, Any] = {"cache_dir": tmp_path / "engines", **request}
    return ensure_engine(bundle, BuildRequest(**options), TensorRTBuildOps(), log.append)


def copy_bundle(bundle_dir: Path, tmp_path: Path) -> Bundle:
    shutil.copytree(bundle_dir, tmp_path / "bundle")
    return Bundle.load(tmp_path / "bundle")


def test_the_default_engine_builds_loads_and_runs(standin: World, bundle_dir: Path,
                                                  tmp_path: Path) -> None:
    from device.backends.onnxruntime import OnnxRuntimeBackend
    from device.backends.tensorrt import TensorRTBackend

    bundle, log = Bundle.load(bundle_dir), []
    result = build(bundle, tmp_path, log)
    # the default precision per version: fp16 through the FP16 flag on 8.5-10.x; TensorRT 11 has
    # no FP16 flag: the bundle's fp16 graph, strongly typed (device.build_plan.default_precision)
    assert result.key.precision == "fp16"
    assert result.key.variant == ("fp16" if standin.profile.major >= 11 else "fp32")
    assert ("FP16" in standin.builds[-1]["flags"]) is (standin.profile.major < 11)
    opened = open_chosen(BackendChoice("tensorrt", cache_dir=tmp_path / "engines"), bundle)
    assert opened.precision == result.key.precision  # what run reports: the engine's own
    assert len(standin.builds) == 1  # run opens the plan build wrote
    frame = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    with TensorRTBackend(result.plan) as engine, \
            OnnxRuntimeBackend(bundle.model_path(result.key.variant)) as reference:
        buffer = engine.input_buffer
        np.copyto(buffer, frame)
        found, expected = engine.infer({"images": buffer}), reference.infer({"images": frame})
        assert engine.input_spec.dtype == np.float32
    assert set(found) == set(expected)
    for name in expected:  # the stand-in computes with ONNX Runtime: plumbing must be exact
        np.testing.assert_array_equal(found[name], expected[name])


def test_a_second_build_reuses_the_plan(standin: World, bundle_dir: Path, tmp_path: Path) -> None:
    bundle, log = Bundle.load(bundle_dir), []
    first = build(bundle, tmp_path, log, precision="fp32")
    again = build(bundle, tmp_path, log, precision="fp32")
    assert first.built and not again.built and again.plan == first.plan
    assert len(standin.builds) == 1


def test_fp32_engines_clear_tf32(standin: World, bundle_dir: Path, tmp_path: Path) -> None:
    build(Bundle.load(bundle_dir), tmp_path, [], precision="fp32")
    assert "TF32" not in standin.builds[-1]["flags"]  # on by default in every version


def test_fp16_on_tensorrt_11_builds_the_fp16_graph_or_says_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, bundle_dir: Path, tmp_path: Path
) -> None:
    world = install(monkeypatch, "11")
    bundle = copy_bundle(bundle_dir, tmp_path)
    manifest = dict(bundle.manifest, variants={name: variant for name, variant in
                                               bundle.manifest["variants"].items()
                                               if name != "fp16"})
    bundle = Bundle(bundle.root, manifest)  # a bundle exported before the fp16 variant existed
    with pytest.raises(JetyoloError, match=r"no 'fp16' variant; re-export"):
        build(bundle, tmp_path, [], precision="fp16")
    with pytest.raises(JetyoloError, match=r"--variant uint8"):
        build(bundle, tmp_path, [], precision="fp16", variant="uint8")
    variant = dict(bundle.variant("fp32"), file="model_fp16.onnx")  # any graph will do here
    bundle = add_files(bundle, {"model_fp16.onnx": bundle.model_path("fp32")},
                       {"variants": {"fp16": variant}})
    result = build(bundle, tmp_path, [])  # the default is now fp16
    assert result.key.precision == "fp16" and result.key.variant == "fp16"
    assert result.plan.name == "fp16.plan"
    assert world.builds[-1]["onnx"].endswith("model_fp16.onnx")
    assert world.builds[-1]["strongly_typed"] and "FP16" not in world.builds[-1]["flags"]


def with_cache(bundle: Bundle, tmp_path: Path, version: str, tensors: List[str],
               listed: List[str]) -> Bundle:
    cache = write_cache(tmp_path / "c.cache", dict.fromkeys(tensors, 1.0), version)
    calibration = {"caches": {version: {"file": "calibration/c.cache"}},
                   "tensors": {"fp32": listed}}
    return add_files(bundle, {"calibration/c.cache": cache}, {"calibration": calibration})


@pytest.mark.parametrize("version", CALIBRATED)
def test_int8_from_a_cache_of_the_onnx_graph_builds_and_helpers_run_in_float(
    version: str, monkeypatch: pytest.MonkeyPatch, bundle_dir: Path, tmp_path: Path,
    graph_tensors: List[str],
) -> None:
    world = install(monkeypatch, version)
    trt_version = ".".join(world.profile.version.split(".")[:3])
    bundle = with_cache(copy_bundle(bundle_dir, tmp_path), tmp_path, trt_version,
                        graph_tensors, graph_tensors)
    log: List[str] = []
    result = build(bundle, tmp_path, log, precision="int8", int8_from="cache")
    assert result.built and result.key.int8_source == "cache"
    fallback = world.builds[-1]["int8"]["fallback"]
    # YOLO11's attention scale (attn/Mul by a scalar) makes the parser broadcast a constant
    prefix = "ONNXTRT_Broadcast" if world.profile.onnxtrt_helper_names else "(Unnamed Layer*"
    assert fallback and all(name.startswith(prefix) for name in fallback)
    assert any("run in float" in line and repr(fallback[0]) in line for line in log)


@pytest.mark.parametrize("version", CALIBRATED)
def test_int8_from_a_cache_lacking_an_onnx_tensor_is_refused(
    version: str, monkeypatch: pytest.MonkeyPatch, bundle_dir: Path, tmp_path: Path,
    graph_tensors: List[str],
) -> None:
    world = install(monkeypatch, version)
    trt_version = ".".join(world.profile.version.split(".")[:3])
    lacking = [name for name in graph_tensors if name != "/model.0/conv/Conv_output_0"]
    bundle = with_cache(copy_bundle(bundle_dir, tmp_path), tmp_path, trt_version, lacking,
                        graph_tensors)
    with pytest.raises(JetyoloError, match=r"lacks 1 network tensor\(s\): '/model.0/conv/Conv_"):
        build(bundle, tmp_path, [], precision="int8", int8_from="cache")
    assert world.builds == []


@pytest.mark.parametrize(
    ("blob", "mismatch"),
    [(b"garbage, not a timing cache", False),  # create_timing_cache -> None
     (None, True)],  # set_timing_cache -> False (a cache of another device)
)
def test_timing_cache_trouble_costs_time_not_the_plan(
    standin: World, bundle_dir: Path, tmp_path: Path, blob: Any, mismatch: bool
) -> None:
    standin.timing_cache_mismatch = mismatch
    cache_file = timing_cache_path(tmp_path / "engines", standin.profile.version, "8.7")
    if blob is not None:
        cache_file.parent.mkdir(parents=True)
        cache_file.write_bytes(blob)
    log: List[str] = []
    result = build(Bundle.load(bundle_dir), tmp_path, log, precision="fp32")
    assert result.built and result.plan.is_file()
    assert any("timing cache" in line for line in log)


def layer_names(version: str, monkeypatch: pytest.MonkeyPatch, path: Path) -> Tuple[Any, ...]:
    from device.backends.tensorrt_build import TensorRTBuildOps

    install(monkeypatch, version)
    return TensorRTBuildOps().network_layers(path, strongly_typed=False)


def test_the_parser_names_helpers_as_each_version_does(
    monkeypatch: pytest.MonkeyPatch, bundle_dir: Path
) -> None:
    """The stand-in's own cited fact (profiles.py, onnxtrt_helper_names): < 8.7 unnamed."""
    for version in VERSIONS:
        _, layers = layer_names(version, monkeypatch, bundle_dir / "model.onnx")
        helpers = [layer.name for layer in layers if layer.type == "SHUFFLE"
                   and not layer.name.startswith("/")]
        expected = "ONNXTRT_Broadcast" if PROFILES[version].major >= 10 else "(Unnamed Layer* "
        assert helpers and all(name.startswith(expected) for name in helpers), version


def test_run_loads_the_plan_built_with_a_workspace_and_a_dla_core(
    monkeypatch: pytest.MonkeyPatch, bundle_dir: Path, tmp_path: Path
) -> None:
    from device.config import RunConfig
    from device.setup import open_configured_backend

    world = install(monkeypatch, "10.3")
    bundle = Bundle.load(bundle_dir)
    built = build(bundle, tmp_path, [], precision="fp16", workspace_bytes=512 << 20, dla_core=1)
    assert built.plan.name == "fp16-dla1.plan" and world.builds[-1]["dla_core"] == 1
    config = RunConfig(bundle=str(bundle_dir), source="s", backend="tensorrt", precision="fp16",
                       engine_cache_dir=str(tmp_path / "engines"), workspace_mib=512, dla=1)
    backend = open_configured_backend(config, bundle)
    assert len(world.builds) == 1 and backend.name == "tensorrt:fp16-dla1.plan"
    open_configured_backend(RunConfig(bundle=str(bundle_dir), source="s", backend="tensorrt",
                                      precision="fp16", engine_cache_dir=str(tmp_path / "engines"),
                                      dla=1), bundle)
    assert len(world.builds) == 2  # workspace auto is another key: a build, then its own plan


def test_the_real_tensorrt_fixture_builds_and_runs_without_host_code(
    standin: World, tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    """test_tensorrt.py's fixture (a bundle around the committed tiny_detector.onnx) on every
    stand-in profile: what a Jetson with only the device extra will run."""
    from device.backends.tensorrt import TensorRTBackend

    result = build(Bundle.load(tiny_bundle_dir), tmp_path, [], precision="fp32")
    with TensorRTBackend(result.plan) as engine:
        outputs = engine.infer({"images": np.zeros((1, 3, 64, 64), np.float32)})
    assert outputs["boxes"].shape == (1, 4, 64) and outputs["scores"].shape == (1, 4, 64)
