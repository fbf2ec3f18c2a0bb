"""The TensorRT engine cache: plan files, their sidecars and keys, without TensorRT.

An engine (a serialized TensorRT plan) only works with the exact TensorRT version and GPU it was
built on, so the device builds it and caches it::

    <cache_dir>/<model_id>/<precision>[-<int8 source>][-<variant>][-<profile>][-dla<N>].plan
    <cache_dir>/<model_id>/<same name>.plan.json                         sidecar: key + hash
    <cache_dir>/timing-trt<version>-sm<cc>.cache                         TensorRT timing cache

The plan is what TensorRT serialized, nothing prepended, so ``trtexec --loadEngine=X.plan`` loads
it. The sidecar records the ``EngineKey`` it was built for and the plan's size and sha256:
``needs_rebuild`` compares both before a plan is reused. ``key_plan_path`` is the one naming rule
(build, run and verify all reach the plan through it).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from device.calibcache import parse_trt_version
from device.choice import FP16_VARIANT, MIB, QDQ_VARIANT
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
    # the optimisation profile of a graph with runtime dims, ``TAG:describe()`` of
    # ``device.build_plan.InputProfile`` ("b4:images min 1x3x640x640 opt 4x... max 4x...",
    # "1920x1080:frame min 1x1080x1920x3 ..."); None for a static graph (and old sidecars)
    input_profile: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        data["fp16_layers"] = list(self.fp16_layers)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineKey:
        names = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data) - {"dla_core", "fp16_layers", "schema",
                                              "input_profile"})
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
    profile_tag: Optional[str] = None,
) -> Path:
    name = precision + (f"-{int8_source}" if int8_source else "")
    name += f"-{_safe(variant)}" if variant != "fp32" else ""
    name += f"-{_safe(profile_tag)}" if profile_tag else ""
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


def key_plan_path(cache_dir: Union[str, Path], model_id: str, key: EngineKey) -> Path:
    """The one plan-naming rule (build, run and verify all call it): precision, INT8 source, the
    parsed graph unless the precision already says it (the fp32 graph; the Q/DQ model for
    int8-qdq; the fp16 graph for fp16 on TensorRT >= 11, the only way there), the optimisation
    profile's tag (``b4``: 1..4 frames per call; ``1920x1080``: the frame variant's camera size),
    DLA core."""
    implied = key.variant == "fp32" or (key.variant == QDQ_VARIANT and key.int8_source == "qdq")
    if key.variant == FP16_VARIANT and key.precision == "fp16":
        implied = parse_trt_version(key.trt_version)[0] >= 11
    tag = key.input_profile.partition(":")[0] if key.input_profile else None
    return plan_path(cache_dir, model_id, key.precision, key.int8_source, key.dla_core,
                     "fp32" if implied else key.variant, tag)
