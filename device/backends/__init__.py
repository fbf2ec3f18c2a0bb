"""Inference backends behind one interface (``device.backends.base.Backend``).

``open_chosen`` opens the backend a ``device.choice.BackendChoice`` names (``open_backend`` is
the same for callers holding the settings one by one). ``tensorrt`` lives in
``device.backends.tensorrt`` and is imported only when asked for (or tried by ``auto``), so
hosts without TensorRT never touch it; its ``open_tensorrt(bundle, choice)`` loads the cached
engine or builds it, and raises ``JetyoloError`` when it cannot. Every backend says what
arithmetic it runs in ``Backend.precision``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from device.backends.base import Backend, TensorSpec
from device.choice import BACKEND_KINDS, PRECISIONS, BackendChoice
from device.errors import JetyoloError
from device.preprocess import FRAME_INPUT

if TYPE_CHECKING:  # the pipeline imports Backend from here without loading bundle code
    from device.bundle import Bundle

LOG = logging.getLogger(__name__)

CPU_DEFAULT_VARIANT = "uint8"
FrameSizeProbe = Callable[[], Optional[Tuple[int, int]]]  # the source's (w, h), if known
TENSORRT_PACKAGE_HINT = (
    "install JetPack's TensorRT Python bindings (`sudo apt install python3-libnvinfer`) and "
    "pycuda, and use a venv made with --system-site-packages; `jetyolo doctor` lists what is "
    "missing"
)

__all__ = ["BACKEND_KINDS", "PRECISIONS", "Backend", "TensorSpec", "open_backend", "open_chosen"]


def tensorrt_missing() -> Optional[str]:
    """Why TensorRT cannot be used here, or None when its Python modules are importable."""
    for module in ("tensorrt", "pycuda"):
        if importlib.util.find_spec(module) is None:
            return f"Python module {module!r} is not installed"
    return None


def _open_tensorrt(
    bundle: Bundle, choice: BackendChoice, frame_size: Optional[Tuple[int, int]] = None
) -> Backend:
    try:
        module = importlib.import_module("device.backends.tensorrt")
    except ImportError as exc:
        raise JetyoloError(
            f"TensorRT backend cannot load ({exc}); {TENSORRT_PACKAGE_HINT}"
        ) from exc
    backend: Backend = module.open_tensorrt(bundle, choice, frame_size=frame_size)
    return backend


def _onnxruntime_variant(bundle: Bundle, choice: BackendChoice) -> str:
    if choice.variant is not None:
        outputs = bundle.variant(choice.variant).get("outputs", {})  # names the bundle's variants
        if "num_dets" in outputs:
            raise JetyoloError(
                f"variant {choice.variant!r} ends in the EfficientNMS_TRT plugin, which ONNX "
                "Runtime cannot run; use it with --backend tensorrt, or pick fp32/uint8 for the CPU"
            )
        return choice.variant
    if choice.precision not in (None, "fp32"):
        LOG.warning(
            "backend: --precision %s applies to TensorRT engines; ONNX Runtime runs the "
            "bundle's fp32 model (pick another graph with --variant)", choice.precision
        )
    # The uint8 graph computes what fp32 does (export checks: max abs 0) and leaves the cast,
    # transpose and scale to ONNX Runtime: pre+post CPU 0.46-0.49x ultralytics' vs 0.70x
    # (docs/BENCHMARKS.md). The CPU default when the bundle has it.
    return CPU_DEFAULT_VARIANT if CPU_DEFAULT_VARIANT in bundle.manifest["variants"] else "fp32"


def open_chosen(
    choice: BackendChoice, bundle: Bundle, frame_size: Optional[FrameSizeProbe] = None
) -> Backend:
    """The backend ``choice`` names (not yet activated). ``auto`` prefers TensorRT and says why
    not. The ``frame`` variant takes the camera frame itself and needs ``frame_size()``, the
    source's (w, h); it is asked only for that variant. Under TensorRT that size pins the
    engine's optimisation profile and is part of its key (another camera size, another plan)."""
    frame_shape = _frame_input_shape(bundle, choice.variant, frame_size)
    frame_wh = (frame_shape[2], frame_shape[1]) if frame_shape is not None else None
    if choice.kind == "tensorrt":
        missing = tensorrt_missing()
        if missing:
            raise JetyoloError(f"--backend tensorrt: {missing}; {TENSORRT_PACKAGE_HINT}")
        backend = _open_tensorrt(bundle, choice, frame_wh)
        LOG.info("backend: tensorrt (%s)", backend.name)
        return backend
    reason = "asked for"
    if choice.kind == "auto":
        found, reason = _try_tensorrt(bundle, choice, frame_wh)
        if found is not None:
            LOG.info("backend: tensorrt (auto: %s)", found.name)
            return found
    from device.backends.onnxruntime import OnnxRuntimeBackend

    chosen = _onnxruntime_variant(bundle, choice)
    LOG.info("backend: onnxruntime on the CPU, variant %s (%s)", chosen,
             reason if choice.kind == "onnxruntime" else f"auto: {reason}")
    threading_plan = choice.onnxruntime_threading()
    LOG.info("backend: onnxruntime runs %s", threading_plan.describe())
    backend = OnnxRuntimeBackend(
        bundle.model_path(chosen), threads=choice.threads, workers=threading_plan.workers,
        spin=threading_plan.spin,
        input_shapes={FRAME_INPUT: frame_shape} if frame_shape is not None else None,
        max_batch=bundle.max_batch(chosen),
    )
    backend.precision = choice.onnxruntime_precision(bundle.variant(chosen).get("float_dtype"))
    return backend


def open_backend(
    kind: str,
    bundle: Bundle,
    precision: Optional[str] = None,
    variant: Optional[str] = None,
    threads: Optional[int] = None,
    engine_cache_dir: Optional[Path] = None,
    int8_from: Optional[str] = None,
    infer_workers: Optional[int] = None,
    frame_size: Optional[FrameSizeProbe] = None,
) -> Backend:
    """``open_chosen`` for callers holding the settings one by one."""
    choice = BackendChoice(kind, variant, precision, int8_from, engine_cache_dir, threads,
                           infer_workers=infer_workers)
    return open_chosen(choice, bundle, frame_size)


def _frame_input_shape(
    bundle: Bundle, variant: Optional[str], probe: Optional[FrameSizeProbe]
) -> Optional[Tuple[int, int, int, int]]:
    """The [1, h, w, 3] input of the frame-input variant, or None for the other variants."""
    if variant is None or bundle.variant(variant).get("input", {}).get("name") != FRAME_INPUT:
        return None
    frame_size = probe() if probe is not None else None
    if frame_size is None:
        raise JetyoloError(
            f"variant {variant!r} takes the camera frame itself, and the source's frame size is "
            "not known before reading it; set capture_width/capture_height or use another variant"
        )
    return (1, frame_size[1], frame_size[0], 3)


def _try_tensorrt(
    bundle: Bundle, choice: BackendChoice, frame_size: Optional[Tuple[int, int]]
) -> Tuple[Optional[Backend], str]:
    missing = tensorrt_missing()
    if missing:
        return None, f"TensorRT unavailable: {missing}"
    try:
        return _open_tensorrt(bundle, choice, frame_size), ""
    except JetyoloError as exc:
        return None, f"TensorRT engine could not be built or loaded: {exc}"
