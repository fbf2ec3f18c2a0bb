"""One inference interface for every backend (Polygraphy's runner shape).

A backend is constructed cheaply, then::

    with backend:                                    # activate() ... deactivate()
        slots = backend.allocate_inputs(3)           # C-contiguous buffers the Preprocessor fills
        out = backend.allocate_outputs()             # optional: arrays infer() writes into
        result = backend.infer({backend.input_spec.name: slots[0]}, out=out)

Subclasses implement the ``*_impl`` hooks; the base class does the checking, so every backend
refuses ``infer`` before ``activate`` and refuses feeds with a wrong name, shape, dtype or
memory layout, saying which.

Thread contract (CUDA contexts are per thread): the pipeline calls ``activate``,
``allocate_inputs``, ``allocate_outputs``, ``infer``/``submit`` and ``deactivate`` from one
thread, its inference thread (a backend with ``concurrency`` > 1 runs the submitted calls on
threads of its own). Buffers may be *filled* by any thread.

Batch (the contract with ``jetyolo export --batch N``): ``input_spec.shape[0]`` is always the
most frames per call, N (a backend pins a symbolic dim 0 to the manifest's N). A backend with
``dynamic_batch`` True also takes a feed of k in 1..N frames (a leading slice ``buf[:k]`` of an
allocated input buffer) and writes the results into ``out[name][:k]`` (outputs stay allocated
at N); with it False the caller always sends all N rows and ignores the results of unused ones.

Output ownership: without ``out`` the returned arrays belong to the backend and stay valid only
until the next ``infer`` call. With ``out`` (a dict from ``allocate_outputs``) results are written
into those arrays, which the caller owns; the pipeline keeps a small ring of them so
postprocessing of frame k overlaps inference of frame k+1 without copies.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from device.errors import JetyoloError


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: Tuple[int, ...]
    dtype: np.dtype

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} {np.dtype(self.dtype).name}"


@dataclass(frozen=True)
class InferTiming:
    """What one ``submit`` call cost: wall and CPU seconds of the thread that ran it."""

    wall_s: float
    cpu_s: float


class Backend:
    """Base class: checks and lifecycle; subclasses supply the ``*_impl`` hooks.

    ``submit`` is ``infer`` as a future, so a caller can keep ``concurrency`` calls in flight
    (the pipeline does, and restores frame order itself). The base class runs the call at once
    in the caller's thread (``concurrency`` 1); ONNX Runtime with ``workers`` > 1 runs calls on a
    pool of threads over one session.
    """

    kind = "base"  # "onnxruntime", "tensorrt": what logs and summaries call the backend
    concurrency = 1  # calls that may be in flight at once through submit()
    dynamic_batch = False  # feeds of 1..N frames accepted (see the module docstring)
    # True: a call reads the caller's own C-contiguous host array where it is, so a frame can be
    # fed without copying it into an ``allocate_inputs`` buffer (TensorRT copies from its own
    # page-locked buffers).
    reads_host_arrays = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.precision = "fp32"  # the arithmetic it runs; what stats messages report
        self.is_active = False
        self._input_specs: Dict[str, TensorSpec] = {}
        self._output_specs: Dict[str, TensorSpec] = {}
        self._input_buffers: List[np.ndarray] = []

    # ---- hooks --------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        """Load the model / engine, create sessions, contexts, streams."""
        raise NotImplementedError

    def input_specs_impl(self) -> Dict[str, TensorSpec]:
        """Inputs of the active model, by name (static shapes)."""
        raise NotImplementedError

    def output_specs_impl(self) -> Dict[str, TensorSpec]:
        """Outputs of the active model, by name (static shapes)."""
        raise NotImplementedError

    def infer_impl(
        self, feed: Mapping[str, np.ndarray], out: Optional[Dict[str, np.ndarray]]
    ) -> Dict[str, np.ndarray]:
        """Run once. ``feed`` is checked already; write into ``out`` when given."""
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        """Free what ``activate_impl`` acquired."""
        raise NotImplementedError

    def allocate_impl(self, spec: TensorSpec) -> np.ndarray:
        """A C-contiguous host array for ``spec``. TensorRT overrides it with page-locked memory."""
        return np.empty(spec.shape, dtype=spec.dtype)

    # ---- lifecycle ----------------------------------------------------------------------------
    def activate(self) -> Backend:
        if self.is_active:
            return self
        self.activate_impl()
        try:
            self._input_specs = dict(self.input_specs_impl())
            self._output_specs = dict(self.output_specs_impl())
        except BaseException:  # e.g. a dynamic shape: release the session or CUDA context
            self.deactivate_impl()
            raise
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if not self.is_active:
            return
        self._input_buffers = []
        self.is_active = False
        self.deactivate_impl()

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # ---- metadata and buffers -----------------------------------------------------------------
    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise JetyoloError(
                f"backend {self.name!r}: {what} before activate(); use `with backend:` "
                "or call backend.activate() first"
            )

    @property
    def input_specs(self) -> Dict[str, TensorSpec]:
        self._require_active("input_specs")
        return dict(self._input_specs)

    @property
    def input_spec(self) -> TensorSpec:
        """The single input of a detector (jetyolo bundles have exactly one)."""
        specs = self.input_specs
        if len(specs) != 1:
            raise JetyoloError(
                f"backend {self.name!r}: model has {len(specs)} inputs {sorted(specs)}; "
                "jetyolo expects exactly one image input"
            )
        return next(iter(specs.values()))

    @property
    def output_specs(self) -> Dict[str, TensorSpec]:
        self._require_active("output_specs")
        return dict(self._output_specs)

    @property
    def outputs(self) -> List[str]:
        """Output names, in the model's order."""
        return list(self.output_specs)

    def allocate_inputs(self, count: int) -> List[np.ndarray]:
        """``count`` input buffers (C-contiguous, ``allocate_impl`` memory); kept by the backend."""
        spec = self.input_spec
        while len(self._input_buffers) < count:
            self._input_buffers.append(self.allocate_impl(spec))
        return self._input_buffers[:count]

    @property
    def input_buffer(self) -> np.ndarray:
        """The first input buffer: what a Preprocessor writes into when one buffer is enough."""
        return self.allocate_inputs(1)[0]

    def allocate_outputs(self) -> Dict[str, np.ndarray]:
        """One set of output arrays to pass as ``infer(..., out=)``; owned by the caller."""
        return {name: self.allocate_impl(spec) for name, spec in self.output_specs.items()}

    # ---- inference ----------------------------------------------------------------------------
    def infer(
        self, feed: Mapping[str, np.ndarray], out: Optional[Dict[str, np.ndarray]] = None
    ) -> Dict[str, np.ndarray]:
        """Run the model on ``feed`` (input name -> array); returns output name -> array."""
        self._require_active("infer()")
        check_feed(self.name, self._input_specs, feed, self.dynamic_batch)
        if out is not None:
            check_out(self.name, self._output_specs, out)
        return self.infer_impl(feed, out)

    def submit(
        self, feed: Mapping[str, np.ndarray], out: Dict[str, np.ndarray]
    ) -> Future[InferTiming]:
        """``infer(feed, out=out)`` as a future of its timing; ``out`` holds the results once
        the future is done. Here the call runs at once, in the caller's thread."""
        future: Future[InferTiming] = Future()
        try:
            future.set_result(self.timed_infer(feed, out))
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)
        return future

    def timed_infer(
        self, feed: Mapping[str, np.ndarray], out: Dict[str, np.ndarray]
    ) -> InferTiming:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.infer(feed, out=out)
        return InferTiming(time.perf_counter() - wall, time.thread_time() - cpu)


def check_feed(
    backend: str, specs: Mapping[str, TensorSpec], feed: Mapping[str, np.ndarray],
    dynamic_batch: bool = False,
) -> None:
    """Refuse a feed whose names, shapes, dtypes or layout differ from the model's inputs
    (``dynamic_batch``: dim 0 may be any k in 1..N, the same k for every input)."""
    missing = sorted(set(specs) - set(feed))
    extra = sorted(set(feed) - set(specs))
    if missing or extra:
        raise JetyoloError(
            f"backend {backend!r}: feed has inputs {sorted(feed)}, model wants {sorted(specs)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {extra})" if extra else "")
        )
    for name, spec in specs.items():
        _check_array(backend, "input", spec, feed[name], dynamic_batch)
    if dynamic_batch and len({int(feed[name].shape[0]) for name in specs}) > 1:
        raise JetyoloError(f"backend {backend!r}: inputs have different batch sizes "
                           f"{[list(feed[name].shape) for name in specs]}")


def feed_batch(feed: Mapping[str, np.ndarray]) -> int:
    """Frames in a (checked) feed: dim 0 of its inputs."""
    return int(next(iter(feed.values())).shape[0])


def check_out(backend: str, specs: Mapping[str, TensorSpec], out: Mapping[str, np.ndarray]) -> None:
    if set(out) != set(specs):
        raise JetyoloError(
            f"backend {backend!r}: out= has arrays {sorted(out)}, model outputs are "
            f"{sorted(specs)}; use backend.allocate_outputs()"
        )
    for name, spec in specs.items():
        _check_array(backend, "output", spec, out[name])


def _fits(shape: Tuple[int, ...], spec: TensorSpec, dynamic_batch: bool) -> bool:
    if not dynamic_batch or not spec.shape or len(shape) != len(spec.shape):
        return tuple(shape) == tuple(spec.shape)
    return 1 <= shape[0] <= spec.shape[0] and tuple(shape[1:]) == tuple(spec.shape[1:])


def _check_array(
    backend: str, role: str, spec: TensorSpec, array: np.ndarray, dynamic_batch: bool = False
) -> None:
    if not isinstance(array, np.ndarray):
        raise JetyoloError(
            f"backend {backend!r}: {role} {spec.name!r} is a {type(array).__name__}, "
            f"expected a numpy array {spec.describe()}"
        )
    if not _fits(tuple(array.shape), spec, dynamic_batch):
        wants: List[Any] = list(spec.shape)
        if dynamic_batch:
            wants[0] = f"1..{spec.shape[0]}"
        raise JetyoloError(
            f"backend {backend!r}: {role} {spec.name!r} has shape {list(array.shape)}, "
            f"model wants {wants}"
        )
    if array.dtype != spec.dtype:
        raise JetyoloError(
            f"backend {backend!r}: {role} {spec.name!r} has dtype {array.dtype.name}, "
            f"model wants {np.dtype(spec.dtype).name}"
        )
    if not array.flags.c_contiguous:
        raise JetyoloError(
            f"backend {backend!r}: {role} {spec.name!r} is not C-contiguous; "
            "pass np.ascontiguousarray(x) or a buffer from allocate_inputs()"
        )
