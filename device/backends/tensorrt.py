"""TensorRT runtime backend: runs a serialized plan (the runner half, as polygraphy's
trt/runner.py); ``open_tensorrt`` gets the plan from the engine cache, built first when needed
(``device.engine.ensure_engine`` with ``device.backends.tensorrt_build``).

``Runtime.deserialize_cuda_engine`` -> one execution context, device buffers bound once with
``set_tensor_address``, page-locked host buffers, one stream, ``execute_async_v3`` between async
H2D and D2H copies.

An input with runtime dims (-1 in ``engine.get_tensor_shape``) has optimisation profile 0
(``device.backends.tensorrt_build``): buffers are sized for its max shape
(``get_tensor_profile_shape(name, 0)``), and ``set_input_shape(name, shape)`` tells the context
the shape of each call. ``set_input_shape`` is in every supported version (TensorRT 8.5.2
pyCore.cpp binds it next to ``set_binding_shape``, which it deprecates; 10.0 removed
``set_binding_shape``), so the runner uses it everywhere. A profile whose dim 0 spans 1..N
(``export --batch N``) makes the backend ``dynamic_batch``: a call of k rows sets the shape
(only when k changes), copies k rows in and k rows of each output out; a profile with
min = max (the frame variant, pinned to the camera's size) is set once at load.

CUDA graphs are not used: pycuda documents no stream-capture API, and capturing through a second
binding (cuda-python) would mean two CUDA wrappers on the device for a gain that is the kernel
launch overhead only. Measure it first with ``trtexec --loadEngine=X.plan --useCudaGraph`` against
the same command without the flag (docs/tensorrt.md); add capture if it pays on a Jetson.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

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
        self._rows = 0  # dim 0 the context was last told (set_input_shape)
        self._output_rows: Dict[str, int] = {}  # each output's dim 0 at that input shape
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
        names = [self._engine.get_tensor_name(index)
                 for index in range(self._engine.num_io_tensors)]
        self._inputs = [name for name in names
                        if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        for name in self._inputs:
            self._specs[name] = self._input_spec(name)
        self._set_rows(self._specs[self._inputs[0]].shape[0] if self._inputs else 1)
        for name in names:
            if name not in self._specs:
                self._specs[name] = self._output_spec(name)
            spec = self._specs[name]
            nbytes = max(int(np.prod(spec.shape)) * spec.dtype.itemsize, 1)
            self._device_buffers[name] = cuda.mem_alloc(nbytes)
            self._context.set_tensor_address(name, int(self._device_buffers[name]))
        for name, spec in self._specs.items():
            self._staging[name] = self.allocate_impl(spec)

    def _input_spec(self, name: str) -> TensorSpec:
        """Static shape, or profile 0's max for runtime dims; ``dynamic_batch`` when only dim 0
        varies and it spans more than one row."""
        dtype = numpy_dtype(self._engine.get_tensor_dtype(name), name)
        shape = tuple(int(dim) for dim in self._engine.get_tensor_shape(name))
        if all(dim >= 0 for dim in shape):
            return TensorSpec(name, shape, dtype)
        low, _, high = (tuple(int(dim) for dim in limits)
                        for limits in self._engine.get_tensor_profile_shape(name, 0))
        if low[1:] != high[1:]:
            raise JetyoloError(
                f"engine input {name!r} has a profile varying beyond dim 0 ({list(low)} .. "
                f"{list(high)}); jetyolo runs profiles of 1..N frames or one frame size"
            )
        self.dynamic_batch = self.dynamic_batch or low[0] < high[0]
        return TensorSpec(name, high, dtype)

    def _output_spec(self, name: str) -> TensorSpec:
        """The output's shape at the inputs' max shape (set by ``_set_rows``)."""
        shape = tuple(int(dim) for dim in self._context.get_tensor_shape(name))
        if any(dim < 0 for dim in shape):
            raise JetyoloError(
                f"engine output {name!r} has shape {list(shape)} that depends on the data; "
                "jetyolo reads outputs of a fixed size (re-export the bundle)"
            )
        return TensorSpec(name, shape, numpy_dtype(self._engine.get_tensor_dtype(name), name))

    def _set_rows(self, rows: int) -> None:
        """Tell the context this call's input shapes (inputs with runtime dims only)."""
        for name in self._inputs:
            if all(int(dim) >= 0 for dim in self._engine.get_tensor_shape(name)):
                continue
            shape = (rows, *self._specs[name].shape[1:])
            if not self._context.set_input_shape(name, shape):
                raise JetyoloError(
                    f"TensorRT refuses input shape {list(shape)} for {name!r} of "
                    f"{self.plan_path.name} (outside its optimisation profile); see its log"
                )
        self._rows = rows
        outputs = [self._engine.get_tensor_name(index)
                   for index in range(self._engine.num_io_tensors)]
        self._output_rows = {
            name: int(self._context.get_tensor_shape(name)[0]) for name in outputs
            if name not in self._inputs and len(self._context.get_tensor_shape(name))}

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
        rows = int(feed[self._inputs[0]].shape[0]) if self._inputs else self._rows
        if rows != self._rows:  # a partial batch (dynamic_batch): k of the profile's 1..N
            self._set_rows(rows)
        for name in self._inputs:
            source = self._pinned_or_staging(name, feed[name])[:rows]
            if source.ctypes.data != feed[name].ctypes.data:
                np.copyto(source, feed[name])
            cuda.memcpy_htod_async(self._device_buffers[name], source, stream)
        if not self._context.execute_async_v3(stream.handle):
            raise JetyoloError(f"TensorRT execution of {self.plan_path.name} failed; see its log")
        targets = {name: self._staging[name] for name in self.output_specs_impl()}
        if out is not None:
            targets = {name: out[name] for name in targets}
        filled = {name: array[: self._output_rows.get(name, len(array))]
                  for name, array in targets.items()}
        pinned = {name: self._pinned_or_staging(name, array)[: len(filled[name])]
                  for name, array in targets.items()}
        for name, target in pinned.items():
            cuda.memcpy_dtoh_async(target, self._device_buffers[name], stream)
        stream.synchronize()
        for name, target in filled.items():
            if pinned[name].ctypes.data != target.ctypes.data:
                np.copyto(target, pinned[name])
        return targets if out is not None else filled

    def deactivate_impl(self) -> None:
        for buffer in self._device_buffers.values():
            buffer.free()
        self._device_buffers, self._staging, self._pinned = {}, {}, {}
        self._specs, self._inputs, self._output_rows, self._rows = {}, [], {}, 0
        self.dynamic_batch = False
        self._context = self._engine = self._runtime = self._stream = None
        if self._context_stack is not None:
            self._context_stack.pop()
            self._context_stack.detach()
            self._context_stack = None


def open_tensorrt(
    bundle: Any, choice: BackendChoice, log: Callable[[str], None] = LOG.info,
    frame_size: Optional[Tuple[int, int]] = None,
) -> Backend:
    """The TensorRT backend for ``bundle``: the cached engine, built first when needed
    (``frame_size`` (w, h): the camera frame of the frame variant, part of its engine's key)."""
    from device.backends.tensorrt_build import TensorRTBuildOps

    request = choice.build_request(frame_size=frame_size)
    result = ensure_engine(bundle, request, TensorRTBuildOps(), log)
    return TensorRTBackend(result.plan, precision=result.key.precision)
