"""Which backend runs which bundle graph at which precision: decided once, here.

``BackendChoice`` holds what the config (or a verb's flags) asks for; ``jetyolo run``, ``build``,
``verify``, ``update`` and the bench all turn it into a backend or an engine build through its
methods, so a name means the same thing everywhere. The precision left unset (None) is decided by
``device.build_plan.default_precision`` once TensorRT's version is known.

The one remapping: the ``int8-qdq`` variant is the bundle's Q/DQ model. ONNX Runtime runs that
graph as stored; TensorRT builds an INT8 engine from it (precision int8, INT8 from qdq).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Tuple

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
MAX_AUTO_WORKERS = 2  # measured on 2 cores only (docs/BENCHMARKS.md); more cores: measure first


@dataclass(frozen=True)
class OrtThreading:
    """How ONNX Runtime runs the model: ``workers`` calls at once over one session (consecutive
    frames, order kept), each with ``threads_per_call`` intra-op threads (None: ORT's own
    default, one per core), workers spinning or not between operators."""

    workers: int
    threads_per_call: Optional[int]
    spin: bool = False

    def describe(self) -> str:
        threads = "ORT's default" if self.threads_per_call is None else self.threads_per_call
        return (f"{self.workers} inference worker(s) x {threads} thread(s), spinning "
                f"{'on' if self.spin else 'off'}")


def threads_per_call(threads: Optional[int], workers: int,
                     cores: Optional[int] = None) -> Optional[int]:
    """Intra-op threads of each of ``workers`` calls: ``threads`` (default: the cores) shared
    among them, at least one each; one worker with ``threads`` unset keeps ORT's default."""
    if workers == 1:
        return threads
    return max(1, (threads or cores or os.cpu_count() or 1) // workers)


def ort_threading(threads: Optional[int], infer_workers: Optional[int],
                  cores: Optional[int] = None) -> OrtThreading:
    """The ``threads``/``infer_workers`` auto rule (docs/runtime.md, Backends), measured on this
    project's 2-core workstation only (docs/BENCHMARKS.md, "Doing less work per frame"):

    - neither set: one worker per core, at most ``MAX_AUTO_WORKERS`` (2), the cores shared among
      them: on 2 cores two 1-thread calls at once, 1.12x the FPS of one 2-thread call at 320 px
      (a 2-thread call's threads wait at each operator barrier while decode or preprocess hold a
      core). On 2 cores busy with other work (load 7-8) it measured 0.82x: ``infer_workers: 1``
      on a shared host. 6-12 core Orins get 2 workers of cores // 2 threads: not measured (no
      such machine here); ``infer_workers`` and ``threads`` set it by hand.
    - ``threads`` set alone: one worker with that many threads (the count was chosen for one
      call, as the bench's ``--threads`` is).
    - ``infer_workers`` set: that many, ``threads`` (default: the cores) shared among them.
    - spinning always off: spinning workers starve capture and preprocess (2.1-3.0x the FPS
      with spinning off on 2 busy cores).
    """
    if infer_workers is not None:
        workers = infer_workers
    elif threads is not None:
        workers = 1
    else:
        workers = max(1, min(cores or os.cpu_count() or 1, MAX_AUTO_WORKERS))
    return OrtThreading(workers, threads_per_call(threads, workers, cores))


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

    def build_request(
        self, force: bool = False, frame_size: Optional[Tuple[int, int]] = None
    ) -> BuildRequest:
        """The TensorRT engine this choice names (``device.engine.ensure_engine``);
        ``frame_size`` (w, h): the camera frame the frame variant's profile is pinned to."""
        from device.engine import BuildRequest

        return BuildRequest(
            precision="int8" if self.is_qdq else self.precision,
            int8_from=self.int8_source,
            variant="fp32" if self.is_qdq or self.variant is None else self.variant,
            workspace_bytes=None if self.workspace_mib is None else self.workspace_mib * MIB,
            dla_core=self.dla_core,
            cache_dir=self.cache_dir,
            force=force,
            frame_size=frame_size,
        )

    def onnxruntime_threading(self, cores: Optional[int] = None) -> OrtThreading:
        return ort_threading(self.threads, self.infer_workers, cores)

    def onnxruntime_precision(self, float_dtype: Optional[str] = None) -> str:
        """The arithmetic ONNX Runtime runs: a Q/DQ model's int8, a float16 variant's fp16
        (its manifest's ``float_dtype``), else fp32."""
        if self.is_qdq:
            return "int8"
        return "fp16" if float_dtype == "float16" else "fp32"
