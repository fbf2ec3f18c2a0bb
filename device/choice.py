"""Which backend runs which bundle graph at which precision: decided once, here.

``BackendChoice`` holds what the config (or a verb's flags) asks for; ``jetyolo run``, ``build``,
``verify``, ``update`` and the bench all turn it into a backend or an engine build through its
methods, so a name means the same thing everywhere. The precision left unset (None) is decided by
``device.build_plan.default_precision`` once TensorRT's version is known.

The one remapping: the ``int8-qdq`` variant is the bundle's Q/DQ model. ONNX Runtime runs that
graph as stored; TensorRT builds an INT8 engine from it (precision int8, INT8 from qdq).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from device.errors import JetyoloError

if TYPE_CHECKING:
    from device.config import RunConfig
    from device.engine import BuildRequest

BACKEND_KINDS = ("auto", "tensorrt", "onnxruntime")
PRECISIONS = ("fp32", "fp16", "int8")
INT8_SOURCES = ("cache", "qdq")
QDQ_VARIANT = "int8-qdq"  # the bundle's Q/DQ INT8 model
FP16_VARIANT = "fp16"  # the bundle's half-precision graph (TensorRT >= 11 builds fp16 from it)
MIB = 1 << 20


WORKSPACE_MIB = (16, 64 * 1024)  # the builder workspace a user may ask for


def parse_workspace(text: Any) -> Optional[int]:
    """``--workspace``: ``"auto"`` -> None (sized at build time), ``"512"`` -> 512 (MiB)."""
    value = str(text).strip().lower()
    if value == "auto":
        return None
    low, high = WORKSPACE_MIB
    if not value.isdigit() or not low <= int(value) <= high:
        raise JetyoloError(f"workspace {value!r} must be 'auto' or MiB between {low} and {high}")
    return int(value)


@dataclass(frozen=True)
class BackendChoice:
    """What to run: ``kind`` (auto, tensorrt, onnxruntime), the bundle ``variant`` (None: the
    backend's default), ``precision`` (None: per TensorRT version), ``int8_from`` (None: the
    engine code picks), the engine ``cache_dir`` (None: the default), ONNX Runtime ``threads``
    and ``infer_workers``, the builder workspace in MiB (None: auto) and the ``dla_core``."""

    kind: str = "auto"
    variant: Optional[str] = None
    precision: Optional[str] = None
    int8_from: Optional[str] = None
    cache_dir: Optional[Path] = None
    threads: Optional[int] = None
    workspace_mib: Optional[int] = None
    dla_core: Optional[int] = None
    infer_workers: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in BACKEND_KINDS:
            raise JetyoloError(f"backend {self.kind!r} is not one of {', '.join(BACKEND_KINDS)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise JetyoloError(
                f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.int8_from is not None and self.int8_from not in INT8_SOURCES:
            raise JetyoloError(
                f"int8_from {self.int8_from!r} is not one of {', '.join(INT8_SOURCES)}")
        if self.dla_core is not None and self.dla_core < 0:
            raise JetyoloError(f"dla {self.dla_core}: a DLA core number is 0 or 1")
        low, high = WORKSPACE_MIB
        if self.workspace_mib is not None and not low <= self.workspace_mib <= high:
            raise JetyoloError(f"workspace {self.workspace_mib} MiB is not within {low}-{high}")

    @classmethod
    def from_config(cls, config: RunConfig) -> BackendChoice:
        """The choice a ``RunConfig`` names."""
        cache_dir = config.engine_cache_dir
        return cls(
            kind=config.backend, variant=config.variant, precision=config.precision,
            int8_from=config.int8_from,
            cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
            threads=config.threads, workspace_mib=config.workspace_mib, dla_core=config.dla,
            infer_workers=config.infer_workers,
        )

    def with_kind(self, kind: str) -> BackendChoice:
        return replace(self, kind=kind)

    @property
    def is_qdq(self) -> bool:
        return self.variant == QDQ_VARIANT

    @property
    def int8_source(self) -> Optional[str]:
        """INT8 source for an engine: qdq for the Q/DQ variant, else what was asked (only with
        precision int8; a config's int8_from is ignored otherwise)."""
        if self.is_qdq:
            return "qdq"
        return self.int8_from if self.precision == "int8" else None

    def build_request(self, force: bool = False) -> BuildRequest:
        """The TensorRT engine this choice names (``device.engine.ensure_engine``)."""
        from device.engine import BuildRequest

        return BuildRequest(
            precision="int8" if self.is_qdq else self.precision,
            int8_from=self.int8_source,
            variant="fp32" if self.is_qdq or self.variant is None else self.variant,
            workspace_bytes=None if self.workspace_mib is None else self.workspace_mib * MIB,
            dla_core=self.dla_core,
            cache_dir=self.cache_dir,
            force=force,
        )

    def onnxruntime_precision(self) -> str:
        return "int8" if self.is_qdq else "fp32"
