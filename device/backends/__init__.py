"""Inference backends behind one interface (``device.backends.base.Backend``).

``open_backend`` picks one. ``tensorrt`` lives in ``device.backends.tensorrt`` and is imported
only when asked for (or tried by ``auto``), so hosts without TensorRT never touch it. That module
provides ``open_tensorrt(bundle, precision=..., variant=..., engine_cache_dir=..., int8_from=...)
-> Backend``, which loads the cached engine or builds it, and raises ``JetyoloError`` when it
cannot.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from device.backends.base import Backend, TensorSpec
from device.choice import PRECISIONS
from device.errors import JetyoloError
from device.preprocess import FRAME_INPUT

if TYPE_CHECKING:  # the pipeline imports Backend from here without loading bundle code
    from device.bundle import Bundle

LOG = logging.getLogger(__name__)

BACKEND_KINDS = ("auto", "tensorrt", "onnxruntime")
CPU_DEFAULT_VARIANT = "uint8"
FrameSizeProbe = Callable[[], Optional[Tuple[int, int]]]  # the source's (w, h), if known
TENSORRT_PACKAGE_HINT = (
    "install JetPack's TensorRT Python bindings (`sudo apt install python3-libnvinfer`) and "
    "pycuda, and use a venv made with --system-site-packages; `jetyolo doctor` lists what is "
    "missing"
)

__all__ = ["BACKEND_KINDS", "PRECISIONS", "Backend", "TensorSpec", "open_backend"]


def tensorrt_missing() -> Optional[str]:
    """Why TensorRT cannot be used here, or None when its Python modules are importable."""
    for module in ("tensorrt", "pycuda"):
        if importlib.util.find_spec(module) is None:
            return f"Python module {module!r} is not installed"
    return None


def _open_tensorrt(
    bundle: Bundle,
    precision: Optional[str],
    variant: Optional[str],
    engine_cache_dir: Optional[Path],
    int8_from: Optional[str],
) -> Backend:
    try:
        module = importlib.import_module("device.backends.tensorrt")
    except ImportError as exc:
        raise JetyoloError(
            f"TensorRT backend cannot load ({exc}); {TENSORRT_PACKAGE_HINT}"
        ) from exc
    backend: Backend = module.open_tensorrt(
        bundle,
        precision=precision,
        variant=variant,
        engine_cache_dir=engine_cache_dir,
        int8_from=int8_from,
    )
    return backend


def _onnxruntime_variant(bundle: Bundle, precision: Optional[str], variant: Optional[str]) -> str:
    if variant is not None:
        outputs = bundle.variant(variant).get("outputs", {})  # names the variants it does have
        if "num_dets" in outputs:
            raise JetyoloError(
                f"variant {variant!r} ends in the EfficientNMS_TRT plugin, which ONNX Runtime "
                "cannot run; use it with --backend tensorrt, or pick fp32/uint8 for the CPU"
            )
        return variant
    if precision not in (None, "fp32"):
        LOG.warning(
            "backend: --precision %s applies to TensorRT engines; ONNX Runtime runs the "
            "bundle's fp32 model (pick another graph with --variant)", precision
        )
    # The uint8 graph computes what fp32 does (export checks: max abs 0) and leaves the cast,
    # transpose and scale to ONNX Runtime: pre+post CPU 0.46-0.49x ultralytics' vs 0.70x
    # (docs/BENCHMARKS.md). The CPU default when the bundle has it.
    return CPU_DEFAULT_VARIANT if CPU_DEFAULT_VARIANT in bundle.manifest["variants"] else "fp32"


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
    """The backend for ``kind`` (not yet activated). ``auto`` prefers TensorRT and says why not.

    ``precision`` None means fp16 on TensorRT and the fp32 graph on ONNX Runtime; ``variant``
    names a bundle graph (``fp32``, ``uint8``, ``nms``, ``int8-qdq``, ``frame``); the
    ``frame`` variant takes the camera frame itself and needs ``frame_size()``, the source's
    (w, h); it is asked only for that variant.
    """
    if kind not in BACKEND_KINDS:
        raise JetyoloError(f"backend {kind!r} is not one of {', '.join(BACKEND_KINDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise JetyoloError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    frame_shape = _frame_input_shape(bundle, variant, frame_size)
    if frame_shape is not None and kind != "onnxruntime":
        raise JetyoloError(
            "variant 'frame' (letterbox in the graph) runs on ONNX Runtime only so far: its "
            "TensorRT engine needs an optimisation profile pinned to the frame size, which the "
            "engine builder does not add yet; use --backend onnxruntime or another variant"
        )
    if kind == "tensorrt":
        missing = tensorrt_missing()
        if missing:
            raise JetyoloError(f"--backend tensorrt: {missing}; {TENSORRT_PACKAGE_HINT}")
        backend = _open_tensorrt(bundle, precision, variant, engine_cache_dir, int8_from)
        LOG.info("backend: tensorrt (%s)", backend.name)
        return backend
    reason = "asked for" if kind == "onnxruntime" else None
    if kind == "auto":
        found, reason = _try_tensorrt(bundle, precision, variant, engine_cache_dir, int8_from)
        if found is not None:
            LOG.info("backend: tensorrt (auto: %s)", found.name)
            return found
    from device.backends.onnxruntime import OnnxRuntimeBackend

    chosen = _onnxruntime_variant(bundle, precision, variant)
    LOG.info("backend: onnxruntime on the CPU, variant %s (%s)", chosen,
             reason if kind == "onnxruntime" else f"auto: {reason}")
    workers = infer_workers or auto_infer_workers(threads)
    return OnnxRuntimeBackend(
        bundle.model_path(chosen), threads=threads, workers=workers,
        input_shapes={FRAME_INPUT: frame_shape} if frame_shape is not None else None,
    )


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


AUTO_WORKERS = 1  # what infer_workers defaults to; docs/BENCHMARKS.md has the measurements


def auto_infer_workers(threads: Optional[int]) -> int:
    """ONNX Runtime workers when the config names none: with ``threads`` set, 1 (the thread
    count was chosen for one call); else ``AUTO_WORKERS``."""
    return 1 if threads is not None else AUTO_WORKERS


def _try_tensorrt(
    bundle: Bundle,
    precision: Optional[str],
    variant: Optional[str],
    engine_cache_dir: Optional[Path],
    int8_from: Optional[str],
) -> Tuple[Optional[Backend], str]:
    missing = tensorrt_missing()
    if missing:
        return None, f"TensorRT unavailable: {missing}"
    try:
        return _open_tensorrt(bundle, precision, variant, engine_cache_dir, int8_from), ""
    except JetyoloError as exc:
        return None, f"TensorRT engine could not be built or loaded: {exc}"
