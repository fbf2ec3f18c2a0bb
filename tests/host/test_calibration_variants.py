"""One TensorRT cache per variant: each covers exactly the float tensors of its own ONNX graph
(the uint8 prologue from the input contract, the NMS kept in float), the network input's scale
comes from the preprocessing contract, and the manifest records each cache's tensor list."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Set

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from device.bundle import Bundle, add_files
from device.calibcache import format_cache, read_cache
from device.cli import main
from device.errors import JetyoloError
from device.postprocess import PostprocessConfig
from host import cache_variants, surgeon
from host.calibrate import QDQ_FILE, TRTEXEC_ALGORITHM, calibrate
from host.export import nms_variant, uint8_variant

VERSIONS = ["10.3.0", "8.6.2"]
RECIPE_OVERRIDES = {"num": 16, "min_images": 16, "trt_versions": VERSIONS, "sensitivity_images": 4,
                    "max_fp16_layers": 0}
INPUT_SCALE = float(np.float32(1.0 / 127.0))  # [0, 1] input: amax 1
UINT8_SCALE = float(np.float32(255.0 / 127.0))  # [0, 255] prologue


def _with_variants(bundle_dir: Path, target: Path) -> Bundle:
    """The shared bundle plus uint8 and nms variants made by export's own passes (no torch)."""
    shutil.copytree(bundle_dir, target)
    bundle = Bundle.load(target)
    model = onnx.load(str(bundle.model_path("fp32")))
    config = PostprocessConfig()
    passes = {"model_uint8.onnx": surgeon.uint8_input,
              "model_nms.onnx": surgeon.efficient_nms(config.conf, config.iou, config.max_det)}
    files = {}
    for name, graph_pass in passes.items():
        files[name] = target.parent / name
        onnx.save(surgeon.apply_passes(model, [graph_pass])[0], str(files[name]))
    fp32 = bundle.variant("fp32")
    variants = {"uint8": uint8_variant(fp32, 1, bundle.input_size),
                "nms": nms_variant(fp32, config)}
    updates = {"variants": variants}
    return add_files(bundle, files, updates)


@pytest.fixture(scope="module")
def calibrated(bundle_dir: Path, synth_dataset: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    from host.calibrate import DEFAULT_RECIPE

    bundle = _with_variants(bundle_dir, tmp_path_factory.mktemp("variants") / "bundle")
    images = synth_dataset.parent / "train" / "images"
    return calibrate(bundle.root, images, dict(DEFAULT_RECIPE, **RECIPE_OVERRIDES))


def _expected_tensors(model: Any, postprocess: Set[str]) -> Dict[str, List[str]]:
    """From the variant's ONNX alone: its float32 graph inputs and node outputs, split into the
    ones post-processing computes (kept float) and the rest (each must have a scale)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    declared = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    is_float = {v.name for v in declared if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    names = [i.name for i in model.graph.input] + [t for n in model.graph.node for t in n.output]
    floats = [name for name in names if name in is_float]
    kept = {t for node in model.graph.node if node.name in postprocess for t in node.output}
    return {"cached": [t for t in floats if t not in kept],
            "float": [t for t in floats if t in kept]}


@pytest.mark.parametrize("variant", ["fp32", "uint8", "nms"])
@pytest.mark.parametrize("version", VERSIONS)
def test_each_variant_cache_covers_its_own_graph(
    calibrated: Bundle, variant: str, version: str
) -> None:
    model = onnx.load(str(calibrated.model_path(variant)))
    head = set(calibrated.manifest["head"]["postprocess_nodes"])
    nms_nodes = {n.name for n in model.graph.node if n.name.startswith("/nms/")}
    expected = _expected_tensors(model, head | nms_nodes)
    calibration = calibrated.manifest["calibration"]
    record = calibration["variants"][variant]
    cache = read_cache(calibrated.path(record["caches"][version]["file"]))
    assert list(cache.scales) == expected["cached"]
    assert record["uncached_tensors"] == expected["float"]
    assert sorted(calibration["tensors"][variant]) == sorted(expected["cached"] + expected["float"])
    assert nms_nodes <= set(record["fp16_layers"]) and head <= set(record["fp16_layers"])
    assert cache.header == record["caches"][version]["header"]


def test_variant_caches_share_the_measured_scales(calibrated: Bundle) -> None:
    variants = calibrated.manifest["calibration"]["variants"]
    caches = {name: read_cache(calibrated.path(entry["caches"]["10.3.0"]["file"]))
              for name, entry in variants.items()}
    fp32 = caches["fp32"].scales
    for name in ("uint8", "nms"):
        shared = [t for t in caches[name].scales if t in fp32 and t != "images"]
        assert len(shared) > 200
        assert all(caches[name].scales[t] == fp32[t] for t in shared), name


def test_uint8_prologue_scales_follow_the_input_contract(calibrated: Bundle) -> None:
    record = calibrated.manifest["calibration"]["variants"]["uint8"]
    scales = read_cache(calibrated.path(record["caches"]["10.3.0"]["file"])).scales
    assert "images" not in scales  # the uint8 network input itself is not float
    assert scales["images_float_nhwc"] == scales["images_unscaled_nchw"] == pytest.approx(
        UINT8_SCALE, rel=1e-6)
    assert scales["images_float_nchw"] == pytest.approx(INPUT_SCALE, rel=1e-6)


def test_input_scale_comes_from_the_contract_in_both_int8_forms(calibrated: Bundle) -> None:
    cache = read_cache(calibrated.path("calibration/trt-10.3.0.cache"))
    assert cache.scales["images"] == pytest.approx(INPUT_SCALE, rel=1e-6)
    qdq = onnx.load(str(calibrated.path(QDQ_FILE)))
    inits = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    quantize_input = next(n for n in qdq.graph.node
                          if n.op_type == "QuantizeLinear" and n.input[0] == "images")
    assert float(inits[quantize_input.input[1]]) == pytest.approx(INPUT_SCALE, rel=1e-6)


def _tiny(nodes: List[Any], inits: List[Any]) -> Any:
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_float_tensor_without_range_is_refused() -> None:
    half = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")
    scaled = _tiny([helper.make_node("Mul", ["x", "half"], ["y"], name="scale")], [half])
    preprocess = {"scale": 1 / 255}
    ok = cache_variants.variant_cache("v", scaled, "float32", {}, [], set(), preprocess)
    assert ok.entries == pytest.approx({"x": 1.0, "y": 0.5})
    unknown = _tiny([helper.make_node("Sqrt", ["x"], ["y"], name="root")], [])
    with pytest.raises(JetyoloError, match=r"variant 'v': tensor 'y' has no calibrated range"):
        cache_variants.variant_cache("v", unknown, "float32", {}, [], set(), preprocess)
    with pytest.raises(JetyoloError, match=r"preprocess.scale is None"):
        cache_variants.variant_cache("v", scaled, "float32", {}, [], set(), {})


def test_jetpack7_header_is_trt_101303() -> None:
    assert format_cache({"images": 1.0}, "10.13.3").splitlines()[0] == (
        "TRT-101303-EntropyCalibration2")


@pytest.mark.parametrize("algorithm, noted", [("MinMaxCalibration", True),
                                               (TRTEXEC_ALGORITHM, False)])
def test_calibrate_says_when_trtexec_cannot_read_the_caches(
    calibrated: Bundle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    algorithm: str, noted: bool,
) -> None:
    manifest = dict(calibrated.manifest)
    manifest["calibration"] = dict(manifest["calibration"], algorithm=algorithm)
    monkeypatch.setattr("host.calibrate.calibrate",
                        lambda *args, **kwargs: Bundle(calibrated.root, manifest))
    assert main(["calibrate", str(calibrated.root), "--images", str(calibrated.root)]) == 0
    out = capsys.readouterr().out
    assert "TensorRT 10.3.0 uint8: " in out and "calibration/trt-10.3.0-uint8.cache" in out
    assert ("trtexec --calib reads only EntropyCalibration2" in out) == noted


def _frame_prologue(resize_mode: str) -> Any:
    """uint8 NHWC frame -> Cast -> Transpose -> Resize -> Pad 114 -> Gather (BGR->RGB) -> /255,
    as `export --frame-input` builds it (host/surgeon.py)."""
    inits = [numpy_helper.from_array(np.array([1, 3, 4, 4], np.int64), "sizes"),
             numpy_helper.from_array(np.zeros(8, np.int64), "pads"),
             numpy_helper.from_array(np.array(114.0, np.float32), "pad_value"),
             numpy_helper.from_array(np.array([2, 1, 0], np.int64), "bgr"),
             numpy_helper.from_array(np.array(1 / 255, np.float32), "scale")]
    nodes = [helper.make_node("Cast", ["frame"], ["f"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2], name="t"),
             helper.make_node("Resize", ["nchw", "", "", "sizes"], ["resized"], mode=resize_mode,
                              name="resize"),
             helper.make_node("Pad", ["resized", "pads", "pad_value"], ["padded"], name="pad"),
             helper.make_node("Gather", ["padded", "bgr"], ["rgb"], axis=1, name="gather"),
             helper.make_node("Mul", ["rgb", "scale"], ["y"], name="scale_node")]
    graph = helper.make_graph(
        nodes, "frame", [helper.make_tensor_value_info("frame", TensorProto.UINT8, [1, 6, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_frame_input_prologue_follows_the_contract() -> None:
    cache = cache_variants.variant_cache("frame", _frame_prologue("linear"), "uint8", {}, [],
                                         set(), {"scale": 1 / 255})
    assert cache.entries == pytest.approx(
        {"f": 255.0, "nchw": 255.0, "resized": 255.0, "padded": 255.0, "rgb": 255.0, "y": 1.0})
    with pytest.raises(JetyoloError, match=r"tensor 'resized' has no calibrated range"):
        cache_variants.variant_cache("frame", _frame_prologue("cubic"), "uint8", {}, [], set(),
                                     {"scale": 1 / 255})


@pytest.mark.parametrize("variant", ["fp32", "uint8", "nms"])
@pytest.mark.parametrize("version", ["10.3", "8.6.2"])
def test_each_variant_builds_int8_from_its_cache_on_the_standin(
    calibrated: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str,
    version: str,
) -> None:
    """The device picks the variant's own cache and it covers the parsed network (TensorRT
    stand-in: tests/trt_standin; not a TensorRT result)."""
    from trt_standin.standin import install

    from device.backends.tensorrt_build import TensorRTBuildOps
    from device.engine import BuildRequest, ensure_engine

    world = install(monkeypatch, version)
    log: List[str] = []
    request = BuildRequest(precision="int8", int8_from="cache", variant=variant,
                           cache_dir=tmp_path / "engines")
    result = ensure_engine(calibrated, request, TensorRTBuildOps(), log.append)
    assert result.built and result.key.int8_source == "cache"
    assert world.builds[-1]["onnx"].endswith(calibrated.variant(variant)["file"])
    assert any(f"trt-{'10.3.0' if version == '10.3' else version}" in line and "fits" in line
               for line in log), log
