"""Engine orchestration: reuse the cached plan or check the INT8 inputs and build, with the
TensorRT calls injected (``TensorRTOps``; ``device.backends.tensorrt_build`` implements them).

The cache (plan, sidecar, key) is ``device.engine_cache``; the build recipe and INT8 decisions
are ``device.build_plan``; L4T facts are ``device.l4t``. Everything here is plain Python and
tested on machines without TensorRT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Optional, Tuple

from device.build_plan import (
    FP16_VARIANT,
    BuildPlan,
    InputProfile,
    Int8Inputs,
    LayerRecord,
    all_tensor_names,
    calibration_tensor_names,
    check_fp16_graph,
    choose_int8_source,
    default_precision,
    find_int8_inputs,
    input_profile,
    layers_to_keep_fp16,
    no_cache_message,
    parsed_variant,
    plan_build,
)
from device.choice import MIB
from device.engine_cache import (
    EngineKey,
    check_cache_dir,
    default_cache_dir,
    key_plan_path,
    needs_rebuild,
    timing_cache_path,
    workspace_setting,
    write_plan,
)
from device.errors import JetyoloError
from device.files import sha256_file

GIB = 1 << 30
# Workspace "auto": half of the free memory, at most 4 GiB, at least 256 MiB. TensorRT >= 8.4
# defaults the workspace pool to the whole device memory; on a Jetson the GPU shares system RAM,
# so tactic timing on a 4 GB Jetson Nano (or an Orin Nano while a camera pipeline runs) allocates
# until the kernel's OOM killer ends the build. Half the free memory leaves room for the builder's
# own allocations; below 256 MiB the good convolution tactics do not fit at all.
WORKSPACE_CAP = 4 * GIB
WORKSPACE_FLOOR = 256 * MIB


def auto_workspace_bytes(free_bytes: int, total_bytes: int) -> int:
    """Builder workspace for ``--workspace auto``: min(free/2, 4 GiB), at least 256 MiB, in whole
    MiB. Refuses when even the floor does not fit twice into free memory (see WORKSPACE_FLOOR)."""
    if free_bytes > total_bytes or free_bytes < 0:
        raise ValueError(f"free {free_bytes} must be within [0, total {total_bytes}]")
    if free_bytes < 2 * WORKSPACE_FLOOR:
        raise JetyoloError(
            f"only {free_bytes // MIB} MiB of {total_bytes // MIB} MiB memory is free, too little "
            f"to build a TensorRT engine (needs {2 * WORKSPACE_FLOOR // MIB} MiB); stop other "
            "programs (e.g. `sudo systemctl stop jetyolo`), add swap, or pass --workspace MiB"
        )
    workspace = max(WORKSPACE_FLOOR, min(free_bytes // 2, WORKSPACE_CAP))
    return workspace // MIB * MIB



# ---- orchestration (TensorRT calls injected) ---------------------------------------------------
@dataclass(frozen=True)
class DeviceFacts:
    trt_version: str
    gpu_name: str
    compute_capability: str
    l4t_release: Optional[str]
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class BuildRequest:
    precision: Optional[str] = None  # None: default_precision for the device's TensorRT
    int8_from: Optional[str] = None  # None: choose_int8_source decides
    variant: str = "fp32"  # bundle graph for fp32/fp16/int8-from-cache engines
    workspace_bytes: Optional[int] = None  # None: auto_workspace_bytes
    dla_core: Optional[int] = None
    cache_dir: Optional[Path] = None  # None: default_cache_dir()
    force: bool = False
    frame_size: Optional[Tuple[int, int]] = None  # (w, h): the frame variant's camera frame


@dataclass(frozen=True)
class EngineResult:
    plan: Path
    key: EngineKey
    built: bool
    reason: str
    build_seconds: float = 0.0


class TensorRTOps:
    """The TensorRT calls orchestration needs (``device.backends.tensorrt`` implements them)."""

    def device_facts(self) -> DeviceFacts:
        raise NotImplementedError

    def network_layers(
        self, onnx_path: Path, strongly_typed: bool
    ) -> Tuple[List[Tuple[str, str]], List[LayerRecord]]:
        raise NotImplementedError

    def build_engine(self, onnx_path: Path, build: BuildPlan, **options: Any) -> bytes:
        raise NotImplementedError


def _int8_choice(
    bundle: Any, request: BuildRequest, facts: DeviceFacts, precision: str
) -> Tuple[Optional[str], Optional[Int8Inputs], str]:
    if precision != "int8":
        return None, None, ""
    inputs = find_int8_inputs(bundle, facts.trt_version, request.variant)
    if request.int8_from == "cache" and inputs.cache is None:
        raise JetyoloError(no_cache_message(bundle, facts.trt_version, inputs.cache_versions))
    if request.variant != "fp32":  # the Q/DQ model is a float-input graph of its own
        if request.int8_from == "qdq":
            raise JetyoloError(
                f"--variant {request.variant} with --int8-from qdq: the Q/DQ model is the fp32 "
                f"graph quantized (float input), not the {request.variant} graph; use "
                "--int8-from cache for this variant, or --variant fp32"
            )
        inputs = dataclasses.replace(inputs, qdq=None)
    source, why = choose_int8_source(
        request.int8_from, facts.trt_version, inputs.cache is not None, inputs.qdq is not None
    )
    return source, inputs, why


def engine_key(
    bundle: Any, request: BuildRequest, facts: DeviceFacts
) -> Tuple[EngineKey, BuildPlan, Optional[Int8Inputs], str]:
    """The key of the engine ``request`` asks for on this device, how to build it, and why this
    precision / INT8 source (empty when asked for explicitly)."""
    precision, why = request.precision, ""
    if precision is None:
        precision, why = default_precision(facts.trt_version, bundle.manifest["variants"])
    source, inputs, int8_why = _int8_choice(bundle, request, facts, precision)
    float_dtype = inputs.qdq_float_dtype if inputs else "float32"
    build = plan_build(facts.trt_version, precision, source, float_dtype, request.dla_core)
    if build.variant == FP16_VARIANT:
        check_fp16_graph(facts.trt_version, request.variant, bundle.manifest["variants"],
                         bundle.root)
    int8_file = None
    if inputs is not None:
        int8_file = inputs.cache if source == "cache" else inputs.qdq
    keep: Tuple[str, ...] = ()
    if build.keep_fp16_layers and inputs is not None:
        keep = tuple(sorted(inputs.fp16_layers + inputs.fp16_tensors))
    graph = parsed_variant(build, request.variant)
    profile = graph_profile(bundle, graph, request)
    if profile is not None and request.dla_core is not None and profile.min != profile.max:
        raise JetyoloError(
            f"--dla {request.dla_core}: DLA runs one input shape (NvInferRuntime.h "
            f"setDimensions: min = opt = max on DLA), this bundle's engine takes "
            f"{profile.describe()}; build it for the GPU (no --dla), or export with --batch 1"
        )
    key = EngineKey(
        onnx_sha256=bundle.model_sha256(graph),
        variant=graph,
        precision=precision,
        int8_source=source,
        int8_sha256=sha256_file(int8_file) if int8_file else None,
        trt_version=facts.trt_version,
        gpu_name=facts.gpu_name,
        compute_capability=facts.compute_capability,
        l4t_release=facts.l4t_release,
        workspace=workspace_setting(request.workspace_bytes),
        dla_core=request.dla_core,
        fp16_layers=keep,
        input_profile=profile.key() if profile is not None else None,
    )
    return key, build, inputs, int8_why or why


def graph_profile(bundle: Any, graph: str, request: BuildRequest) -> Optional[InputProfile]:
    """The optimisation profile the parsed graph needs (``build_plan.input_profile``)."""
    return input_profile(bundle.variant(graph), request.frame_size)


def ensure_engine(
    bundle: Any, request: BuildRequest, ops: TensorRTOps, log: Any = print
) -> EngineResult:
    """Reuse the cached plan when its key and hash match, else check the INT8 inputs, build, and
    write plan + sidecar atomically. ``log`` gets one line per phase."""
    facts = ops.device_facts()
    key, build, inputs, why = engine_key(bundle, request, facts)
    cache_dir = Path(request.cache_dir) if request.cache_dir else default_cache_dir()
    plan = key_plan_path(cache_dir, bundle.model_id, key)
    rebuild, reason = needs_rebuild(plan, key)
    if not rebuild and not request.force:
        log(f"engine: reusing {reason}")
        return EngineResult(plan, key, False, reason)
    log(f"engine: building ({'--force' if not rebuild else reason})")
    check_cache_dir(plan.parent)
    if why:
        log(f"engine: {key.precision}" + (f" from {why}" if key.int8_source else f" ({why})"))
    onnx_path = bundle.model_path(key.variant)
    cache_bytes: Optional[bytes] = None
    fp16_layers: List[str] = []
    if build.calibrator_from_cache and inputs is not None and inputs.cache is not None:
        cache_bytes, fp16_layers = check_int8_cache(inputs, onnx_path, build, facts, ops, log)
    profile = graph_profile(bundle, key.variant, request)
    if profile is not None:
        log(f"engine: optimisation profile {profile.describe()}")
    workspace = request.workspace_bytes or auto_workspace_bytes(facts.free_bytes, facts.total_bytes)
    log(
        f"engine: TensorRT {facts.trt_version} on {facts.gpu_name} (sm {facts.compute_capability})"
        f", {key.precision}, workspace {workspace // MIB} MiB"
    )
    started = datetime.now(timezone.utc)
    plan_bytes = ops.build_engine(
        onnx_path,
        build,
        calib_cache=cache_bytes,
        head_fp16_layers=fp16_layers,
        workspace_bytes=workspace,
        timing_cache_path=timing_cache_path(
            cache_dir, facts.trt_version, facts.compute_capability
        ),
        dla_core=request.dla_core,
        input_profile=profile,
        log_progress=log,
    )
    seconds = (datetime.now(timezone.utc) - started).total_seconds()
    write_plan(plan, plan_bytes, key, {"build_seconds": round(seconds, 1),
                                       "workspace_bytes": workspace, "int8": why or None})
    log(f"engine: wrote {plan} ({len(plan_bytes) / MIB:.1f} MiB) in {seconds:.0f} s")
    return EngineResult(plan, key, True, reason, seconds)


def check_int8_cache(
    inputs: Int8Inputs,
    onnx_path: Path,
    build: BuildPlan,
    facts: DeviceFacts,
    ops: TensorRTOps,
    log: Any,
) -> Tuple[bytes, List[str]]:
    """Refuse a cache that does not fit this device and network (TensorRT would otherwise
    calibrate on no data); return its bytes and the layers to keep in FP16."""
    from device.calibcache import check_cache_for_device, read_cache

    if inputs.cache is None:
        raise JetyoloError("internal: no calibration cache to check")
    cache = read_cache(inputs.cache)
    network_inputs, layers = ops.network_layers(onnx_path, build.strongly_typed)
    tensors, helpers = calibration_tensor_names(network_inputs, layers, inputs.onnx_tensors)
    if inputs.onnx_tensors is None:
        log(f"engine: the bundle lists no ONNX tensors for {onnx_path.name} "
            "(calibration.tensors); TensorRT's helper tensors are told by name")
    keep = layers_to_keep_fp16(layers, inputs.fp16_layers, inputs.fp16_tensors)
    kept_outputs = [name for layer in layers if layer.name in keep for name, _ in layer.outputs]
    allowed_missing = set(inputs.fp16_tensors) | set(kept_outputs)
    known = all_tensor_names(network_inputs, layers)
    problems = check_cache_for_device(
        cache, facts.trt_version, tensors, allowed_missing, known_tensor_names=known
    )
    if problems:
        alternative = " (or build from the Q/DQ model: --int8-from qdq)" if inputs.qdq else ""
        raise JetyoloError(" ; ".join(problems) + alternative)
    unscaled = [name for name in helpers if name not in cache.scales]
    if unscaled:
        log(f"engine: {len(unscaled)} tensor(s) TensorRT's parser added (not in the ONNX graph, "
            f"e.g. {unscaled[0]!r}) have no scale and run in float, as TensorRT does for them")
    log(
        f"engine: calibration cache {inputs.cache.name} fits ({len(cache.scales)} tensors, "
        f"{cache.header}); {len(keep)} head layer(s) kept in FP16"
    )
    return inputs.cache.read_bytes(), keep
