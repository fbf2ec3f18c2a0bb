"""The TensorRT engine cache and the build decisions, without TensorRT.

An engine (a serialized TensorRT plan) only works with the exact TensorRT version and GPU it was
built on, so the device builds it and caches it::

    <cache_dir>/<model_id>/<precision>[-<int8 source>][-<variant>][-dla<N>].plan   the plan
    <cache_dir>/<model_id>/<same name>.plan.json                         sidecar: key + hash
    <cache_dir>/timing-trt<version>-sm<cc>.cache                         TensorRT timing cache

The plan is what TensorRT serialized, nothing prepended, so ``trtexec --loadEngine=X.plan`` loads
it. The sidecar records the ``EngineKey`` it was built for and the plan's size and sha256:
``needs_rebuild`` compares both before a plan is reused. Everything here is plain Python and
tested on machines without TensorRT; the TensorRT calls live in ``device.backends.tensorrt``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from device.calibcache import parse_trt_version
from device.choice import INT8_SOURCES, PRECISIONS
from device.errors import JetyoloError
from device.files import (
    PRIVATE_DIR,
    PRIVATE_FILE,
    atomic_write_bytes,
    atomic_write_json,
    make_writable_dir,
    sha256_file,
)

KEY_SCHEMA = 2  # bump when the build recipe changes in a way that makes old plans stale
FP16_VARIANT = "fp16"  # the half-precision ONNX graph TensorRT >= 11 needs for fp16 engines
MIB = 1 << 20
GIB = 1 << 30
# Workspace "auto": half of the free memory, at most 4 GiB, at least 256 MiB. TensorRT >= 8.4
# defaults the workspace pool to the whole device memory; on a Jetson the GPU shares system RAM,
# so tactic timing on a 4 GB Jetson Nano (or an Orin Nano while a camera pipeline runs) allocates
# until the kernel's OOM killer ends the build. Half the free memory leaves room for the builder's
# own allocations; below 256 MiB the good convolution tactics do not fit at all.
WORKSPACE_CAP = 4 * GIB
WORKSPACE_FLOOR = 256 * MIB
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# L4T major.minor -> JetPack (NOTES.md table; informational, shown by `jetyolo doctor`).
JETPACK_FOR_L4T = {
    (35, 2): "5.1",
    (35, 3): "5.1.1",
    (35, 4): "5.1.2",
    (35, 5): "5.1.3",
    (35, 6): "5.1.4",
    (36, 2): "6.0 DP",
    (36, 3): "6.0",
    (36, 4): "6.1/6.2",
    (38, 4): "7.1",
    (39, 2): "7.2",
}
_TEGRA = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan depends on. A plan is reused only when every field matches."""

    onnx_sha256: str
    variant: str  # bundle graph the engine serves: "fp32", "uint8", "nms"
    precision: str
    int8_source: Optional[str]  # None | "cache" | "qdq"
    int8_sha256: Optional[str]  # sha256 of the calibration cache or of the Q/DQ model
    trt_version: str
    gpu_name: str
    compute_capability: str
    l4t_release: Optional[str]  # "R36.4.0" on a Jetson, None elsewhere
    workspace: str  # the *setting* ("auto" or "512MiB"): auto's bytes vary with free memory
    dla_core: Optional[int] = None
    fp16_layers: Tuple[str, ...] = ()
    schema: int = KEY_SCHEMA

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        data["fp16_layers"] = list(self.fp16_layers)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineKey:
        names = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data) - {"dla_core", "fp16_layers", "schema"})
        if unknown or missing:
            raise ValueError(f"engine key has unknown fields {unknown} / misses {missing}")
        values = dict(data)
        values["fp16_layers"] = tuple(values.get("fp16_layers", ()))
        return cls(**values)

    def differences(self, other: EngineKey) -> List[str]:
        """``field: cached -> wanted`` for each field that differs (hashes shortened)."""
        changed = []
        for item in fields(self):
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if mine != theirs:
                changed.append(f"{item.name}: {_short(mine)} -> {_short(theirs)}")
        return changed


def _short(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12]
    if isinstance(value, tuple) and len(value) > 3:
        return f"{len(value)} layers"
    return repr(value)


def parse_nv_tegra_release(text: str) -> Optional[str]:
    """``# R36 (release), REVISION: 4.0, GCID: ...`` -> ``"R36.4.0"``; None when not L4T."""
    match = _TEGRA.search(text)
    return f"R{match.group(1)}.{match.group(2)}" if match else None


def read_l4t_release(path: Path = NV_TEGRA_RELEASE) -> Optional[str]:
    try:
        return parse_nv_tegra_release(path.read_text(errors="replace"))
    except OSError:
        return None


def jetpack_for_l4t(release: Optional[str]) -> Optional[str]:
    """``"R36.4.0"`` -> ``"6.1/6.2"``; None for unknown releases."""
    match = re.match(r"R(\d+)\.(\d+)", release or "")
    if not match:
        return None
    return JETPACK_FOR_L4T.get((int(match.group(1)), int(match.group(2))))


def parse_meminfo(text: str) -> Tuple[int, int]:
    """``/proc/meminfo`` -> (MemAvailable, MemTotal) in bytes. On a Jetson the GPU allocates from
    this same RAM, so it is what the builder can use."""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name.strip()] = int(parts[0]) * 1024
    if "MemAvailable" not in values or "MemTotal" not in values:
        raise JetyoloError("/proc/meminfo has no MemAvailable/MemTotal; pass --workspace MiB")
    return values["MemAvailable"], values["MemTotal"]


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


def parse_workspace(text: str) -> Optional[int]:
    """``"auto"`` -> None (size it at build time), ``"512"`` -> 512 MiB in bytes."""
    text = str(text).strip().lower()
    if text == "auto":
        return None
    if not text.isdigit() or not 16 <= int(text) <= 64 * 1024:
        raise JetyoloError(f"--workspace {text!r} must be 'auto' or MiB between 16 and 65536")
    return int(text) * MIB


def workspace_setting(workspace_bytes: Optional[int]) -> str:
    return "auto" if workspace_bytes is None else f"{workspace_bytes // MIB}MiB"


def default_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$JETYOLO_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/jetyolo/engines``, else
    ``~/.cache/jetyolo/engines``."""
    if env.get("JETYOLO_ENGINE_CACHE"):
        return Path(env["JETYOLO_ENGINE_CACHE"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "jetyolo" / "engines"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+-]+", "_", text).strip("._") or "model"


def plan_path(
    cache_dir: Union[str, Path],
    model_id: str,
    precision: str,
    int8_source: Optional[str] = None,
    dla_core: Optional[int] = None,
    variant: str = "fp32",
) -> Path:
    name = precision + (f"-{int8_source}" if int8_source else "")
    name += f"-{_safe(variant)}" if variant != "fp32" else ""
    name += f"-dla{dla_core}" if dla_core is not None else ""
    return Path(cache_dir) / _safe(model_id) / f"{name}.plan"


def sidecar_path(plan: Union[str, Path]) -> Path:
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def timing_cache_path(
    cache_dir: Union[str, Path], trt_version: str, compute_capability: str
) -> Path:
    """One timing cache per TensorRT version and GPU architecture, shared by all models: tactic
    timings are per layer configuration, so other models' builds speed up too."""
    return Path(cache_dir) / f"timing-trt{_safe(trt_version)}-sm{_safe(compute_capability)}.cache"


def needs_rebuild(plan: Union[str, Path], expected: EngineKey) -> Tuple[bool, str]:
    """(True, why) when the cached plan cannot be reused, (False, why it can) otherwise."""
    plan = Path(plan)
    sidecar = sidecar_path(plan)
    if not plan.is_file():
        return True, f"no cached engine at {plan}"
    if not sidecar.is_file():
        return True, f"cached engine {plan} has no sidecar {sidecar.name} (not built by jetyolo?)"
    try:
        meta = json.loads(sidecar.read_text())
        cached = EngineKey.from_json(meta["key"])
        size, digest = int(meta["plan"]["size"]), str(meta["plan"]["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return True, f"sidecar {sidecar} is unreadable ({exc})"
    changed = cached.differences(expected)
    if changed:
        return True, f"cached engine {plan} was built for another setup: " + "; ".join(changed)
    actual_size = plan.stat().st_size
    if actual_size != size:
        return True, f"engine {plan} has {actual_size} bytes, sidecar says {size} (truncated)"
    if sha256_file(plan) != digest:
        return True, f"cached engine {plan} does not match its sidecar's sha256 (corrupt)"
    return False, (
        f"cached engine {plan} matches (TensorRT {expected.trt_version}, {expected.gpu_name})"
    )


def write_plan(
    plan: Union[str, Path],
    plan_bytes: bytes,
    key: EngineKey,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write the plan, then its sidecar, each through a temp file and a rename. A crash between
    the two leaves a plan whose sha256 disagrees with the old sidecar: rebuilt next time."""
    if not plan_bytes:
        raise JetyoloError("TensorRT returned an empty engine; see the TensorRT log above")
    plan = Path(plan)
    atomic_write_bytes(plan, plan_bytes, PRIVATE_FILE)
    meta = {
        "key": key.to_json(),
        "plan": {"file": plan.name, "size": len(plan_bytes), "sha256": sha256_file(plan)},
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra or {})
    atomic_write_json(sidecar_path(plan), meta, PRIVATE_FILE)
    return plan


def check_cache_dir(folder: Path) -> None:
    """Refuse an engine cache this user cannot write before the build, not after its minutes."""
    try:
        make_writable_dir(folder, PRIVATE_DIR)
    except OSError as exc:
        raise JetyoloError(
            f"engine cache {folder} is not writable ({exc.strerror or exc}); pass --cache-dir "
            "(engine_cache_dir in the config) or set JETYOLO_ENGINE_CACHE to a writable folder"
        ) from exc


@dataclass(frozen=True)
class BuildPlan:
    """What to ask TensorRT for, decided from the versions and flags alone."""

    variant: str  # bundle variant whose ONNX is parsed: "fp32" or "int8-qdq"
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
    return BuildPlan("int8-qdq", strongly, explicit_batch, flags, False, False)


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
        raise JetyoloError(f"the bundle has no 'int8-qdq' variant; {calibrate}")
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


def _cache_files(bundle: Any) -> List[str]:
    """``calibration.caches`` as written by `jetyolo calibrate` ({version: {"file": ...}}), a
    version -> file mapping or a list of files; else every ``*.cache`` file of the bundle."""
    listed = (bundle.manifest.get("calibration") or {}).get("caches")
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
    for relative in _cache_files(bundle):
        version = header_version(bundle.path(relative))
        if version is None:
            continue
        versions.append(version_text(version))
        if version == wanted:
            cache = bundle.path(relative)
    variants = bundle.manifest["variants"]
    qdq = bundle.model_path("int8-qdq") if "int8-qdq" in variants else None
    qdq_variant = variants.get("int8-qdq", {})
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
    )
    return key, build, inputs, int8_why or why


def parsed_variant(build: BuildPlan, variant: str) -> str:
    """The bundle graph TensorRT parses: the recipe's own (int8-qdq, fp16) or the one asked for."""
    return build.variant if build.variant != "fp32" else variant


def key_plan_path(cache_dir: Union[str, Path], model_id: str, key: EngineKey) -> Path:
    """The one plan-naming rule (build, run and verify all call it): precision, INT8 source, the
    parsed graph unless the precision already says it (fp32, fp16, int8-qdq), DLA core."""
    implied = key.variant in ("fp32", FP16_VARIANT, "int8-qdq")
    return plan_path(cache_dir, model_id, key.precision, key.int8_source, key.dla_core,
                     "fp32" if implied else key.variant)


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
