"""`jetyolo calibrate`: the TensorRT caches, the Q/DQ model, calibration.json, the accuracy gate
(passing with real images, failing with black ones) and bad input, on the fixture bundle."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from device.bundle import Bundle, add_files
from device.calibcache import read_cache
from device.cli import main
from device.errors import JetyoloError
from device.files import sha256_file
from host import quantize
from host.calibrate import DEFAULT_RECIPE, QDQ_FILE, REPORT_FILE, calibrate, exclusion_steps

REPO = Path(__file__).resolve().parents[2]
VERSIONS = {"10.3.0": 100300, "8.6.2": 8602, "8.5.2": 8502}
CALIB_IMAGES = 16
# The default recipe (percentile) on the fixture's 16 images, no FP16 fallback unless a test asks.
TEST_RECIPE: Dict[str, Any] = dict(
    DEFAULT_RECIPE, num=20, min_images=CALIB_IMAGES,
    trt_versions=list(VERSIONS), sensitivity_images=4, max_fp16_layers=0,
)


@pytest.fixture(scope="module")
def calib_images(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training images, one corrupt .jpg and a text file (both must be skipped)."""
    folder = tmp_path_factory.mktemp("calib") / "images"
    folder.mkdir()
    for image in sorted((synth_dataset.parent / "train" / "images").glob("*.jpg"))[:CALIB_IMAGES]:
        shutil.copyfile(image, folder / image.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def calibrated(bundle_dir: Path, calib_images: Path, synth_dataset: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    target = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(bundle_dir, target)
    return calibrate(target, calib_images, TEST_RECIPE, data_yaml=synth_dataset)


@pytest.fixture(scope="module")
def report(calibrated: Bundle) -> Dict[str, Any]:
    return dict(json.loads((calibrated.root / REPORT_FILE).read_text()))


@pytest.fixture(scope="module")
def fp32_model(calibrated: Bundle) -> Any:
    return onnx.load(str(calibrated.model_path("fp32")))


def _head_nodes(bundle: Bundle, model: Any) -> List[str]:
    present = {node.name for node in model.graph.node}
    return [name for name in bundle.manifest["head"]["postprocess_nodes"] if name in present]


# ---- the TensorRT caches ------------------------------------------------------------------------
@pytest.mark.parametrize("version", list(VERSIONS))
def test_cache_parses_with_header_and_network_tensors(
    calibrated: Bundle, fp32_model: Any, version: str
) -> None:
    cache = read_cache(calibrated.root / "calibration" / f"trt-{version}.cache")
    assert cache.version_int == VERSIONS[version]
    assert cache.algorithm == "EntropyCalibration2"
    convs = [n for n in fp32_model.graph.node if n.op_type == "Conv"]
    head = set(_head_nodes(calibrated, fp32_model))
    assert "images" in cache.scales  # the network input
    for conv in convs:  # every backbone/neck/head-branch conv output, none of the head's own
        assert (conv.output[0] in cache.scales) == (conv.name not in head), conv.name
    head_outputs = quantize.produced_by(fp32_model, head)
    assert head_outputs and not head_outputs & set(cache.scales)
    assert {"boxes", "scores"} <= head_outputs


def test_cache_scales_are_the_reported_ranges_over_127(calibrated: Bundle, report: Dict) -> None:
    cache = read_cache(calibrated.root / "calibration" / "trt-10.3.0.cache")
    assert len(cache.scales) == report["cache"]["tensors"] > 200
    for name, scale in cache.scales.items():
        low, high = report["ranges"][name]
        expected = np.float32(max(abs(low), abs(high)) / 127.0)
        assert scale == pytest.approx(float(expected), rel=1e-6), name
    assert sorted(report["cache"]["left_out_tensors"]) == sorted(
        calibrated.manifest["calibration"]["uncached_tensors"])


def test_unparseable_cache_is_refused(calibrated: Bundle, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(calibrated.root, copy)
    cache = copy / "calibration" / "trt-10.3.0.cache"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join([lines[0], "images 3c010204", *lines[2:]]) + "\n")
    with pytest.raises(JetyoloError, match=r"trt-10.3.0.cache:2: .* is not '<tensor name>: <hex"):
        read_cache(cache)
    with pytest.raises(JetyoloError, match=r"fails verification: calibration/trt-10\.3\.0\.cache"):
        Bundle.load(copy)


# ---- the Q/DQ model -----------------------------------------------------------------------------
def test_qdq_zero_points_are_int8_zero_and_weights_per_channel(calibrated: Bundle) -> None:
    model = onnx.load(str(calibrated.model_path("int8-qdq")))
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    qdq_nodes = [n for n in model.graph.node if n.op_type in quantize.QDQ_OPS]
    assert len(qdq_nodes) > 100
    per_channel = 0
    for node in qdq_nodes:
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
        if inits[node.input[1]].size > 1:
            per_channel += 1
            assert next(a.i for a in node.attribute if a.name == "axis") == 0, node.name
    assert per_channel == len(quantize.quantized_layers(model)) > 80  # one per Conv weight


def test_qdq_leaves_head_postprocessing_float(calibrated: Bundle, fp32_model: Any) -> None:
    model = onnx.load(str(calibrated.model_path("int8-qdq")))
    head = _head_nodes(calibrated, fp32_model)
    protected = quantize.head_tensors(fp32_model, head)
    touched = {t for n in model.graph.node if n.op_type in quantize.QDQ_OPS
               for t in [*n.input, *n.output]}
    assert not touched & protected
    assert quantize.qdq_problems(model, protected) == []
    assert "/model.23/dfl/conv/Conv" in head  # the DFL conv is a Conv the quantizer would take
    assert "/model.23/dfl/conv/Conv" not in quantize.quantized_layers(model)


def test_qdq_checker_flags_nonzero_zero_point_and_head_tensor() -> None:
    """The failing side of the rules above, on a two-node graph."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(3, np.uint8), "zero")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q1"),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dq1")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [scale, zero],
    )
    problems = quantize.qdq_problems(helper.make_model(graph), {"y"})
    assert any("q1: zero point uint8" in p for p in problems)
    assert any("dq1: quantizes head post-processing tensor y" in p for p in problems)


def test_qdq_model_runs_with_the_fp32_contract(calibrated: Bundle, synth_dataset: Path) -> None:
    from device.backends.onnxruntime import OnnxRuntimeBackend
    from device.preprocess import Preprocessor

    image = sorted((synth_dataset.parent / "valid" / "images").glob("*.jpg"))[0]
    preprocessor = Preprocessor(calibrated.input_size)
    frame = cv2.imread(str(image))
    assert frame is not None
    preprocessor(frame)
    with OnnxRuntimeBackend(calibrated.model_path("fp32")) as fp32, \
            OnnxRuntimeBackend(calibrated.model_path("int8-qdq")) as int8:
        assert int8.input_specs == fp32.input_specs
        assert int8.output_specs == fp32.output_specs
        out = int8.infer({"images": preprocessor.buffer})
        reference = fp32.infer({"images": preprocessor.buffer})
    for name in ("boxes", "scores"):  # each keeps its own scale (the split head)
        cosine = float(np.dot(out[name].ravel(), reference[name].ravel()) / (
            np.linalg.norm(out[name]) * np.linalg.norm(reference[name])))
        assert cosine > 0.99, name


# ---- calibration.json and the manifest ----------------------------------------------------------
def test_report_and_manifest(calibrated: Bundle, report: Dict, calib_images: Path) -> None:
    Bundle.load(calibrated.root, verify=True)
    assert report["onnx_sha256"] == sha256_file(calibrated.model_path("fp32"))
    assert report["images"]["count"] == CALIB_IMAGES
    skipped = {Path(entry["path"]).name for entry in report["images"]["skipped"]}
    assert skipped == {"broken.jpg", "notes.txt"}
    for entry in report["images"]["list"]:
        assert sha256_file(entry["path"]) == entry["sha256"]
    names = [Path(e["path"]).name for e in report["images"]["list"]]
    assert names == sorted(names)  # deterministic order
    calibration = calibrated.manifest["calibration"]
    assert set(calibration["caches"]) == set(VERSIONS)
    for entry in calibration["caches"].values():
        assert entry["file"] in calibrated.manifest["files"]
    assert calibration["fp16_layers"][: len(report["excluded_layers"]["head_postprocess"])] == \
        report["excluded_layers"]["head_postprocess"]
    variant = calibrated.variant("int8-qdq")
    assert variant["file"] == QDQ_FILE and variant["input"] == calibrated.variant("fp32")["input"]
    assert report["versions"]["onnxruntime"]


def test_same_images_give_the_same_cache(calibrated: Bundle, calib_images: Path,
                                         bundle_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "again"
    shutil.copytree(bundle_dir, target)
    again = calibrate(target, calib_images, dict(TEST_RECIPE, trt_versions=["10.3.0"]))
    assert again.manifest["calibration"]["images"] == CALIB_IMAGES
    first = (calibrated.root / "calibration" / "trt-10.3.0.cache").read_bytes()
    assert (again.root / "calibration" / "trt-10.3.0.cache").read_bytes() == first
    assert again.manifest["calibration"]["accuracy"] is None  # no --data: not measured


# ---- the accuracy gate --------------------------------------------------------------------------
def test_gate_passes_with_real_images(report: Dict) -> None:
    accuracy = report["accuracy"]
    assert accuracy["passed"] and accuracy["drop"] <= 1.0
    assert accuracy["fp32"]["map50_95"] > 0.5  # the fixture model detects the synthetic shapes
    assert accuracy["int8"]["map50_95"] >= accuracy["fp32"]["map50_95"] - 0.01
    assert abs(accuracy["cache_drop"]) <= 1.0  # the cache's implicit-INT8 simulation, gated too
    assert accuracy["int8_cache"]["variant"] == "int8-cache"
    assert accuracy["int8_cache"]["map50_95"] != accuracy["int8"]["map50_95"]  # another model


@pytest.fixture(scope="module")
def black_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("black")
    for index in range(CALIB_IMAGES):
        cv2.imwrite(str(folder / f"black_{index:02d}.png"), np.zeros((320, 320, 3), np.uint8))
    return folder


def test_gate_catches_calibration_on_black_images(
    bundle_dir: Path, black_images: Path, synth_dataset: Path, tmp_path: Path
) -> None:
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    recipe = dict(TEST_RECIPE, method="minmax", max_fp16_layers=1)
    with pytest.raises(JetyoloError, match=r"INT8 loses .* more than --max-drop 1\b.*"
                                           r"nothing was written") as failure:
        calibrate(target, black_images, recipe, data_yaml=synth_dataset)
    message = str(failure.value)
    assert "1 layers:" in message and "most sensitive: /model.0/conv/Conv" in message
    assert "try --method entropy or percentile" in message
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before  # nothing partial


def sabotage_range(monkeypatch: pytest.MonkeyPatch, tensor: str) -> None:
    """Calibration ranges as collected, except ``tensor``'s, clipped to 1/64 of its range."""
    from onnxruntime.quantization.calibrate import TensorData

    real_collect = quantize.collect_ranges

    def sabotaged(*args: Any, **kwargs: Any) -> quantize.Ranges:
        ranges = real_collect(*args, **kwargs)
        amax = ranges.amax(tensor) / 64
        ranges.values[tensor] = (-amax, amax)
        ranges.tensors_data.data[tensor] = TensorData(lowest=np.float32(-amax),
                                                      highest=np.float32(amax))
        return ranges

    monkeypatch.setattr(quantize, "collect_ranges", sabotaged)


def test_gate_keeps_the_measured_culprit_in_fp16(
    bundle_dir: Path, calib_images: Path, synth_dataset: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One range sabotaged (clipped to 1/64): sensitivity must rank its layer first, and the
    gate must pass by keeping exactly that layer in FP16 (in the Q/DQ model and fp16_layers)."""
    tensor, layer = "/model.3/act/Mul_output_0", "/model.4/cv1/conv/Conv"  # its only consumer
    sabotage_range(monkeypatch, tensor)
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    bundle = calibrate(target, calib_images, dict(TEST_RECIPE, max_fp16_layers=4),
                       data_yaml=synth_dataset)
    report = json.loads((bundle.root / REPORT_FILE).read_text())
    steps = report["accuracy"]["steps"]
    assert steps[0]["fp16_layers"] == 0 and steps[0]["drop"] > 1.0  # the sabotage hurts
    assert steps[0]["cache_drop"] > 1.0 and steps[-1]["cache_drop"] <= 1.0
    cache = read_cache(bundle.root / "calibration" / "trt-10.3.0.cache")
    assert tensor not in cache.scales  # the FP16 layer's input: no scale, so never INT8
    assert tensor in bundle.manifest["calibration"]["uncached_tensors"]
    assert report["accuracy"]["sensitivity_sqnr_db"][0][0] == layer
    assert report["accuracy"]["passed"] and steps[-1]["fp16_layers"] == 1
    assert report["excluded_layers"]["sensitivity"] == [layer]
    assert layer in bundle.manifest["calibration"]["fp16_layers"]
    qdq = onnx.load(str(bundle.model_path("int8-qdq")))
    assert layer not in quantize.quantized_layers(qdq)


def test_gate_catches_what_only_the_cache_quantizes(
    bundle_dir: Path, calib_images: Path, synth_dataset: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sabotaged range on a tensor no Conv reads (a SiLU's Sigmoid): the Q/DQ model never
    quantizes it and keeps its mAP, TensorRT's implicit INT8 would; the gate must fail on the
    cache simulation's figure."""
    tensor = "/model.2/cv1/act/Sigmoid_output_0"
    sabotage_range(monkeypatch, tensor)
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    with pytest.raises(JetyoloError, match=r"INT8 loses .* more than --max-drop") as failure:
        calibrate(target, calib_images, TEST_RECIPE, data_yaml=synth_dataset)
    drops = re.search(r"0 layers: (-?[\d.]+) Q/DQ, (-?[\d.]+) cache", str(failure.value))
    assert drops, str(failure.value)
    assert float(drops.group(1)) <= 1.0 < float(drops.group(2))


def test_cache_simulation_quantizes_every_listed_tensor() -> None:
    """On a tiny graph: each listed tensor reaches all its consumers through one int8 Q/DQ pair
    of scale amax/127, an already quantized tensor keeps its pair, graph outputs stay float."""
    import onnxruntime as ort

    from host import cache_variants

    scale = numpy_helper.from_array(np.array(0.5 / 127, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("Sigmoid", ["x"], ["a"], name="sig"),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["a_q"], name="q"),
             helper.make_node("DequantizeLinear", ["a_q", "s", "z"], ["a_dq"], name="dq"),
             helper.make_node("Relu", ["a_dq"], ["b"], name="relu"),
             helper.make_node("Add", ["a", "b"], ["c"], name="add"),
             helper.make_node("Neg", ["c"], ["y"], name="neg")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    simulated = cache_variants.build_cache_simulation(model, {"a": 0.5, "c": 2.0, "y": 3.0})
    consumers = {n.name: list(n.input) for n in simulated.graph.node}
    assert consumers["add"][0] == "a_dq"  # the existing pair, shared
    assert consumers["neg"] == ["c" + cache_variants.SIM_SUFFIX]
    assert [o.name for o in simulated.graph.output] == ["y"] and "y__cache_int8" not in str(
        simulated.graph.node)
    x = np.linspace(-4, 4, 8, dtype=np.float32).reshape(1, 8)
    got = ort.InferenceSession(simulated.SerializeToString()).run(None, {"x": x})[0]
    step_a, step_c = 0.5 / 127, 2.0 / 127
    a = np.clip(np.round(1 / (1 + np.exp(-x)) / step_a), -128, 127) * step_a
    c = a + np.maximum(a, 0)
    np.testing.assert_allclose(got, -np.clip(np.round(c / step_c), -128, 127) * step_c, atol=1e-6)


@pytest.mark.parametrize("limit, steps", [(0, []), (1, [1]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8])])
def test_exclusion_steps(limit: int, steps: List[int]) -> None:
    assert exclusion_steps(limit) == steps


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("versions, message", [
    (["11.0.0"], "calibration caches were removed in TensorRT 11; use the Q/DQ model"),
    (["9.0.0"], "not supported for calibration caches"),
    (["ten"], "is not MAJOR.MINOR"),
    (["10.3.0", "12.1"], "TensorRT 12.1.0 has no implicit INT8"),
])
def test_unknown_trt_version_is_refused_before_work(
    bundle_dir: Path, calib_images: Path, versions: List[str], message: str
) -> None:
    with pytest.raises(JetyoloError, match=message):
        calibrate(bundle_dir, calib_images, dict(TEST_RECIPE, trt_versions=versions))


def test_empty_and_unreadable_image_folders(bundle_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JetyoloError, match="holds no files"):
        calibrate(bundle_dir, empty, TEST_RECIPE)
    junk = tmp_path / "junk"
    junk.mkdir()
    for index in range(3):
        (junk / f"x{index}.jpg").write_bytes(b"garbage")
    with pytest.raises(JetyoloError, match=r"only 0 readable image\(s\) \(3 skipped\)"):
        calibrate(bundle_dir, junk, TEST_RECIPE)


def test_fewer_images_than_num_warns(calib_images: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        chosen = quantize.select_images(calib_images, 500, 4)
    assert len(chosen.images) == CALIB_IMAGES and len(chosen.skipped) == 2
    assert "--num 500 asked, only 16 readable" in caplog.text


def test_image_list_file(calib_images: Path, tmp_path: Path) -> None:
    listing = tmp_path / "calib.txt"
    names = sorted(p.name for p in calib_images.glob("train_*.jpg"))[:4]
    listing.write_text("# four images\n" + "\n".join(str(calib_images / n) for n in names) + "\n")
    assert [p.name for p in quantize.select_images(listing, 10, 4).paths] == names


def test_bundle_without_split_head_is_refused(
    bundle_dir: Path, calib_images: Path, tmp_path: Path
) -> None:
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    model = onnx.load(str(target / "model.onnx"))
    model.graph.node.append(helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1))
    boxes, scores = ([d.dim_value for d in out.type.tensor_type.shape.dim]
                     for out in model.graph.output)
    joined_shape = [boxes[0], boxes[1] + scores[1], boxes[2]]
    del model.graph.output[:]
    model.graph.output.append(
        helper.make_tensor_value_info("output0", TensorProto.FLOAT, joined_shape)
    )
    joined = tmp_path / "joined.onnx"
    onnx.save(model, str(joined))
    add_files(Bundle.load(target), {"model.onnx": joined})
    with pytest.raises(JetyoloError,
                       match=r"not a split head \(\['boxes', 'scores'\] or \['det_boxes'"):
        calibrate(target, calib_images, TEST_RECIPE)


def test_unknown_exclude_layer_and_recipe_key(
    bundle_dir: Path, calib_images: Path, tmp_path: Path
) -> None:
    with pytest.raises(JetyoloError, match="--exclude '/nope/Conv' is not a node"):
        calibrate(bundle_dir, calib_images, dict(TEST_RECIPE, exclude_layers=["/nope/Conv"]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: entropy\nbins: 12\n")
    assert main(["calibrate", str(bundle_dir), "--images", str(calib_images),
                 "--recipe", str(recipe)]) == 2


def test_default_recipe_file_matches_the_code() -> None:
    recipe = yaml.safe_load((REPO / "calibration" / "default.yaml").read_text())
    assert recipe == DEFAULT_RECIPE


def test_eval_limit_below_one_is_refused(
    bundle_dir: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a negative limit used to slice images[:-N] silently
    argv = ["calibrate", str(bundle_dir), "--images", str(calib_images), "--eval-limit", "-3"]
    assert main(argv) == 2
    assert "--eval-limit must be at least 1, got -3" in capsys.readouterr().err
