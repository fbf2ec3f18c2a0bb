"""What to ask TensorRT for, decided from versions, flags and the bundle alone (no TensorRT):
the build recipe per TensorRT version and precision, the default precision, the INT8 source, the
tensors a calibration cache must cover, the head layers kept in FP16, and the bundle's INT8
inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from device.calibcache import parse_trt_version
from device.choice import FP16_VARIANT, INT8_SOURCES, PRECISIONS, QDQ_VARIANT
from device.errors import JetyoloError


@dataclass(frozen=True)
class BuildPlan:
    """What to ask TensorRT for, decided from the versions and flags alone."""

    variant: str  # bundle variant whose ONNX is parsed: "fp32", "fp16" or QDQ_VARIANT
    strongly_typed: bool
    explicit_batch_flag: bool  # TensorRT 8 needs it; in 10 it is the default (flag deprecated)
    builder_flags: Tuple[str, ...]  # trt.BuilderFlag member names
    calibrator_from_cache: bool
    keep_fp16_layers: bool
    # TF32 is on by default (NvInfer.h kTF32, 8.5.2 to 11.x: "Enabled by default"); an fp32 engine
    # clears it so that fp32 means fp32 on Orin/Thor and the fp32 verify gates (set from CPU
    # differences of ~1e-4) still judge it.
    cleared_flags: Tuple[str, ...] = ()


def plan_build(
    trt_version: str,
    precision: str,
    int8_source: Optional[str] = None,
    qdq_float_dtype: str = "float32",
    dla_core: Optional[int] = None,
) -> BuildPlan:
    """The build recipe for a precision on a TensorRT version; JetyoloError when impossible.

    - fp32/fp16: weakly typed network from the fp32 ONNX, FP16 flag for fp16 (TensorRT < 11);
      TensorRT >= 11 has no FP16 flag: fp16 parses the bundle's fp16 variant, strongly typed.
    - int8 from cache (TensorRT 8.5-10.x): INT8+FP16 flags, a calibrator that only returns the
      cache, head layers kept FP16 with PREFER_PRECISION_CONSTRAINTS.
    - int8 from Q/DQ: on 8.5-10.x a weakly typed network with INT8+FP16, so the layers left in
      float run in FP16; strongly typed (types from the ONNX, no precision flags) on TensorRT >= 11,
      and on 10.x when the Q/DQ model's float parts are already float16.
    """
    major, minor, _ = parse_trt_version(trt_version)
    if (major, minor) < (8, 5):
        raise JetyoloError(
            f"TensorRT {trt_version} is too old: jetyolo needs 8.5 or newer "
            "(set_tensor_address/execute_async_v3); update to JetPack 5.1 or later"
        )
    if precision not in PRECISIONS:
        raise JetyoloError(f"--precision {precision!r} must be one of {list(PRECISIONS)}")
    if precision != "int8" and int8_source:
        raise JetyoloError("--int8-from only applies to --precision int8")
    if dla_core is not None and precision == "fp32":
        raise JetyoloError("DLA runs FP16 or INT8 only; use --precision fp16 or int8 with --dla")
    explicit_batch = major < 10
    if precision == "fp32":
        return BuildPlan("fp32", major >= 11, explicit_batch, (), False, False, ("TF32",))
    if precision == "fp16":
        if major >= 11:  # strongly typed only: half precision comes from a half graph
            return BuildPlan(FP16_VARIANT, True, explicit_batch, (), False, False)
        return BuildPlan("fp32", False, explicit_batch, ("FP16",), False, False)
    if int8_source not in INT8_SOURCES:
        raise JetyoloError(f"--int8-from {int8_source!r} must be one of {list(INT8_SOURCES)}")
    if int8_source == "cache":
        if major >= 11:
            raise JetyoloError(
                f"TensorRT {trt_version} removed calibration caches (implicit INT8); "
                "use --int8-from qdq"
            )
        cache_flags = ("INT8", "FP16", "PREFER_PRECISION_CONSTRAINTS")
        return BuildPlan("fp32", False, explicit_batch, cache_flags, True, True)
    strongly = major >= 11 or (major == 10 and qdq_float_dtype == "float16")
    flags: Tuple[str, ...] = () if strongly else ("INT8", "FP16")
    return BuildPlan(QDQ_VARIANT, strongly, explicit_batch, flags, False, False)


def default_precision(trt_version: str, variants: Iterable[str]) -> Tuple[str, str]:
    """(precision, why) when none is asked for: fp16 on TensorRT 8.5-10.x (FP16 flag); on 11,
    which has no FP16 flag, fp16 when the bundle carries the fp16 ONNX variant, else fp32."""
    major = parse_trt_version(trt_version)[0]
    if major < 11:
        return "fp16", f"default on TensorRT {trt_version}"
    if FP16_VARIANT in set(variants):
        return "fp16", f"default on TensorRT {trt_version}: the bundle's fp16 graph"
    return "fp32", (
        f"default on TensorRT {trt_version}: the bundle has no fp16 graph (re-export it with the "
        "fp16 variant for a half-precision engine)"
    )


def check_fp16_graph(trt_version: str, variant: str, variants: Iterable[str], root: Any) -> None:
    """TensorRT >= 11 builds fp16 only from the bundle's fp16 ONNX graph (float input)."""
    if variant != "fp32":
        raise JetyoloError(
            f"--precision fp16 with --variant {variant}: TensorRT {trt_version} builds half "
            "precision only from the bundle's fp16 graph (float input); use --variant fp32 or "
            "--precision int8 --int8-from qdq"
        )
    if FP16_VARIANT not in set(variants):
        raise JetyoloError(
            f"--precision fp16 on TensorRT {trt_version} needs a half-precision ONNX graph and "
            f"bundle {root} has no '{FP16_VARIANT}' variant; re-export the bundle with "
            "`jetyolo export` (it adds the fp16 graph), or use --precision fp32 or int8"
        )


def choose_int8_source(
    requested: Optional[str], trt_version: str, has_cache: bool, has_qdq: bool
) -> Tuple[str, str]:
    """(source, why) for ``--int8-from`` (None = pick): Q/DQ on TensorRT >= 10 when the bundle has
    it (NVIDIA's recommended path there), the calibration cache otherwise."""
    major = parse_trt_version(trt_version)[0]
    calibrate = "add it with `jetyolo calibrate BUNDLE --trt-version " + trt_version + "`"
    if requested == "cache" and not has_cache:
        raise JetyoloError(f"the bundle has no calibration cache; {calibrate}")
    if requested == "qdq" and not has_qdq:
        raise JetyoloError(f"the bundle has no '{QDQ_VARIANT}' variant; {calibrate}")
    if requested:
        return requested, f"--int8-from {requested}"
    if has_qdq and (major >= 10 or not has_cache):
        return "qdq", f"Q/DQ model (TensorRT {trt_version}: explicit quantization preferred)"
    if has_cache and major < 11:
        return "cache", f"calibration cache (TensorRT {trt_version})"
    raise JetyoloError(
        f"the bundle has no INT8 form usable with TensorRT {trt_version}; {calibrate}"
    )


@dataclass(frozen=True)
class LayerRecord:
    """What the device needs to know about one layer of a parsed TensorRT network."""

    name: str
    type: str  # trt.LayerType member name: "CONVOLUTION", "CONSTANT", "SHAPE", ...
    outputs: Tuple[Tuple[str, str], ...]  # (tensor name, trt.DataType member name)


FLOAT_TYPES = ("FLOAT", "HALF", "BF16")
_NOT_CALIBRATED = ("CONSTANT", "SHAPE", "ASSERTION")
# Names TensorRT gives tensors that have no ONNX counterpart: its own default for layers nobody
# named (8.x: "(Unnamed Layer* 12) [Shuffle]_output") and the ONNX parser's helper layers from
# 8.7/9 on ("ONNXTRT_Broadcast_output", onnx-tensorrt importerUtils.cpp). Used only for bundles
# whose manifest predates ``calibration.tensors``.
HELPER_PREFIXES = ("(Unnamed Layer", "ONNXTRT_")


def network_activations(
    inputs: Iterable[Tuple[str, str]], layers: Sequence[LayerRecord]
) -> List[str]:
    """Every tensor TensorRT would calibrate: float network inputs and float outputs of
    computing layers (constants and shape tensors are never quantized)."""
    names = [name for name, dtype in inputs if dtype in FLOAT_TYPES]
    for layer in layers:
        if layer.type in _NOT_CALIBRATED:
            continue
        names += [name for name, dtype in layer.outputs if dtype in FLOAT_TYPES]
    return list(dict.fromkeys(names))


def calibration_tensor_names(
    inputs: Iterable[Tuple[str, str]],
    layers: Sequence[LayerRecord],
    onnx_tensors: Optional[Iterable[str]] = None,
) -> Tuple[List[str], List[str]]:
    """(required, helpers). Required: the network's activations that exist in the bundle's ONNX
    graph (``onnx_tensors``, recorded by the host as ``calibration.tensors``), which a cache must
    cover. Helpers: tensors TensorRT's parser added itself; without a scale they run in float,
    which is what TensorRT does for any tensor a cache lacks. Without ``onnx_tensors`` (older
    bundles) helpers are told by name (HELPER_PREFIXES)."""
    activations = network_activations(inputs, layers)
    if onnx_tensors is None:
        helpers = [name for name in activations if name.startswith(HELPER_PREFIXES)]
    else:
        graph = set(onnx_tensors)
        helpers = [name for name in activations if name not in graph]
    chosen = set(helpers)
    return [name for name in activations if name not in chosen], helpers


def all_tensor_names(
    inputs: Iterable[Tuple[str, str]], layers: Sequence[LayerRecord]
) -> List[str]:
    """Every tensor of the parsed network (inputs and all layer outputs, of any type)."""
    names = [name for name, _ in inputs]
    names += [name for layer in layers for name, _ in layer.outputs]
    return list(dict.fromkeys(names))


def layers_to_keep_fp16(
    layers: Sequence[LayerRecord], keep_layers: Iterable[str], keep_tensors: Iterable[str]
) -> List[str]:
    """Layers that must run in FP16 under INT8: those named by the bundle (ONNX node names,
    which the ONNX parser gives to its layers, also with a suffix such as ``_1``) or producing a
    tensor the cache leaves out on purpose. Layers with non-float outputs are skipped."""
    node_names, tensors = set(keep_layers), set(keep_tensors)
    chosen = []
    for layer in layers:
        if layer.type in _NOT_CALIBRATED or not layer.outputs:
            continue
        if any(dtype not in FLOAT_TYPES for _, dtype in layer.outputs):
            continue
        named = layer.name in node_names or layer.name.rsplit("_", 1)[0] in node_names
        if named or any(name in tensors for name, _ in layer.outputs):
            chosen.append(layer.name)
    return chosen


# ---- the bundle's INT8 inputs ------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Inputs:
    """What a bundle offers for INT8 on one TensorRT version (from ``manifest["calibration"]``)."""

    cache: Optional[Path]  # the cache whose header matches the device's TensorRT, if any
    cache_versions: Tuple[str, ...]  # TensorRT versions of every cache in the bundle
    qdq: Optional[Path]
    qdq_float_dtype: str
    fp16_layers: Tuple[str, ...]  # ONNX node names kept out of INT8 (the head's post-processing)
    fp16_tensors: Tuple[str, ...]  # tensors the cache leaves out on purpose
    onnx_tensors: Optional[Tuple[str, ...]] = None  # the parsed graph's own tensor names


def _names(calibration: Mapping[str, Any], *keys: str) -> Tuple[str, ...]:
    found: List[str] = []
    for key in keys:
        value = calibration.get(key) or []
        found += [str(item) for item in (value if isinstance(value, list) else [value])]
    return tuple(dict.fromkeys(found))


def _cache_files(bundle: Any, calibration: Mapping[str, Any]) -> List[str]:
    """``calibration.caches`` as written by `jetyolo calibrate` ({version: {"file": ...}}), a
    version -> file mapping or a list of files; else every ``*.cache`` file of the bundle."""
    listed = calibration.get("caches")
    entries = list(listed.values()) if isinstance(listed, Mapping) else listed
    if isinstance(entries, list):
        return [str(entry["file"] if isinstance(entry, Mapping) else entry) for entry in entries]
    return sorted(name for name in bundle.manifest["files"] if name.endswith(".cache"))


def onnx_tensor_names(calibration: Mapping[str, Any], variant: str) -> Optional[Tuple[str, ...]]:
    """``calibration.tensors``: the host's list of the ONNX graph's tensors per variant
    (``{"fp32": [...], "uint8": [...]}``; a plain list is the fp32 graph's). None when absent."""
    listed = calibration.get("tensors")
    if isinstance(listed, list):
        listed = {"fp32": listed}
    if not isinstance(listed, Mapping) or variant not in listed:
        return None
    return tuple(str(name) for name in listed[variant])


def find_int8_inputs(bundle: Any, trt_version: str, variant: str = "fp32") -> Int8Inputs:
    """Pick the bundle's calibration cache for ``trt_version`` by header (files listed in
    ``calibration.caches``, or every ``*.cache`` file) and its Q/DQ model, if any. Layers kept in
    FP16: ``calibration.fp16_layers`` plus the export's ``head.postprocess_nodes``.

    Refuses a calibration that names another ONNX (``calibration.onnx_sha256``)."""
    from device.calibcache import header_version, trt_version_int, version_text

    calibration = bundle.manifest.get("calibration") or {}
    onnx_sha = calibration.get("onnx_sha256")
    if onnx_sha and onnx_sha != bundle.model_sha256("fp32"):
        raise JetyoloError(
            f"bundle {bundle.root}: its calibration belongs to ONNX {str(onnx_sha)[:12]}, the "
            f"bundle's model is {bundle.model_sha256('fp32')[:12]}; re-run `jetyolo calibrate`"
        )
    wanted: Optional[int]
    try:
        wanted = trt_version_int(trt_version)
    except JetyoloError:
        wanted = None  # TensorRT 11+: no cache can be used; Q/DQ may still be
    cache, versions = None, []
    # a variant's own caches, FP16 layers and float tensors (docs/calibration.md, "One cache per
    # variant") override the top-level ones, which are the fp32 graph's
    own = (calibration.get("variants") or {}).get(variant)
    if isinstance(own, Mapping):
        calibration = {**calibration, **own}
    for relative in _cache_files(bundle, calibration):
        version = header_version(bundle.path(relative))
        versions.append(version_text(version))
        if version == wanted:
            cache = bundle.path(relative)
    variants = bundle.manifest["variants"]
    qdq = bundle.model_path(QDQ_VARIANT) if QDQ_VARIANT in variants else None
    qdq_variant = variants.get(QDQ_VARIANT, {})
    float_dtype = str(
        qdq_variant.get("float_dtype")
        or (qdq_variant.get("quantization") or {}).get("float_dtype")
        or "float32"
    )
    head = bundle.manifest.get("head") or {}
    layers = _names(calibration, "fp16_layers", "excluded_layers", "excluded_nodes")
    layers += tuple(name for name in _names(head, "postprocess_nodes") if name not in layers)
    tensors = _names(calibration, "uncached_tensors", "fp16_tensors", "excluded_tensors")
    return Int8Inputs(cache, tuple(versions), qdq, float_dtype, layers, tensors,
                      onnx_tensor_names(calibration, variant))


def no_cache_message(bundle: Any, trt_version: str, versions: Sequence[str]) -> str:
    have = f"caches for TensorRT {', '.join(versions)}" if versions else "no calibration cache"
    return (
        f"bundle {bundle.root} has {have}, none for this device's TensorRT {trt_version}; "
        f"regenerate on the host with `jetyolo calibrate BUNDLE --trt-version {trt_version}`"
    )


def parsed_variant(build: BuildPlan, variant: str) -> str:
    """The bundle graph TensorRT parses: the recipe's own (Q/DQ, fp16) or the one asked for."""
    return build.variant if build.variant != "fp32" else variant


# ---- the optimisation profile ------------------------------------------------------------------
Shape = Tuple[int, ...]


@dataclass(frozen=True)
class InputProfile:
    """The optimisation profile of a network input with runtime dimensions (-1 after TensorRT's
    ONNX parser reads a ``dim_param``): the shapes it must run, min <= opt <= max per dim.

    TensorRT refuses to build a network with a runtime dimension and no profile ("Network has
    dynamic or shape inputs, but no optimization profile has been defined"; NvInferRuntime.h
    IOptimizationProfile: "users need to specify at least one optimization profile"). jetyolo
    builds one profile (index 0, the one a context uses unless told otherwise)."""

    name: str
    min: Shape
    opt: Shape
    max: Shape
    kind: str  # "batch" (export --batch N) or "frame" (the frame-input variant)

    @property
    def tag(self) -> str:
        """What the plan name and the engine key say: ``b4`` (1..4 frames per call) or
        ``1920x1080`` (the frame variant's camera frame, width first as cameras state it)."""
        if self.kind == "frame":
            return f"{self.max[2]}x{self.max[1]}"
        return f"b{self.max[0]}"

    def describe(self) -> str:
        def text(shape: Shape) -> str:
            return "x".join(str(dim) for dim in shape)

        return f"{self.name} min {text(self.min)} opt {text(self.opt)} max {text(self.max)}"

    def key(self) -> str:
        return f"{self.tag}:{self.describe()}"

    @property
    def calibration_shape(self) -> Shape:
        """The shape of the calibration profile (min = opt = max; TensorRT 8.5-10.x calibrate at
        one shape: NvInfer.h setCalibrationProfile "MIN and MAX values will be overwritten by
        kOPT"): one frame, as the host calibrated (``jetyolo calibrate`` feeds one image per
        call) and as the cache-only calibrator's ``get_batch_size`` says."""
        return (1, *self.max[1:])


def input_profile(
    variant: Mapping[str, Any], frame_size: Optional[Tuple[int, int]] = None
) -> Optional[InputProfile]:
    """The profile a bundle graph needs, from its manifest entry; None for a static graph.

    - ``export --batch N`` (N > 1; dim 0 symbolic, H, W, C static): min 1, opt N, max N, so
      one engine runs 1..N frames per call and is tuned for full batches.
    - the frame-input variant ([1, frame_height, frame_width, 3]): min = opt = max =
      1 x H x W x 3 of the camera frame (``frame_size`` (w, h)): one size, so TensorRT folds
      the letterbox's shape arithmetic and tunes for it; another camera size is another plan.
    """
    from device.preprocess import FRAME_INPUT

    spec = variant.get("input") or {}
    shape = list(spec.get("shape") or [])
    name = str(spec.get("name", "images"))
    if name == FRAME_INPUT:
        if frame_size is None:
            raise JetyoloError(
                "variant 'frame' takes the camera frame itself, and its TensorRT engine is built "
                "for one frame size: set capture_width and capture_height in the config (or "
                "`jetyolo build --frame-size WxH`)"
            )
        width, height = frame_size
        pinned = (1, int(height), int(width), 3)
        return InputProfile(name, pinned, pinned, pinned, "frame")
    if len(shape) < 2 or not all(isinstance(dim, int) and dim > 0 for dim in shape):
        return None
    if shape[0] <= 1:
        return None
    batch, rest = int(shape[0]), tuple(int(dim) for dim in shape[1:])
    return InputProfile(name, (1, *rest), (batch, *rest), (batch, *rest), "batch")
