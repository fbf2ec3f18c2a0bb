"""TensorRT runtime backend: runs a serialized plan (the runner half, as polygraphy's
trt/runner.py); ``open_tensorrt`` gets the plan from the engine cache, built first when needed
(``device.engine.ensure_engine`` with ``device.backends.tensorrt_build``).

``Runtime.deserialize_cuda_engine`` -> one execution context, device buffers bound once with
``set_tensor_address``, page-locked host buffers, one stream, ``execute_async_v3`` between async
H2D and D2H copies.

CUDA graphs are not used: pycuda documents no stream-capture API, and capturing through a second
binding (cuda-python) would mean two CUDA wrappers on the device for a gain that is the kernel
launch overhead only. Measure it first with ``trtexec --loadEngine=X.plan --useCudaGraph`` against
the same command without the flag (docs/tensorrt.md); add capture if it pays on a Jetson.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np

from device.backends.base import Backend, TensorSpec
from device.backends.tensorrt_util import cuda_init, import_pycuda, import_tensorrt, trt_logger
from device.choice import BackendChoice
from device.engine import ensure_engine
from device.errors import JetyoloError

LOG = logging.getLogger(__name__)
# TensorRT DataType member name -> numpy dtype. ``trt.nptype`` is not used: TensorRT 8.5.2's
# (JetPack 5.1) builds its table with ``np.bool``, which numpy 1.24 removed, so every call raises
# AttributeError there (NVIDIA/TensorRT#2557, fixed in 8.5.3).
NUMPY_DTYPES = {
    "FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
    "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8,
}


def numpy_dtype(trt_dtype: Any, tensor: str) -> np.dtype:
    """The numpy dtype of a TensorRT ``DataType`` (see NUMPY_DTYPES)."""
    name = str(getattr(trt_dtype, "name", trt_dtype))
    if name not in NUMPY_DTYPES:
        raise JetyoloError(
            f"engine tensor {tensor!r} has TensorRT type {name}, which jetyolo cannot feed or "
            f"read (it handles {', '.join(NUMPY_DTYPES)}); re-export the bundle"
        )
    return np.dtype(NUMPY_DTYPES[name])


class TensorRTBackend(Backend):
    """Runs a serialized plan. Activate, infer and deactivate on one thread (the pipeline's
    inference thread): the CUDA context is pushed there in ``activate`` and popped in
    ``deactivate``."""

    kind = "tensorrt"

    def __init__(self, plan_path: Path, device: int = 0, precision: str = "fp16") -> None:
        super().__init__(f"tensorrt:{Path(plan_path).name}")
        self.precision = precision  # what the plan was built for (its sidecar's key)
        self.plan_path = Path(plan_path)
        self.device = device
        self._cuda: Any = None
        self._context_stack: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._specs: Dict[str, TensorSpec] = {}
        self._inputs: List[str] = []
        self._device_buffers: Dict[str, Any] = {}
        self._pinned: Dict[int, np.ndarray] = {}  # data pointer -> page-locked array we made
        self._staging: Dict[str, np.ndarray] = {}

    def activate_impl(self) -> None:
        trt = import_tensorrt()
        self._cuda = cuda = import_pycuda()
        if not self.plan_path.is_file():
            raise JetyoloError(f"engine {self.plan_path} does not exist; run `jetyolo build`")
        device = cuda_init(cuda, self.device)
        self._context_stack = device.retain_primary_context()
        self._context_stack.push()
        try:
            self._load(trt, cuda)
        except BaseException as exc:
            self.deactivate_impl()
            if isinstance(exc, (OSError, cuda.Error)):  # unreadable plan, no GPU memory left
                raise JetyoloError(
                    f"TensorRT engine {self.plan_path} cannot be loaded ({exc}); check that this "
                    "user may read it and that other processes leave GPU memory free"
                ) from exc
            raise

    def _load(self, trt: Any, cuda: Any) -> None:
        self._runtime = trt.Runtime(trt_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            raise JetyoloError(
                f"TensorRT cannot load {self.plan_path} (built by another TensorRT version or "
                "GPU, or damaged); rebuild it with `jetyolo build BUNDLE --force`"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:  # TensorRT returns None when it cannot allocate its memory
            raise JetyoloError(
                f"TensorRT cannot create an execution context for {self.plan_path.name} (see "
                "its log above; usually too little free GPU memory): stop other GPU processes"
            )
        self._stream = cuda.Stream()
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            spec = self._tensor_spec(trt, name)
            self._specs[name] = spec
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs.append(name)
            nbytes = max(int(np.prod(spec.shape)) * spec.dtype.itemsize, 1)
            self._device_buffers[name] = cuda.mem_alloc(nbytes)
            self._context.set_tensor_address(name, int(self._device_buffers[name]))
        for name, spec in self._specs.items():
            self._staging[name] = self.allocate_impl(spec)

    def _tensor_spec(self, trt: Any, name: str) -> TensorSpec:
        shape = tuple(int(dim) for dim in self._engine.get_tensor_shape(name))
        if any(dim < 0 for dim in shape):
            raise JetyoloError(
                f"engine tensor {name!r} has dynamic shape {list(shape)}; jetyolo bundles are "
                "static (`jetyolo export` without --dynamic)"
            )
        return TensorSpec(name, shape, numpy_dtype(self._engine.get_tensor_dtype(name), name))

    def input_specs_impl(self) -> Dict[str, TensorSpec]:
        return {name: self._specs[name] for name in self._inputs}

    def output_specs_impl(self) -> Dict[str, TensorSpec]:
        return {name: spec for name, spec in self._specs.items() if name not in self._inputs}

    def allocate_impl(self, spec: TensorSpec) -> np.ndarray:
        array: np.ndarray = self._cuda.pagelocked_empty(spec.shape, spec.dtype)
        self._pinned[array.ctypes.data] = array
        return array

    def _pinned_or_staging(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array`` when it is page-locked memory we allocated, else the staging buffer (async
        copies need page-locked memory; feeds from ``allocate_inputs`` never need staging)."""
        return array if array.ctypes.data in self._pinned else self._staging[name]

    def infer_impl(
        self, feed: Mapping[str, np.ndarray], out: Optional[Dict[str, np.ndarray]]
    ) -> Dict[str, np.ndarray]:
        cuda, stream = self._cuda, self._stream
        for name in self._inputs:
            source = self._pinned_or_staging(name, feed[name])
            if source is not feed[name]:
                np.copyto(source, feed[name])
            cuda.memcpy_htod_async(self._device_buffers[name], source, stream)
        if not self._context.execute_async_v3(stream.handle):
            raise JetyoloError(f"TensorRT execution of {self.plan_path.name} failed; see its log")
        targets = {name: self._staging[name] for name in self.output_specs_impl()}
        if out is not None:
            targets = {name: out[name] for name in targets}
        pinned_targets = {name: self._pinned_or_staging(name, array)
                          for name, array in targets.items()}
        for name, target in pinned_targets.items():
            cuda.memcpy_dtoh_async(target, self._device_buffers[name], stream)
        stream.synchronize()
        for name, target in targets.items():
            if pinned_targets[name] is not target:
                np.copyto(target, pinned_targets[name])
        return targets

    def deactivate_impl(self) -> None:
        for buffer in self._device_buffers.values():
            buffer.free()
        self._device_buffers, self._staging, self._pinned = {}, {}, {}
        self._specs, self._inputs = {}, []
        self._context = self._engine = self._runtime = self._stream = None
        if self._context_stack is not None:
            self._context_stack.pop()
            self._context_stack.detach()
            self._context_stack = None


def open_tensorrt(
    bundle: Any, choice: BackendChoice, log: Callable[[str], None] = LOG.info
) -> Backend:
    """The TensorRT backend for ``bundle``: the cached engine, built first when needed."""
    from device.backends.tensorrt_build import TensorRTBuildOps

    result = ensure_engine(bundle, choice.build_request(), TensorRTBuildOps(), log)
    return TensorRTBackend(result.plan, precision=result.key.precision)
