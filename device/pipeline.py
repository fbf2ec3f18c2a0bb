"""The loop: capture -> preprocess -> infer -> postprocess/publish, one thread per stage.

::

    capture thread     preprocess thread        inference thread          main thread
    source.frames() -> [captured q] -> slot k <- [free input slots] ...
                                      letterbox into buffer k -> [preprocessed q] ->
                                                 infer(buffer k, out set j) -> slot k freed
                                                 -> [inferred q] -> postprocess, frame hooks,
                                                                    publish, out set j freed

The pipeline receives ready-built parts (``device.setup`` builds them from the config; this
module imports neither the config nor the bundle) and owns none of them: the caller opens and
closes the source, backend and sinks. The backend is activated and deactivated here, on the
inference thread, because CUDA contexts are per thread.

Buffers: the backend allocates ``buffers`` input buffers (a ring; page-locked memory on TensorRT)
and as many output sets. A buffer travels with its frame and returns to a free list only when
the stage that reads it is done, so preprocessing frame k+1 never writes into the buffer that
inference of frame k is reading, and postprocessing of frame k reads outputs that inference of
frame k+1 does not overwrite. No stage allocates model-sized arrays per frame.

Queues are bounded. A file source blocks when the pipeline is behind (no frame is lost); a live
source drops the oldest captured frame instead (counted in ``dropped``). ``request_stop`` (wired to
SIGTERM/SIGINT by ``stop_on_signals``) stops capture; the frames already in flight are finished and
published before ``run`` returns. A second signal aborts without draining.

Extension points (what later capabilities plug into; each is safe to use while ``run`` runs):

- ``add_frame_hook(hook)``: ``hook(result) -> FrameResult`` runs on the publishing thread after
  postprocess and before the sinks, in the order added; it may return the same result, a new
  one (tracker ids, zone events), or raise (the run stops with that error). Keep it cheap: it
  is on the per-frame path.
- ``add_frame_observer(observer)``: ``observer(image, result)`` runs on the publishing thread
  after the frame was published (latencies complete), with the captured frame; it cannot change
  the result (the HTTP endpoint's metrics and preview). Keep it cheap too.
- ``add_stats(provider)``: ``provider() -> dict`` is merged into every stats message (tracking's
  cumulative line counts and zone occupancy).
- ``counters()``: a snapshot dict of live figures (frames, dropped, fps since start, per-stage
  time, queue depths, backend swaps), safe to call from any thread (an HTTP ``/metrics``).
  ``stats_message`` is the periodic message built from the same figures.
- ``stage_times()``: per-stage calls, wall and CPU (``time.thread_time``) seconds, recorded by
  the stages themselves (as polygraphy's runners record ``inference_time``); the bench reads it.
- ``swap_backend(backend)``: from any thread; the inference thread switches between two frames
  (activates the new backend there, checks its input matches, then frames already preprocessed
  into the old buffers go through the new backend, and the old one is deactivated once its last
  buffer came back). A backend that fails to activate or has another input is refused and the
  old one keeps running; ``swap_result()`` says how the last swap ended.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Tuple, Union

import numpy as np

from device.backends.base import Backend, InferTiming, TensorSpec
from device.detections import FrameResult
from device.errors import JetyoloError
from device.jetson_stats import jetson_readings
from device.postprocess import PostprocessConfig, class_count_problem, postprocess
from device.preprocess import FRAME_INPUT, FrameCopier, Letterbox, Preprocessor
from device.sources import Frame, Source
from device.stats import RateMeter, RunSummary, StageStats

LOG = logging.getLogger(__name__)
POLL_S = 0.1  # how often blocked stages look at the stop/abort flags
JOIN_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 10.0  # frames in flight after a stop are a handful; more means a stuck read
TIMED_STAGES = ("preprocess", "infer", "postprocess")

FrameHook = Callable[[FrameResult], FrameResult]
FrameObserver = Callable[[np.ndarray, FrameResult], None]


class FrameSink(Protocol):
    """What the pipeline needs of ``device.sinks.SinkSet``."""

    def publish_frame(self, result: FrameResult) -> Any: ...

    def publish_stats(self, stats: Dict[str, Any]) -> Any: ...


class ProgressNotifier(Protocol):
    """What the pipeline needs of ``device.sdnotify.Notifier``."""

    def ready(self, text: Optional[str] = None) -> bool: ...

    def frame_done(self, count: int = 1) -> bool: ...

    def stopping(self, text: Optional[str] = None) -> bool: ...


class _Aborted(Exception):
    """A stage was told to give up (another stage failed, or a second signal came)."""


@dataclass
class _Slot:
    """One input buffer, the preprocessor that writes into it, and the backend it came from."""

    buffer: np.ndarray
    preprocessor: Union[Preprocessor, FrameCopier]
    generation: int


@dataclass
class _Work:
    frame: Frame
    captured_at: float  # perf_counter when the frame was in hand
    latency_ms: Dict[str, float]
    slot: Optional[_Slot] = None
    geometry: Optional[Letterbox] = None
    outputs: Optional[Dict[str, np.ndarray]] = None
    model: Optional[ModelInfo] = None  # the model whose backend inferred it


@dataclass(frozen=True)
class ModelInfo:
    """What a frame's message says about the model that computed it, and how its outputs are
    decoded; it changes with ``swap_backend`` (``jetyolo update``)."""

    model_id: str = ""
    class_names: Tuple[str, ...] = ()
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)


@dataclass
class _InFlight:
    """A frame whose inference was submitted and is not yet passed on."""

    work: _Work
    outputs: Dict[str, np.ndarray]
    future: Future[InferTiming]
    submitted_at: float


@dataclass
class StageTime:
    """One stage's totals: calls, wall seconds and CPU seconds of the thread that ran it."""

    calls: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def as_dict(self) -> Dict[str, float]:
        return {"calls": self.calls, "wall_s": round(self.wall_s, 6),
                "cpu_s": round(self.cpu_s, 6)}


class _Timed:
    """``with _Timed(stage):`` adds the block's wall and thread CPU time to ``stage``; each
    stage is written by one thread only, so no lock."""

    def __init__(self, stage: StageTime) -> None:
        self.stage = stage
        self.wall = self.cpu = 0.0

    def __enter__(self) -> _Timed:
        self.wall, self.cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stage.calls += 1
        self.stage.cpu_s += time.thread_time() - self.cpu
        self.stage.wall_s += time.perf_counter() - self.wall

    @property
    def ms(self) -> float:
        return (time.perf_counter() - self.wall) * 1000.0


@dataclass
class _Retiring:
    """A backend swapped out: deactivated once its buffers and output sets all came back."""

    backend: Backend
    generation: int
    slots_left: int
    outputs_left: int


@dataclass
class _Counters:
    frames: int = 0
    dropped: int = 0
    backend_swaps: int = 0
    first_capture: Optional[float] = None
    last_publish: Optional[float] = None
    errors: List[BaseException] = field(default_factory=list)


_IDLE = _Work(Frame(-1, 0.0, np.zeros((1, 1, 3), np.uint8)), 0.0, {})  # "nothing arrived yet"


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def check_class_names(backend: Backend, model: ModelInfo) -> None:
    """Refuse an (active) backend whose outputs score another number of classes than the
    model's ``class_names`` (at the start and at each swap; ``bundle verify`` asks the same)."""
    shapes = {name: spec.shape for name, spec in backend.output_specs.items()}
    problem = class_count_problem(model.class_names, shapes) if model.class_names else None
    if problem is not None:
        raise JetyoloError(f"model {model.model_id}: {problem} in its manifest, which does not "
                           "belong to this model; re-create the bundle with `jetyolo export`")


class Pipeline:
    """One source, one backend, one set of sinks, all opened by the caller. ``run()`` returns
    when the source ends, after ``max_frames``, or after ``request_stop``; errors in any stage
    are re-raised there. See the module docstring for the extension points."""

    def __init__(
        self,
        backend: Backend,
        source: Source,
        input_size: tuple,
        postprocess_config: PostprocessConfig,
        sinks: FrameSink,
        *,
        buffers: int = 3,
        max_frames: Optional[int] = None,
        stats_interval_s: float = 10.0,
        notifier: Optional[ProgressNotifier] = None,
        precision: Optional[str] = None,
        readings: Callable[[], Dict[str, Any]] = jetson_readings,
        source_name: Optional[str] = None,
        model: Optional[ModelInfo] = None,
    ) -> None:
        if buffers < 2:
            raise ValueError("the pipeline needs at least 2 input buffers to overlap stages")
        self.backend = backend
        self.source = source
        self.source_name = source_name or source.name  # what topics and messages call it
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.postprocess_config = postprocess_config
        # the model frames are inferred with now (the inference thread changes it at a swap)
        self.model = model or ModelInfo(postprocess=postprocess_config)
        self.sinks = sinks
        self.buffers = buffers
        self.max_frames = max_frames
        self.stats_interval_s = stats_interval_s
        self.notifier = notifier
        self.precision = precision  # what the stats message reports
        self.readings = readings  # device health for the stats message ({}: none)
        self.started = time.monotonic()
        self.stats = StageStats()
        self.stopped_by = "end of source"
        self._hooks: List[FrameHook] = []
        self._observers: List[FrameObserver] = []
        self._stats_providers: List[Callable[[], Dict[str, Any]]] = []
        self._times = {stage: StageTime() for stage in TIMED_STAGES}
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._ready = threading.Event()
        self._post_done = threading.Event()
        # live: hold only the newest frame (latency); files: one decoded frame ahead
        self._captured: queue.Queue = queue.Queue(maxsize=1 if source.live else 2)
        self._preprocessed: queue.Queue = queue.Queue(maxsize=buffers)
        self._inferred: queue.Queue = queue.Queue(maxsize=buffers)
        self._free_inputs: queue.Queue = queue.Queue()
        self._free_outputs: queue.Queue = queue.Queue()
        self._input_spec: Optional[TensorSpec] = None
        self._generation = 0
        self._output_generation: Dict[int, int] = {}  # id(output set) -> generation
        self._retiring: List[_Retiring] = []
        self._pending_backend: Optional[Backend] = None
        self._pending_model: Optional[ModelInfo] = None
        self._swap_result = "no swap requested"
        self._counters = _Counters()
        self._stop_requested_at: Optional[float] = None
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []

    # ---- extension points ----------------------------------------------------------------------
    def add_frame_hook(self, hook: FrameHook) -> None:
        """Run ``hook(result) -> result`` on every frame after postprocess, before publishing."""
        self._hooks.append(hook)

    def add_frame_observer(self, observer: FrameObserver) -> None:
        """Run ``observer(image, result)`` on every frame after it was published (latencies
        complete); ``image`` is the captured frame (sources hand out a new array per frame)."""
        self._observers.append(observer)

    def add_stats(self, provider: Callable[[], Dict[str, Any]]) -> None:
        """Merge ``provider()`` (called on the publishing thread) into every stats message."""
        self._stats_providers.append(provider)

    def swap_backend(self, backend: Backend, model: Optional[ModelInfo] = None) -> None:
        """Switch to ``backend`` (constructed, not activated) between two frames; see the module
        docstring. A swap requested before the previous one was applied replaces it. ``model``
        (default: the current one) is what frames inferred by ``backend`` are published as."""
        with self._lock:
            self._pending_backend = backend
            self._pending_model = model
            self._swap_result = "pending"

    def swap_result(self) -> str:
        """"no swap requested", "pending", "swapped to NAME" or "refused: WHY"."""
        return self._swap_result

    def stage_times(self) -> Dict[str, StageTime]:
        """Per-stage totals so far (preprocess, infer, postprocess; hooks count as postprocess)."""
        return {stage: StageTime(t.calls, t.wall_s, t.cpu_s) for stage, t in self._times.items()}

    def counters(self) -> Dict[str, Any]:
        """Live figures, from any thread: whole-run counts, fps since the first frame, stage
        totals and queue depths (``stats_message`` adds the windowed fps and percentiles)."""
        counters = self._counters
        seconds = 0.0
        if counters.first_capture is not None:
            seconds = time.perf_counter() - counters.first_capture
        return {
            "frames": counters.frames,
            "dropped_frames": counters.dropped,
            "decode_errors": self.source.decode_errors,
            "reconnects": self.source.reconnects,
            "fps_since_start": round(counters.frames / seconds, 2) if seconds > 0 else 0.0,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "backend": self.backend.kind,
            "backend_name": self.backend.name,
            "backend_swaps": counters.backend_swaps,
            "source": self.source_name,
            "stages": {stage: t.as_dict() for stage, t in self._times.items()},
            "queues": {"captured": self._captured.qsize(),
                       "preprocessed": self._preprocessed.qsize(),
                       "inferred": self._inferred.qsize()},
        }

    def still_reading(self) -> bool:
        """True after ``run`` when the capture thread is still blocked in a read of the source:
        releasing a camera under a read can crash OpenCV, so the owner must not close it (the
        thread is a daemon; the process exit releases the device)."""
        return any(t.name == "jetyolo-capture" and t.is_alive() for t in self._threads)

    # ---- control -------------------------------------------------------------------------------
    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop capturing; what is in flight is finished. A second call aborts at once."""
        if self._stop.is_set():
            LOG.warning("pipeline: %s again; aborting without draining", reason)
            self._abort.set()
            return
        LOG.info("pipeline: %s; draining the frames in flight", reason)
        self.stopped_by = reason
        self._stop.set()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._counters.errors.append(exc)
        self._stop.set()
        self._abort.set()

    def _get(self, source: queue.Queue) -> Any:
        while True:
            if self._abort.is_set():
                raise _Aborted
            try:
                return source.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def _put(self, target: queue.Queue, item: Any) -> None:
        while True:
            if self._abort.is_set():
                raise _Aborted
            try:
                target.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _put_dropping_oldest(self, item: _Work) -> None:
        while True:
            try:
                self._captured.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._captured.get_nowait()
                    self._counters.dropped += 1
                except queue.Empty:
                    pass

    def _stage(self, name: str, body: Any) -> threading.Thread:
        def guarded() -> None:
            try:
                body()
            except _Aborted:
                pass
            except BaseException as exc:  # handed to run(), which re-raises it
                LOG.debug("pipeline: %s stage failed", name, exc_info=True)
                self._fail(exc)

        thread = threading.Thread(target=guarded, name=f"jetyolo-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    # ---- stages --------------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        frames = self.source.frames(self._stop)
        captured = 0
        while True:
            # max_frames counts published frames: a file drops none, so its first max_frames
            # captured are enough; a live source reads on until that many made it through.
            done = self._counters.frames if self.source.live else captured
            if self.max_frames is not None and done >= self.max_frames:
                self.stopped_by = "max frames"
                break
            started = time.perf_counter()
            frame = next(frames, None)
            if frame is None:
                break
            work = _Work(frame, time.perf_counter(), {"capture": _ms(started)})
            if self._counters.first_capture is None:
                self._counters.first_capture = started
            captured += 1
            if self.source.live:
                self._put_dropping_oldest(work)
            else:
                self._put(self._captured, work)
        self._put(self._captured, None)

    def _preprocess_loop(self) -> None:
        while True:
            # Live: hold a free buffer first, then take the newest frame, so the frame never
            # waits for a buffer while newer ones arrive (a standing queue of stale frames).
            held: Optional[_Slot] = self._get(self._free_inputs) if self.source.live else None
            work = self._get(self._captured)
            if work is None:
                if held is not None:
                    self._free_inputs.put(held)
                self._put(self._preprocessed, None)
                return
            slot: _Slot = held if held is not None else self._get(self._free_inputs)
            with _Timed(self._times["preprocess"]) as timed:
                work.geometry = slot.preprocessor(work.frame.image, work.frame.reduction)
            work.latency_ms["preprocess"] = timed.ms
            work.slot = slot
            self._put(self._preprocessed, work)

    def _infer_loop(self) -> None:
        self.backend.activate()
        try:
            self._check_input(self.backend)
            check_class_names(self.backend, self.model)
            self._add_generation(self.backend)
            self._ready.set()
            self._infer_frames()
            while not self._post_done.wait(POLL_S) and not self._abort.is_set():
                pass  # output arrays may be backend memory: keep it alive until they are read
        finally:
            for retiring in self._retiring:
                retiring.backend.deactivate()
            self.backend.deactivate()

    def _infer_frames(self) -> None:
        """Up to ``backend.concurrency`` frames in flight, finished (and passed on) in frame
        order; a swap is applied only with nothing in flight. Live sources: the newest
        preprocessed frame wins, older ones waiting behind it are dropped."""
        in_flight: Deque[_InFlight] = deque()
        while True:
            if not in_flight:
                self._apply_pending_swap()
            room = len(in_flight) < self.backend.concurrency
            if in_flight and (not room or self._preprocessed.empty()):
                self._finish(in_flight.popleft())
                continue
            work = self._get(self._preprocessed)
            if work is not None and self.source.live:
                work = self._newest(work)
            if work is None:
                while in_flight:
                    self._finish(in_flight.popleft())
                self._put(self._inferred, None)
                return
            in_flight.append(self._submit(work))

    def _newest(self, work: _Work) -> Optional[_Work]:
        """The newest preprocessed frame; the ones before it are dropped (buffers returned)."""
        while True:
            try:
                newer: Optional[_Work] = self._preprocessed.get_nowait()
            except queue.Empty:
                return work
            if newer is None:  # the end: keep it for after this frame
                self._preprocessed.put_nowait(None)
                return work
            if work.slot is not None:
                self._return_slot(work.slot)
            self._counters.dropped += 1
            work = newer

    def _submit(self, work: _Work) -> _InFlight:
        outputs = self._current_outputs()
        slot = work.slot
        if slot is None or self._input_spec is None:
            raise RuntimeError("frame reached inference without an input buffer")
        work.model = self.model  # the model of the backend this frame is submitted to
        submitted_at = time.perf_counter()  # before: a synchronous backend runs in submit()
        future = self.backend.submit({self._input_spec.name: slot.buffer}, outputs)
        return _InFlight(work, outputs, future, submitted_at)

    def _finish(self, flight: _InFlight) -> None:
        timing = flight.future.result()  # re-raises what the call raised
        stage = self._times["infer"]
        stage.calls += 1
        stage.wall_s += timing.wall_s
        stage.cpu_s += timing.cpu_s
        work = flight.work
        work.latency_ms["infer"] = _ms(flight.submitted_at)
        if work.slot is not None:
            self._return_slot(work.slot)
        work.outputs = flight.outputs
        self._put(self._inferred, work)

    def _check_input(self, backend: Backend) -> None:
        spec = backend.input_spec
        if spec.name == FRAME_INPUT:  # the camera frame itself: FrameCopier checks each frame
            return
        expected = Preprocessor.input_shape(self.input_size, spec.dtype.name)
        if tuple(spec.shape) != expected:
            raise JetyoloError(
                f"model input {spec.describe()} does not fit the bundle's preprocess size "
                f"{list(self.input_size)} (expected {list(expected)}); re-export the bundle"
            )

    def _add_generation(self, backend: Backend) -> None:
        """Input slots and output sets from ``backend`` (active), into the free lists."""
        self._generation += 1
        spec = backend.input_spec
        self._input_spec = spec
        for buffer in backend.allocate_inputs(self.buffers):
            preprocessor: Union[Preprocessor, FrameCopier] = (
                FrameCopier(self.input_size, buffer) if spec.name == FRAME_INPUT
                else Preprocessor(self.input_size, spec.dtype.name, buffer=buffer)
            )
            self._free_inputs.put(_Slot(buffer, preprocessor, self._generation))
        for _ in range(self.buffers):
            outputs = backend.allocate_outputs()
            self._output_generation[id(outputs)] = self._generation
            self._free_outputs.put(outputs)

    def _current_outputs(self) -> Dict[str, np.ndarray]:
        """A free output set of the current backend; older ones are retired on the way."""
        while True:
            outputs: Dict[str, np.ndarray] = self._get(self._free_outputs)
            generation = self._output_generation.get(id(outputs), self._generation)
            if generation == self._generation:
                return outputs
            del self._output_generation[id(outputs)]
            self._retire(generation, outputs=1)

    def _return_slot(self, slot: _Slot) -> None:
        if slot.generation == self._generation:
            self._free_inputs.put(slot)
        else:
            self._retire(slot.generation, slots=1)

    def _retire(self, generation: int, slots: int = 0, outputs: int = 0) -> None:
        for retiring in list(self._retiring):
            if retiring.generation != generation:
                continue
            retiring.slots_left -= slots
            retiring.outputs_left -= outputs
            if retiring.slots_left <= 0 and retiring.outputs_left <= 0:
                retiring.backend.deactivate()
                self._retiring.remove(retiring)
                LOG.info("pipeline: %s deactivated (its last buffer came back)",
                         retiring.backend.name)

    def _apply_pending_swap(self) -> None:
        with self._lock:
            new, self._pending_backend = self._pending_backend, None
            model, self._pending_model = self._pending_model, None
        if new is None:
            return
        try:
            new.activate()
            if new.input_spec != self._input_spec:
                raise JetyoloError(f"its input {new.input_spec.describe()} differs from the "
                                   f"running model's {self._describe_input()}")
            check_class_names(new, model or self.model)
        except Exception as exc:  # a bad new model must not stop the running one
            new.deactivate()
            self._swap_result = f"refused: {exc}"
            LOG.error("pipeline: backend swap to %s refused: %s", new.name, exc)
            return
        old = self.backend
        self._retiring.append(_Retiring(old, self._generation, self.buffers, self.buffers))
        self._add_generation(new)
        self.backend = new
        self.model = model or self.model
        self._counters.backend_swaps += 1
        self._swap_result = f"swapped to {new.name}"
        LOG.info("pipeline: backend swapped from %s to %s", old.name, new.name)

    def _describe_input(self) -> str:
        return self._input_spec.describe() if self._input_spec is not None else "(none)"

    def _publish(self, work: _Work) -> None:
        outputs = work.outputs if work.outputs is not None else {}
        if self.max_frames is not None and self._counters.frames >= self.max_frames:
            self._free_outputs.put(outputs)  # a live frame still in flight past max_frames
            self._counters.dropped += 1
            return
        geometry = work.geometry
        if geometry is None:
            raise RuntimeError("frame reached postprocess without letterbox geometry")
        with _Timed(self._times["postprocess"]) as timed:
            model = work.model or self.model
            detections = postprocess(outputs, geometry, model.postprocess)
            self._free_outputs.put(outputs)
            image = work.frame.image
            result = FrameResult(
                source=work.frame.source or self.source_name,
                frame_index=work.frame.index,
                timestamp=work.frame.timestamp,
                frame_size=geometry.frame_size,  # the source's (a reduced decode's too)
                detections=detections,
                latency_ms=work.latency_ms,
                model_id=model.model_id,
                class_names=model.class_names or None,
            )
            for hook in self._hooks:
                result = hook(result)
        work.latency_ms["postprocess"] = timed.ms
        work.latency_ms["total"] = _ms(work.captured_at)
        self.sinks.publish_frame(result)
        self.stats.record(work.latency_ms)
        self._counters.frames += 1
        self._counters.last_publish = time.perf_counter()
        for observer in self._observers:
            observer(image, result)

    # ---- main ----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Run to the end; returns the summary or raises the first stage error."""
        self.started = time.monotonic()
        try:
            infer = self._stage("infer", self._infer_loop)
            if self._wait_ready(infer):
                self._stage("capture", self._capture_loop)
                self._stage("preprocess", self._preprocess_loop)
                self._publish_loop()
        except _Aborted:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._post_done.set()
            self._stop.set()  # the end for every reader, a MultiSource's capture threads too
            for thread in self._threads:
                thread.join(JOIN_TIMEOUT_S)
            if self.still_reading():
                LOG.warning("pipeline: %s did not return from a read", self.source.name)
            if self.notifier is not None:
                self.notifier.stopping(f"stopped: {self.stopped_by}")
        self._raise_errors()
        return self.summary()

    def _wait_ready(self, infer_thread: threading.Thread) -> bool:
        """True once the backend is active and its buffers exist; False if that failed."""
        started = time.monotonic()
        while not self._ready.wait(POLL_S):
            if self._abort.is_set() or not infer_thread.is_alive():
                return False
        LOG.info("pipeline: %s ready after %.1f s; reading %s", self.backend.name,
                 time.monotonic() - started, self.source.name)
        return True

    def _publish_loop(self) -> None:
        rate = RateMeter()
        next_stats = time.monotonic() + self.stats_interval_s
        while True:
            try:
                work: Optional[_Work] = self._inferred.get(timeout=POLL_S)
            except queue.Empty:
                work = _IDLE
            if self._abort.is_set():
                raise _Aborted
            if work is None:
                break
            if work is not _IDLE:
                self._publish(work)
                self._notify_progress()
            elif self._drain_overdue():
                raise _Aborted
            if time.monotonic() >= next_stats:
                self.sinks.publish_stats(self.stats_message(rate.tick(self._counters.frames)))
                next_stats = time.monotonic() + self.stats_interval_s

    def _drain_overdue(self) -> bool:
        """True when a stop was requested ``DRAIN_TIMEOUT_S`` ago and the stages still have not
        drained: the capture thread is stuck in a read of a stalled camera or stream."""
        if not self._stop.is_set():
            return False
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        if time.monotonic() - self._stop_requested_at < DRAIN_TIMEOUT_S:
            return False
        LOG.warning("pipeline: not drained %.0f s after the stop (a read of %s is stuck); "
                    "stopping without it", DRAIN_TIMEOUT_S, self.source.name)
        self._abort.set()
        return True

    def _notify_progress(self) -> None:
        if self.notifier is None:
            return
        if self._counters.frames == 1:
            self.notifier.ready(f"running: {self.backend.kind} on {self.source_name}")
        self.notifier.frame_done()

    def _raise_errors(self) -> None:
        if self._counters.errors:
            raise self._counters.errors[0]

    def stats_message(self, fps: float) -> Dict[str, Any]:
        """The periodic stats dict handed to ``sinks.publish_stats`` (the sinks add their own
        queue and spool depths as ``sinks``)."""
        message: Dict[str, Any] = {
            "fps": round(fps, 2),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "frames": self._counters.frames,
            "dropped_frames": self._counters.dropped,
            "decode_errors": self.source.decode_errors,
            "reconnects": self.source.reconnects,
            "backend": self.backend.kind,
            "source": self.source_name,
            "model_id": self.model.model_id,
            "latency_ms": self.stats.percentiles(last=max(1, int(fps * self.stats_interval_s))),
            "queues": {"captured": self._captured.qsize(),
                       "preprocessed": self._preprocessed.qsize(),
                       "inferred": self._inferred.qsize()},
        }
        per_source = getattr(self.source, "per_source", None)  # several cameras (MultiSource)
        if per_source is not None:
            message["sources"] = per_source()
        if self.precision is not None:
            message["precision"] = self.precision
        readings = self.readings()
        if readings:
            message["jetson"] = readings
        for provider in self._stats_providers:
            message.update(provider())
        return message

    def summary(self) -> RunSummary:
        counters = self._counters
        seconds = 0.0
        if counters.first_capture is not None and counters.last_publish is not None:
            seconds = counters.last_publish - counters.first_capture
        return RunSummary(
            frames=counters.frames,
            seconds=seconds,
            fps=counters.frames / seconds if seconds > 0 else 0.0,
            latency_ms=self.stats.percentiles(),
            dropped=counters.dropped,
            decode_errors=self.source.decode_errors,
            reconnects=self.source.reconnects,
            backend=self.backend.kind,
            source=self.source_name,
            stopped_by=self.stopped_by,
        )


class stop_on_signals:
    """``with stop_on_signals(pipeline):`` routes SIGTERM/SIGINT to ``pipeline.request_stop``
    (only from the main thread; elsewhere, or with ``enabled=False``, it does nothing)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, pipeline: Pipeline, enabled: bool = True) -> None:
        self.pipeline = pipeline
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.previous: Dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        self.pipeline.request_stop(f"signal {signal.Signals(signum).name}")

    def __enter__(self) -> None:
        if self.enabled:
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
