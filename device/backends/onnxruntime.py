"""ONNX Runtime on the CPU: the backend for hosts without a GPU and for CI.

Same I/O contract as TensorRT. With ``out=`` the outputs are bound to caller-owned arrays
through an ``IOBinding`` (ORT writes straight into them); without it ``session.run`` returns
fresh arrays. docs/BENCHMARKS.md records what the binding buys.

``workers`` > 1 runs that many ``submit``-ted calls at once over ONE session (``Run`` is
thread-safe; each worker thread has its own IOBinding), each with ``threads // workers``
intra-op threads (at least 1): on 2 cores two 1-thread calls in parallel beat one 2-thread
call, whose workers wait at every operator barrier while decode or preprocess hold a core
(docs/BENCHMARKS.md). One session means one copy of the weights.

Batch: a graph from ``jetyolo export --batch N`` has a symbolic dim 0 ("batch"); ``max_batch``
(the manifest's N) pins it, so ``input_spec.shape[0]`` is N and the backend is
``dynamic_batch``: a feed of k <= N rows runs as k rows (ONNX Runtime sizes every op by the
feed), its results bound into ``out[name][:k]``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from device.backends.base import Backend, InferTiming, TensorSpec, feed_batch
from device.choice import threads_per_call
from device.errors import JetyoloError

LOG = logging.getLogger(__name__)

ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def _spec(
    node: Any, pinned: Optional[Tuple[int, ...]] = None, batch: Optional[int] = None
) -> TensorSpec:
    shape = tuple(node.shape)
    if batch is not None and shape and not isinstance(shape[0], int):
        shape = (batch, *shape[1:])  # the symbolic batch dim of a --batch N export
    if pinned is not None and len(pinned) == len(shape) and all(
        not isinstance(dim, int) or dim == want for dim, want in zip(shape, pinned)
    ):
        shape = tuple(pinned)  # dynamic dims fixed by the caller (the frame-input variant)
    if not all(isinstance(dim, int) and dim > 0 for dim in shape):
        raise JetyoloError(
            f"ONNX tensor {node.name!r} has dynamic shape {list(shape)}; jetyolo bundles are "
            "exported with static shapes (`jetyolo export` without --dynamic)"
        )
    if node.type not in ORT_DTYPES:
        raise JetyoloError(f"ONNX tensor {node.name!r} has unsupported type {node.type}")
    return TensorSpec(node.name, shape, np.dtype(ORT_DTYPES[node.type]))


class OnnxRuntimeBackend(Backend):
    """CPU inference with ``onnxruntime.InferenceSession``."""

    kind = "onnxruntime"
    # IOBinding.bind_cpu_input (and run) wrap a C-contiguous numpy array of the input's dtype
    # without a copy: a change to the array after binding shows in the outputs (onnxruntime
    # 1.32.0, checked in tests/device/test_ort_session_facts.py).
    reads_host_arrays = True

    def __init__(
        self,
        model_path: Union[str, Path],
        threads: Optional[int] = None,
        io_binding: bool = True,
        spin: bool = False,
        workers: int = 1,
        input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
        max_batch: Optional[int] = None,
        qdq_in_float: bool = False,
    ) -> None:
        super().__init__(f"onnxruntime:{Path(model_path).name}")
        if workers < 1:
            raise JetyoloError(f"onnxruntime: workers must be at least 1, got {workers}")
        self.model_path = Path(model_path)
        self.threads = threads  # None: ONNX Runtime's default (one per core)
        self.io_binding = io_binding
        self.spin = spin
        self.workers = workers
        self.concurrency = workers
        self.qdq_in_float = qdq_in_float
        self.input_shapes = dict(input_shapes or {})  # name -> shape pinning dynamic dims
        self.max_batch = max_batch  # the manifest's N: pins a symbolic batch dim
        self._session: Any = None
        self._bindings = threading.local()  # one IOBinding per calling thread
        self._pool: Optional[ThreadPoolExecutor] = None

    def intra_op_threads(self) -> Optional[int]:
        """Threads per call: ``threads`` shared among the workers (None: ORT's default)."""
        return threads_per_call(self.threads, self.workers)

    def activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise JetyoloError(
                f"onnxruntime is not installed ({exc}); `pip install onnxruntime` "
                "(or `pip install jetyolo[device]`)"
            ) from exc
        if not self.model_path.is_file():
            raise JetyoloError(f"model {self.model_path} does not exist; check the bundle")
        options = ort.SessionOptions()
        if self.intra_op_threads() is not None:
            options.intra_op_num_threads = self.intra_op_threads()
        options.inter_op_num_threads = 1
        if self.qdq_in_float:
            # Q/DQ pairs run as they are (exact int8 rounding and clipping), the ops between them
            # in float. ORT's fused int8 kernels use VPMADDUBSW on x86 CPUs without VNNI, whose
            # int16 sums saturate (onnxruntime docs, quantization, "When and why do I need to try
            # U8U8?"); TensorRT's int8 does not. Measured on an AVX2-only VM: the INT8 cache
            # simulation lost 4.7 mAP50-95 points fused, and passed the 1-point gate unfused.
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        if not self.spin:
            # Spinning workers burn the cores that decode and preprocess need in the pipeline
            # (docs/BENCHMARKS.md: 2-3x the FPS on 2 cores with spinning off).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.max_batch is not None and self.max_batch > 1:
            # A batch-N graph's planned buffers are sized for N rows per call in flight: off,
            # one process with 4 cameras peaked 10-25 MiB lower, FPS within run-to-run noise
            # (batch 1: 8 MiB less but 1-4 % slower, so it stays on; docs/BENCHMARKS.md).
            options.enable_mem_pattern = False
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise JetyoloError(f"ONNX Runtime cannot load {self.model_path}: {exc}") from exc
        self._bindings = threading.local()
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="jetyolo-ort")

    def input_specs_impl(self) -> Dict[str, TensorSpec]:
        nodes = self._session.get_inputs()
        self.dynamic_batch = self.max_batch is not None and any(
            node.shape and not isinstance(node.shape[0], int) for node in nodes)
        batch = self.max_batch if self.dynamic_batch else None
        return {node.name: _spec(node, self.input_shapes.get(node.name), batch)
                for node in nodes}

    def output_specs_impl(self) -> Dict[str, TensorSpec]:
        batch = self.max_batch if self.dynamic_batch else None
        return {node.name: _spec(node, batch=batch) for node in self._session.get_outputs()}

    def infer_impl(
        self, feed: Mapping[str, np.ndarray], out: Optional[Dict[str, np.ndarray]]
    ) -> Dict[str, np.ndarray]:
        if out is None or not self.io_binding:
            results = self._session.run(None, dict(feed))
            arrays = dict(zip(self.outputs, results))
            if out is None:
                return arrays
            for name, array in arrays.items():
                out[name][: len(array)] = array  # k rows of a partial batch
            return out
        bound = out
        if self.dynamic_batch:  # a partial batch writes the first k rows of each output
            rows = feed_batch(feed)
            bound = {name: array[:rows] for name, array in out.items()}
        binding = getattr(self._bindings, "binding", None)
        if binding is None:
            binding = self._bindings.binding = self._session.io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        for name, array in bound.items():
            binding.bind_output(
                name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data
            )
        self._session.run_with_iobinding(binding)
        return out

    def submit(
        self, feed: Mapping[str, np.ndarray], out: Dict[str, np.ndarray]
    ) -> Future[InferTiming]:
        if self._pool is None:
            return super().submit(feed, out)
        self._require_active("submit()")
        return self._pool.submit(self.timed_infer, feed, out)

    def deactivate_impl(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # calls in flight finish before the session goes
            self._pool = None
        self._bindings = threading.local()
        self._session = None
