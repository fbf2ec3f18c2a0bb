"""Engine cache decisions without TensorRT: keys, sidecars, rebuild reasons, atomic writes,
workspace sizing, build recipes per TensorRT version, and the orchestration order.

The orchestration tests use ``RecordingOps``, a stand-in for ``device.backends.tensorrt_build`` that
records what it is asked and returns placeholder bytes. It checks *our* decisions (reuse or
rebuild, which checks run before a build); it says nothing about TensorRT, whose tests are in
test_tensorrt.py and skip where TensorRT is absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest

from device import build_plan, engine, engine_cache, l4t
from device.build_plan import LayerRecord, plan_build
from device.bundle import Bundle, write_new_bundle
from device.calibcache import write_cache
from device.choice import parse_workspace
from device.engine import BuildRequest, DeviceFacts, auto_workspace_bytes, ensure_engine
from device.engine_cache import EngineKey, check_cache_dir, needs_rebuild, sidecar_path, write_plan
from device.errors import JetyoloError

MIB, GIB = 1 << 20, 1 << 30
KEY = EngineKey(
    onnx_sha256="a" * 64,
    variant="fp32",
    precision="fp16",
    int8_source=None,
    int8_sha256=None,
    trt_version="10.3.0",
    gpu_name="Orin",
    compute_capability="8.7",
    l4t_release="R36.4.0",
    workspace="auto",
)


@pytest.fixture
def cached(tmp_path: Path) -> Path:
    return write_plan(tmp_path / "m" / "fp16.plan", b"\x01plan bytes" * 100, KEY)


def test_same_key_reuses(cached):
    rebuild, reason = needs_rebuild(cached, KEY)
    assert not rebuild and "matches" in reason


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"trt_version": "10.13.0"}, ["trt_version: '10.3.0' -> '10.13.0'"]),
        ({"gpu_name": "Xavier", "compute_capability": "7.2"}, ["gpu_name", "compute_capability"]),
        ({"onnx_sha256": "b" * 64}, ["onnx_sha256: aaaaaaaaaaaa -> bbbbbbbbbbbb"]),
        ({"precision": "int8", "int8_source": "cache"}, ["precision", "int8_source"]),
        ({"l4t_release": "R36.3.0"}, ["l4t_release"]),
        ({"workspace": "512MiB"}, ["workspace"]),
        ({"dla_core": 0}, ["dla_core"]),
    ],
)
def test_key_mismatch_rebuilds_naming_the_fields(cached, change, fragments):
    rebuild, reason = needs_rebuild(cached, dataclasses.replace(KEY, **change))
    assert rebuild
    for fragment in fragments:
        assert fragment in reason


def test_missing_plan_rebuilds(tmp_path):
    assert needs_rebuild(tmp_path / "none.plan", KEY) == (
        True, f"no cached engine at {tmp_path / 'none.plan'}"
    )


def test_plan_without_sidecar_rebuilds(cached):
    engine_cache.sidecar_path(cached).unlink()
    rebuild, reason = needs_rebuild(cached, KEY)
    assert rebuild and "no sidecar" in reason


@pytest.mark.parametrize(
    "sidecar_text",
    [
        "{not json",  # corrupt
        "{}",  # no key
        # partial key
        json.dumps({"key": {"onnx_sha256": "x"}, "plan": {"size": 1, "sha256": "y"}}),
        json.dumps({"key": KEY.to_json()}),  # no plan record
    ],
)
def test_unreadable_sidecar_rebuilds(cached, sidecar_text):
    engine_cache.sidecar_path(cached).write_text(sidecar_text)
    rebuild, reason = needs_rebuild(cached, KEY)
    assert rebuild and "unreadable" in reason


def test_truncated_plan_rebuilds(cached):
    data = cached.read_bytes()
    cached.write_bytes(data[: len(data) // 2])
    rebuild, reason = needs_rebuild(cached, KEY)
    assert rebuild and "truncated" in reason


def test_corrupt_plan_of_same_size_rebuilds(cached):
    data = bytearray(cached.read_bytes())
    data[10] ^= 0xFF
    cached.write_bytes(bytes(data))
    rebuild, reason = needs_rebuild(cached, KEY)
    assert rebuild and "sha256" in reason


def test_plan_is_plain_bytes_and_sidecar_records_key(cached):
    assert cached.read_bytes() == b"\x01plan bytes" * 100  # nothing prepended: trtexec loads it
    meta = json.loads(engine_cache.sidecar_path(cached).read_text())
    assert EngineKey.from_json(meta["key"]) == KEY
    assert meta["plan"]["size"] == 1100


def test_failed_write_leaves_old_files_and_no_partials(cached, monkeypatch):
    before = {path.name: path.read_bytes() for path in cached.parent.iterdir()}

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("device.files.os.fsync", broken_fsync)
    with pytest.raises(OSError):
        write_plan(cached, b"new plan", dataclasses.replace(KEY, trt_version="10.13.0"))
    after = {path.name: path.read_bytes() for path in cached.parent.iterdir()}
    assert after == before  # no temp files, old plan and sidecar intact
    assert needs_rebuild(cached, KEY)[0] is False


def test_empty_engine_is_refused(tmp_path):
    with pytest.raises(JetyoloError, match="empty engine"):
        write_plan(tmp_path / "x.plan", b"", KEY)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("free", "total", "expected"),
    [
        (30 * GIB, 64 * GIB, 4 * GIB),  # AGX Orin 64 GB: capped at 4 GiB
        (5 * GIB, 8 * GIB, 2560 * MIB),  # Orin Nano 8 GB: half the free memory
        (1200 * MIB, 4 * GIB, 600 * MIB),  # Jetson Nano 4 GB with a desktop running
        (512 * MIB, 4 * GIB, 256 * MIB),  # exactly twice the floor
        (3 * GIB + 1, 8 * GIB, 1536 * MIB),  # rounded down to whole MiB
    ],
)
def test_auto_workspace(free, total, expected):
    assert auto_workspace_bytes(free, total) == expected


@pytest.mark.parametrize(("free", "total"), [(300 * MIB, 4 * GIB), (0, 4 * GIB)])
def test_auto_workspace_refuses_when_memory_is_short(free, total):
    with pytest.raises(JetyoloError, match="too little"):
        auto_workspace_bytes(free, total)


def test_auto_workspace_rejects_impossible_numbers():
    with pytest.raises(ValueError):
        auto_workspace_bytes(8 * GIB, 4 * GIB)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("auto", None), ("AUTO", None), ("512", 512 * MIB), ("16", 16 * MIB)],
)
def test_parse_workspace(text, expected):
    mib = parse_workspace(text)
    assert (None if mib is None else mib * MIB) == expected
    setting = engine_cache.workspace_setting(expected)
    assert setting == ("auto" if expected is None else f"{text}MiB")


@pytest.mark.parametrize("text", ["0", "8", "-5", "1.5", "lots", "70000"])
def test_parse_workspace_refuses(text):
    with pytest.raises(JetyoloError, match=r"workspace '.*' must be 'auto' or MiB"):
        parse_workspace(text)


@pytest.mark.parametrize(
    ("text", "release", "jetpack"),
    [
        ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
         "DATE: Fri Sep 13 04:36:44 UTC 2024\n", "R36.4.0", "6.1/6.2"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n",
         "R35.4.1", "5.1.2"),
        ("# R38 (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64\n",
         "R38.2.0", "7.0"),  # Thor's first L4T
        ("# R32 (release), REVISION: 7.4\n", "R32.7.4", None),  # Nano's last L4T: unknown here
        ("", None, None),
        ("garbage\n", None, None),
    ],
)
def test_l4t_release(text, release, jetpack):
    assert l4t.parse_nv_tegra_release(text) == release
    assert l4t.jetpack_for_l4t(release) == jetpack


def test_read_l4t_release_without_the_file(tmp_path):
    assert l4t.read_l4t_release(tmp_path / "nv_tegra_release") is None


def test_parse_meminfo():
    text = "MemTotal:        7999500 kB\nMemFree:  100 kB\nMemAvailable:    5000000 kB\n"
    assert l4t.parse_meminfo(text) == (5000000 * 1024, 7999500 * 1024)
    with pytest.raises(JetyoloError, match="MemAvailable"):
        l4t.parse_meminfo("MemTotal: 1 kB\n")


def test_cache_layout(tmp_path):
    assert engine_cache.plan_path(tmp_path, "synth320@0123456789ab", "fp16") == (
        tmp_path / "synth320@0123456789ab" / "fp16.plan"
    )
    assert engine_cache.plan_path(tmp_path, "m/../x", "int8", "cache", 1, "nms").name == (
        "int8-cache-nms-dla1.plan"
    )
    assert engine_cache.plan_path(tmp_path, "m/../x", "fp16").parent.parent == tmp_path
    assert engine_cache.sidecar_path(tmp_path / "a.plan").name == "a.plan.json"
    timing = engine_cache.timing_cache_path(tmp_path, "10.3.0", "8.7")
    assert timing.name == "timing-trt10.3.0-sm8.7.cache"


def test_default_cache_dir():
    env = {"JETYOLO_ENGINE_CACHE": "/var/cache/jy"}
    assert engine_cache.default_cache_dir(env) == Path("/var/cache/jy")
    assert engine_cache.default_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/jetyolo/engines")


@pytest.mark.parametrize(
    ("args", "variant", "strongly", "explicit_batch", "flags", "calibrator"),
    [
        (("8.5.2", "fp32"), "fp32", False, True, (), False),
        (("8.5.2", "fp16"), "fp32", False, True, ("FP16",), False),  # JetPack 5: explicit batch
        (("10.3.0", "fp16"), "fp32", False, False, ("FP16",), False),  # flag deprecated in 10
        (("8.6.2", "int8", "cache"), "fp32", False, True,
         ("INT8", "FP16", "PREFER_PRECISION_CONSTRAINTS"), True),
        (("10.3.0", "int8", "qdq"), "int8-qdq", False, False, ("INT8", "FP16"), False),
        (("10.3.0", "int8", "qdq", "float16"), "int8-qdq", True, False, (), False),
        (("8.6.2", "int8", "qdq", "float16"), "int8-qdq", False, True, ("INT8", "FP16"), False),
        (("11.0.0", "int8", "qdq"), "int8-qdq", True, False, (), False),  # strongly typed only
        (("11.0.0", "fp32"), "fp32", True, False, (), False),
        (("11.1.0", "fp16"), "fp16", True, False, (), False),  # no FP16 flag: the fp16 graph
    ],
)
def test_plan_build(args, variant, strongly, explicit_batch, flags, calibrator):
    plan = plan_build(*args)
    assert plan.variant == variant
    assert plan.strongly_typed is strongly
    assert plan.explicit_batch_flag is explicit_batch
    assert plan.builder_flags == flags
    assert plan.calibrator_from_cache is calibrator


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("11.0.0", "int8", "cache"), {}, "removed calibration caches"),
        (("8.4.3", "fp16"), {}, "too old"),
        (("10.3.0", "fp16", "cache"), {}, "only applies to --precision int8"),
        (("10.3.0", "int8", None), {}, "--int8-from"),
        (("10.3.0", "bf16"), {}, "--precision"),
        (("10.3.0", "fp32"), {"dla_core": 0}, "DLA"),
    ],
)
def test_plan_build_refuses(args, kwargs, message):
    with pytest.raises(JetyoloError, match=message):
        plan_build(*args, **kwargs)


@pytest.mark.parametrize(
    ("requested", "version", "has_cache", "has_qdq", "expected"),
    [
        (None, "10.3.0", True, True, "qdq"),  # TRT 10: explicit quantization preferred
        (None, "8.6.2", True, True, "cache"),  # TRT 8: the calibration cache
        (None, "8.6.2", False, True, "qdq"),
        (None, "10.3.0", True, False, "cache"),
        ("cache", "10.3.0", True, True, "cache"),  # asked for: honoured
        (None, "11.0.0", True, True, "qdq"),
    ],
)
def test_choose_int8_source(requested, version, has_cache, has_qdq, expected):
    assert build_plan.choose_int8_source(requested, version, has_cache, has_qdq)[0] == expected


@pytest.mark.parametrize(
    ("requested", "version", "has_cache", "has_qdq", "message"),
    [
        ("cache", "10.3.0", False, True, "no calibration cache"),
        ("qdq", "10.3.0", True, False, "no 'int8-qdq'"),
        (None, "10.3.0", False, False, "no INT8 form"),
        (None, "11.0.0", True, False, "no INT8 form"),  # a cache cannot serve TRT 11
    ],
)
def test_choose_int8_source_refuses(requested, version, has_cache, has_qdq, message):
    with pytest.raises(JetyoloError, match=message):
        build_plan.choose_int8_source(requested, version, has_cache, has_qdq)


LAYERS = [
    LayerRecord("/model.0/conv/Conv", "CONVOLUTION", (("/model.0/conv/Conv_output_0", "FLOAT"),)),
    LayerRecord("(Unnamed Layer* 3) [Constant]", "CONSTANT", (("(Unnamed Layer* 3)_o", "FLOAT"),)),
    LayerRecord("/model.23/Shape", "SHAPE", (("/model.23/Shape_output_0", "INT64"),)),
    LayerRecord("/model.23/dfl/Softmax", "SOFTMAX", (("/model.23/dfl/Softmax_output_0", "FLOAT"),)),
    LayerRecord("/model.23/Sigmoid", "ACTIVATION", (("scores", "FLOAT"),)),
    LayerRecord("/model.23/Mul_1", "ELEMENTWISE", (("boxes", "FLOAT"),)),
    LayerRecord("/model.23/Gather", "GATHER", (("(Unnamed Layer* 9) [Gather]_output", "FLOAT"),)),
    LayerRecord("/model.23/Cast", "CAST", (("/model.23/Cast_output_0", "INT32"),)),
]


def test_calibration_tensor_names_without_the_onnx_list_tell_helpers_by_name():
    inputs = [("images", "FLOAT"), ("ids", "INT32")]
    helper = LayerRecord("ONNXTRT_Broadcast", "SHUFFLE", (("ONNXTRT_Broadcast_output", "FLOAT"),))
    required, helpers = build_plan.calibration_tensor_names(inputs, [*LAYERS, helper])
    assert required == [
        "images",
        "/model.0/conv/Conv_output_0",
        "/model.23/dfl/Softmax_output_0",
        "scores",
        "boxes",
    ]
    assert helpers == ["(Unnamed Layer* 9) [Gather]_output", "ONNXTRT_Broadcast_output"]


def test_calibration_tensor_names_follow_the_onnx_graph():
    onnx_graph = ["images", "/model.0/conv/Conv_output_0", "scores", "boxes",
                  "/model.23/dfl/Softmax_output_0", "not_in_network"]
    inputs = [("images", "FLOAT")]
    required, helpers = build_plan.calibration_tensor_names(inputs, LAYERS, onnx_graph)
    assert required == [*onnx_graph[:2], "/model.23/dfl/Softmax_output_0", "scores", "boxes"]
    assert helpers == ["(Unnamed Layer* 9) [Gather]_output"]


def test_all_tensor_names():
    names = build_plan.all_tensor_names([("images", "FLOAT")], LAYERS)
    assert names[0] == "images" and "/model.23/Shape_output_0" in names and len(names) == 9


def test_layers_to_keep_fp16():
    keep = build_plan.layers_to_keep_fp16(
        LAYERS, ["/model.23/dfl/Softmax", "/model.23/Mul", "/model.23/Shape"], ["scores"]
    )
    # named nodes (also with the parser's _1 suffix), producers of named tensors; never
    # shape or integer layers
    assert keep == ["/model.23/dfl/Softmax", "/model.23/Sigmoid", "/model.23/Mul_1"]
    assert build_plan.layers_to_keep_fp16(LAYERS, [], []) == []


# ---- orchestration -----------------------------------------------------------------------------
FACTS = DeviceFacts("10.3.0", "Orin", "8.7", "R36.4.0", 5 * GIB, 8 * GIB)
HEAD = ["/model.23/dfl/Softmax", "/model.23/Sigmoid", "/model.23/Mul_1"]
NETWORK_INPUTS = [("images", "FLOAT")]


class RecordingOps(engine.TensorRTOps):
    """Stand-in for the TensorRT module: records calls, returns placeholder plan bytes."""

    def __init__(self, facts: DeviceFacts = FACTS) -> None:
        self.facts = facts
        self.builds: List[Dict[str, Any]] = []
        self.parsed: List[Path] = []

    def device_facts(self) -> DeviceFacts:
        return self.facts

    def network_layers(self, onnx_path, strongly_typed):
        self.parsed.append(onnx_path)
        return NETWORK_INPUTS, LAYERS

    def build_engine(self, onnx_path, build, **options):
        self.builds.append({"onnx": onnx_path, "build": build, **options})
        return b"placeholder plan for " + onnx_path.name.encode()


def make_bundle(root: Path, calibration: Dict[str, Any], files: Dict[str, bytes]) -> Bundle:
    staging = root / "staging"
    staging.mkdir(parents=True)
    sources = {}
    for name, data in {"model.onnx": b"onnx fp32", **files}.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
        sources[name] = staging / name
    variant = {"file": "model.onnx", "input": {}, "outputs": {}}
    variants = {"fp32": variant}
    if "model_qdq.onnx" in files:
        variants["int8-qdq"] = {**variant, "file": "model_qdq.onnx"}
    if "model_uint8.onnx" in files:
        variants["uint8"] = {**variant, "file": "model_uint8.onnx"}
    manifest = {
        "schema_version": 1, "name": "synth320", "class_names": ["a"],
        "preprocess": {"size": [320, 320]}, "postprocess": {}, "variants": variants,
        "head": {"postprocess_nodes": HEAD[:1]}, "calibration": calibration,
    }
    return write_new_bundle(root / "bundle", sources, manifest)


def cache_bytes(tmp_path: Path, version: str, names: List[str]) -> bytes:
    path = write_cache(tmp_path / f"{version}.cache", {name: 1.0 for name in names}, version)
    return path.read_bytes()


NETWORK_TENSORS = ["images", "/model.0/conv/Conv_output_0"]  # head tensors left out on purpose


def test_build_then_reuse_then_rebuild_on_new_tensorrt(tmp_path):
    bundle = make_bundle(tmp_path, {}, {})
    request = BuildRequest(precision="fp16", cache_dir=tmp_path / "engines")
    ops = RecordingOps()
    lines: List[str] = []
    first = ensure_engine(bundle, request, ops, lines.append)
    assert first.built and len(ops.builds) == 1
    assert ops.builds[0]["build"].builder_flags == ("FP16",)
    assert ops.builds[0]["workspace_bytes"] == 2560 * MIB  # auto from the device's free memory
    assert ops.builds[0]["timing_cache_path"].name == "timing-trt10.3.0-sm8.7.cache"
    assert first.plan == tmp_path / "engines" / bundle.model_id / "fp16.plan"
    second = ensure_engine(bundle, request, ops, lines.append)
    assert not second.built and len(ops.builds) == 1
    assert any("reusing" in line for line in lines)
    upgraded = RecordingOps(dataclasses.replace(FACTS, trt_version="10.13.0"))
    third = ensure_engine(bundle, request, upgraded, lines.append)
    assert third.built and "trt_version: '10.3.0' -> '10.13.0'" in third.reason


def test_an_unwritable_engine_cache_is_refused_before_building(tmp_path):
    bundle = make_bundle(tmp_path, {}, {})
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made below a file (root included)
    ops = RecordingOps()
    request = BuildRequest(precision="fp16", cache_dir=blocker / "engines")
    with pytest.raises(JetyoloError, match=r"engine cache .* is not writable.*--cache-dir"):
        ensure_engine(bundle, request, ops, lambda line: None)
    assert ops.builds == []  # no minutes-long build whose plan could not be saved


def test_free_memory_changes_do_not_invalidate_auto_workspace(tmp_path):
    bundle = make_bundle(tmp_path, {}, {})
    request = BuildRequest(precision="fp16", cache_dir=tmp_path / "engines")
    ensure_engine(bundle, request, RecordingOps(), lambda line: None)
    busier = RecordingOps(dataclasses.replace(FACTS, free_bytes=2 * GIB))
    assert not ensure_engine(bundle, request, busier, lambda line: None).built


def test_int8_from_cache_checks_then_builds_with_head_in_fp16(tmp_path):
    data = cache_bytes(tmp_path, "10.3.0", NETWORK_TENSORS)
    calibration = {"fp16_tensors": ["scores", "boxes"]}
    bundle = make_bundle(tmp_path, calibration, {"calib/trt-100300.cache": data})
    ops = RecordingOps()
    result = ensure_engine(bundle, BuildRequest("int8", "cache", cache_dir=tmp_path / "e"), ops,
                           lambda line: None)
    assert result.built and result.key.int8_source == "cache"
    build = ops.builds[0]
    assert build["calib_cache"] == data
    # head.postprocess_nodes names the DFL softmax; calibration names the tensors it left out
    assert build["head_fp16_layers"] == HEAD


def test_int8_cache_missing_unnamed_tensors_is_refused_before_building(tmp_path):
    data = cache_bytes(tmp_path, "10.3.0", NETWORK_TENSORS)
    bundle = make_bundle(tmp_path, {}, {"calib/trt-100300.cache": data})
    ops = RecordingOps()
    with pytest.raises(JetyoloError, match=r"lacks 2 network tensor\(s\): 'boxes', 'scores'"):
        ensure_engine(bundle, BuildRequest("int8", "cache", cache_dir=tmp_path), ops)
    assert ops.builds == []


def test_int8_cache_entries_for_constants_are_accepted(tmp_path):
    names = [*NETWORK_TENSORS, "(Unnamed Layer* 3)_o", "/model.23/Shape_output_0"]
    data = cache_bytes(tmp_path, "10.3.0", names)
    bundle = make_bundle(tmp_path, {"fp16_tensors": ["scores", "boxes"]}, {"c.cache": data})
    result = ensure_engine(bundle, BuildRequest("int8", "cache", cache_dir=tmp_path / "e"),
                           RecordingOps(), lambda line: None)
    assert result.built


def test_int8_cache_of_another_tensorrt_is_refused(tmp_path):
    data = cache_bytes(tmp_path, "8.6.2", NETWORK_TENSORS)
    bundle = make_bundle(tmp_path, {}, {"calib/trt-8602.cache": data})
    ops = RecordingOps()
    with pytest.raises(JetyoloError, match=r"caches for TensorRT 8\.6\.2.*--trt-version 10\.3\.0"):
        ensure_engine(bundle, BuildRequest("int8", "cache", cache_dir=tmp_path), ops)
    assert ops.builds == [] and ops.parsed == []


def test_manifest_written_by_jetyolo_calibrate_is_understood(tmp_path):
    # the layout host/calibrate.py writes: caches keyed by version with a "file" entry,
    # uncached_tensors, and the Q/DQ variant's float_dtype under "quantization"
    data = cache_bytes(tmp_path, "10.3.0", NETWORK_TENSORS)
    calibration = {
        "caches": {"10.3.0": {"file": "calibration/trt-10.3.0.cache", "header": "TRT-100300-x"}},
        "fp16_layers": ["/model.23/dfl/Softmax"],
        "uncached_tensors": ["scores", "boxes"],
    }
    bundle = make_bundle(tmp_path, calibration, {"calibration/trt-10.3.0.cache": data})
    inputs = build_plan.find_int8_inputs(bundle, "10.3.0.30")
    assert inputs.cache == bundle.root / "calibration" / "trt-10.3.0.cache"
    assert inputs.cache_versions == ("10.3.0",)
    assert inputs.fp16_tensors == ("scores", "boxes")
    assert build_plan.find_int8_inputs(bundle, "8.6.2").cache is None
    ops = RecordingOps()
    result = ensure_engine(bundle, BuildRequest("int8", "cache", cache_dir=tmp_path / "e"), ops,
                           lambda line: None)
    assert result.built and ops.builds[0]["head_fp16_layers"] == HEAD


def test_cache_problems_point_to_the_qdq_model_when_there_is_one(tmp_path):
    data = cache_bytes(tmp_path, "10.3.0", NETWORK_TENSORS)
    bundle = make_bundle(tmp_path, {}, {"c.cache": data, "model_qdq.onnx": b"qdq"})
    with pytest.raises(JetyoloError, match="--int8-from qdq"):
        ensure_engine(bundle, BuildRequest("int8", "cache", cache_dir=tmp_path), RecordingOps())


def test_calibration_of_another_onnx_is_refused(tmp_path):
    bundle = make_bundle(tmp_path, {"onnx_sha256": "f" * 64}, {})
    with pytest.raises(JetyoloError, match="belongs to ONNX ffffffffffff"):
        ensure_engine(bundle, BuildRequest("int8", cache_dir=tmp_path), RecordingOps())


def test_int8_default_on_tensorrt_10_is_the_qdq_model(tmp_path):
    data = cache_bytes(tmp_path, "10.3.0", NETWORK_TENSORS)
    bundle = make_bundle(tmp_path, {}, {"c.cache": data, "model_qdq.onnx": b"qdq"})
    ops = RecordingOps()
    result = ensure_engine(bundle, BuildRequest("int8", cache_dir=tmp_path / "e"), ops,
                           lambda line: None)
    assert result.key.int8_source == "qdq" and result.plan.name == "int8-qdq.plan"
    assert ops.builds[0]["onnx"].name == "model_qdq.onnx" and ops.builds[0]["calib_cache"] is None
    assert ops.parsed == []  # no cache check for the Q/DQ path


def test_int8_of_the_uint8_variant_never_builds_the_float_qdq_graph_under_its_name(tmp_path):
    data = cache_bytes(tmp_path, "10.3.0", NETWORK_TENSORS)
    files = {"c.cache": data, "model_qdq.onnx": b"qdq", "model_uint8.onnx": b"uint8"}
    bundle = make_bundle(tmp_path, {"uncached_tensors": ["scores", "boxes"]}, files)
    with pytest.raises(JetyoloError, match="--variant uint8 with --int8-from qdq"):
        ensure_engine(bundle, BuildRequest("int8", "qdq", "uint8", cache_dir=tmp_path / "e"),
                      RecordingOps())
    ops = RecordingOps()
    result = ensure_engine(bundle, BuildRequest("int8", None, "uint8", cache_dir=tmp_path / "e"),
                           ops, lambda line: None)  # TensorRT 10 default (qdq) is not for uint8
    assert result.key.int8_source == "cache" and result.plan.name == "int8-cache-uint8.plan"
    assert ops.builds[0]["onnx"].name == "model_uint8.onnx"
    assert result.key.onnx_sha256 == bundle.model_sha256("uint8")


def test_a_garbled_cache_in_the_bundle_is_named_not_invisible(tmp_path):
    good = cache_bytes(tmp_path, "8.6.2", NETWORK_TENSORS)
    garbled = b"TRT-100300-EntropyCalibration2 \x00\x01\n" + good.split(b"\n", 1)[1]
    bundle = make_bundle(tmp_path, {}, {"calib/a.cache": good, "calib/b.cache": garbled})
    with pytest.raises(JetyoloError, match=r"b.cache:1: .* is not a TensorRT cache header"):
        ensure_engine(bundle, BuildRequest("int8", "cache", cache_dir=tmp_path / "e"),
                      RecordingOps())


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({}, "fp16.plan"),
        ({"variant": "uint8"}, "fp16-uint8.plan"),
        ({"variant": "fp16"}, "fp16-fp16.plan"),  # 10.x: the fp16 graph under the FP16 flag
        ({"variant": "fp16", "trt_version": "11.1.0"}, "fp16.plan"),  # 11: the only fp16 form
        ({"variant": "int8-qdq", "precision": "int8", "int8_source": "qdq"}, "int8-qdq.plan"),
        ({"precision": "int8", "int8_source": "cache", "dla_core": 0}, "int8-cache-dla0.plan"),
    ],
)
def test_one_plan_name_per_key(tmp_path, change, name):
    key = dataclasses.replace(KEY, **change)
    assert engine_cache.key_plan_path(tmp_path, "m", key) == tmp_path / "m" / name


def test_plans_and_their_cache_folder_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        check_cache_dir(tmp_path / "cache")
        plan = write_plan(tmp_path / "cache" / "fp16.plan", b"plan", KEY)
    finally:
        os.umask(old_umask)
    assert (plan.parent.stat().st_mode & 0o777) == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in plan.parent.iterdir()} == {
        plan.name: 0o600, sidecar_path(plan).name: 0o600}
