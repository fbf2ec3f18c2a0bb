"""TensorRT and pycuda imports, the process's TensorRT logger and CUDA start-up, shared by the
engine builder (``tensorrt_build``) and the runner (``tensorrt``). TensorRT and pycuda come from
JetPack (apt ``python3-libnvinfer``; pycuda built on the device) and are imported lazily, so
these modules import on any machine."""

from __future__ import annotations

from typing import Any

from device.errors import JetyoloError

TENSORRT_HINT = (
    "TensorRT's Python bindings come with JetPack: `sudo apt install python3-libnvinfer` "
    "(part of `nvidia-jetpack`), used from a venv made with "
    "`python3 -m venv --system-site-packages`; `jetyolo doctor` checks the setup"
)
PYCUDA_HINT = (
    "build pycuda on the device: `export PATH=/usr/local/cuda/bin:$PATH "
    "CPATH=/usr/local/cuda/include; pip install pycuda` (needs python3-dev and nvcc from JetPack)"
)
_LOGGER: Any = None


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise JetyoloError(f"TensorRT is not installed ({exc}); {TENSORRT_HINT}") from exc
    return tensorrt


def import_pycuda() -> Any:
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise JetyoloError(f"pycuda is not importable ({exc}); {PYCUDA_HINT}") from exc
    return cuda


def trt_logger(trt: Any) -> Any:
    """One TensorRT logger per process (TensorRT prints its warnings and errors to stderr)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(_LOGGER, "")  # EfficientNMS_TRT for the "nms" variant
    return _LOGGER


def cuda_init(cuda: Any, index: int = 0) -> Any:
    try:
        cuda.init()
        return cuda.Device(index)
    except cuda.Error as exc:
        raise JetyoloError(
            f"CUDA cannot start ({exc}); check the driver and that this user may open the GPU "
            "(groups video and render on a Jetson); run `jetyolo doctor`"
        ) from exc


