"""The loop: capture -> batch + preprocess -> infer -> postprocess/publish, a thread per stage.

::

    capture thread     batching thread           inference thread          main thread
    source.frames() -> slot k <- [free input slots]
                       [captured q] -> up to B frames, letterboxed into rows of buffer k
                                    -> [preprocessed q] ->
                                                 infer(buffer k, out set j) -> slot k freed
                                                 -> [inferred q] -> per frame: postprocess,
                                                                    source filter, frame hooks,
                                                                    publish; out set j freed

Several sources (``device.multisource.MultiSource``) have a capture thread each; the batching
thread then takes their frames itself (``take``, round-robin) once it holds a free buffer.

Batching: the engine's input has a batch dimension N (1 unless ``jetyolo export --batch N``);
a batch is up to ``batch_size`` frames (default N). The batching thread holds a free buffer,
waits for a first frame, then adds the frames that arrive within ``batch_timeout_ms`` of it
(0: only those already waiting) and sends what it has: a live source never waits longer than
that for a slow one. A ``dynamic_batch`` backend runs k < N frames as k rows; another one gets
all N rows and the unused ones are ignored. Batches finish in the order they were submitted and
rows are published in the order they were taken, so each source's frames keep their order.
Several live sources: the batching thread also waits for an inference seat (a call that can
start now, ``backend.concurrency``) before it takes frames, so a full batch never waits behind
the calls in flight while its cameras deliver newer frames (measured: p50 capture->publish of 4
paced cameras 890 ms with the seat wait absent, docs/BENCHMARKS.md).

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
source drops the oldest captured frame instead (counted in ``dropped``; several sources: per
source, in ``MultiSource``). ``request_stop`` (wired to
SIGTERM/SIGINT by ``stop_on_signals``) stops capture; the frames already in flight are finished and
published before ``run`` returns. A second signal aborts without draining.

Extension points (what later capabilities plug into; each is safe to use while ``run`` runs):

- ``add_frame_hook(hook)``: ``hook(result) -> FrameResult`` runs on the publishing thread after
  postprocess and before the sinks, in the order added; it may return the same result, a new
  one (tracker ids, zone events), or raise (the run stops with that error). Keep it cheap: it
  is on the per-frame path.
- ``add_frame_observer(observer, wants_image)``: ``observer(image, result)`` runs on the
  publishing thread after the frame was published (latencies complete); it cannot change the
  result (the HTTP endpoint's metrics and preview). Keep it cheap too. ``image`` is the
  captured frame when ``wants_image(source)`` said so as the frame was letterboxed, else
  ``RELEASED`` (zero-size): a full-size frame is let go as soon as it was letterboxed, so the
  frames in flight (batches, queues) do not each hold 6 MB of 1080p pixels.
- ``add_batch_observer(observer)``: ``observer(frames)`` runs on the publishing thread once per
  inference call with the number of frames it carried (the HTTP endpoint's batch histogram).
- ``add_stats(provider)``: ``provider() -> dict`` is merged into every stats message (tracking's
  cumulative line counts and zone occupancy).
- ``counters()``: a snapshot dict of live figures (frames, batches, dropped, fps since start,
  per-stage time, queue depths, backend swaps), safe to call from any thread (an HTTP ``/metrics``).
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

import functools
import logging
import math
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import (
    AbstractSet,
    Any,
    Callable,
    Deque,
    Dict,
    List,
    Mapping,
    Optional,
    Protocol,
    Tuple,
    Union,
)

import numpy as np

from device.backends.base import Backend, InferTiming, TensorSpec
from device.detections import Detections, FrameResult
from device.errors import JetyoloError
from device.jetson_stats import jetson_readings
from device.multisource import MultiSource, Taken
from device.postprocess import PostprocessConfig, class_count_problem, postprocess
from device.preprocess import FRAME_INPUT, FrameCopier, Letterbox, Preprocessor
from device.sources import Frame, Source
from device.stats import RateMeter, RunSummary, StageStats

LOG = logging.getLogger(__name__)
POLL_S = 0.1  # how often blocked stages look at the stop/abort flags
JOIN_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 10.0  # frames in flight after a stop are a handful; more means a stuck read
TIMED_STAGES = ("preprocess", "infer", "postprocess")
SOURCE_WINDOW = 2000  # per-source latency samples kept (the stats window is far shorter)

FrameHook = Callable[[FrameResult], FrameResult]
FrameObserver = Callable[[np.ndarray, FrameResult], None]
# What an observer gets instead of the frame it did not want (see add_frame_observer).
RELEASED = np.empty((0, 0, 3), np.uint8)
RELEASED.flags.writeable = False


class FrameSink(Protocol):
    """What the pipeline needs of ``device.sinks.SinkSet``."""

    def publish_frame(self, result: FrameResult) -> Any: ...

    def publish_stats(self, stats: Dict[str, Any]) -> Any: ...


class ProgressNotifier(Protocol):
    """What the pipeline needs of ``device.sdnotify.Notifier``."""

    def ready(self, text: Optional[str] = None) -> bool: ...

    def frame_done(self, count: int = 1, source: Optional[str] = None) -> bool: ...

    def stopping(self, text: Optional[str] = None) -> bool: ...


class _Aborted(Exception):
    """A stage was told to give up (another stage failed, or a second signal came)."""


@dataclass
class _Slot:
    """One input buffer (N rows), a preprocessor writing into each row, and the backend it
    came from."""

    buffer: np.ndarray
    preprocessors: List[Union[Preprocessor, FrameCopier]]
    generation: int


@dataclass
class _Work:
    frame: Frame
    captured_at: float  # perf_counter when the frame was in hand
    latency_ms: Dict[str, float]
    geometry: Optional[Letterbox] = None
    feed: Optional[np.ndarray] = None  # the frame itself as the input (FrameCopier.in_place)


@dataclass
class _Batch:
    """Frames preprocessed into the rows of one input buffer, inferred in one call."""

    works: List[_Work]
    slot: _Slot
    outputs: Optional[Dict[str, np.ndarray]] = None
    model: Optional[ModelInfo] = None  # the model whose backend inferred it


@dataclass(frozen=True)
class SourceFilter:
    """A source's own settings over the model's: its confidence threshold and the class ids it
    publishes (None: the model's threshold, every class)."""

    conf: Optional[float] = None
    class_ids: Optional[AbstractSet[int]] = None


@dataclass(frozen=True)
class ModelInfo:
    """What a frame's message says about the model that computed it, and how its outputs are
    decoded; it changes with ``swap_backend`` (``jetyolo update``)."""

    model_id: str = ""
    class_names: Tuple[str, ...] = ()
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)


@dataclass
class _InFlight:
    """A batch whose inference was submitted and is not yet passed on."""

    batch: _Batch
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
    batches: int = 0
    dropped: int = 0
    backend_swaps: int = 0
    first_capture: Optional[float] = None
    last_publish: Optional[float] = None
    errors: List[BaseException] = field(default_factory=list)


_IDLE = _Batch([], _Slot(np.zeros(1), [], 0))  # "nothing arrived yet"


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


def batch_above_engine(batch_size: int, engine_batch: int) -> str:
    """The refusal of a ``batch_size`` the engine cannot run (setup says it before anything
    opens, from the manifest; the pipeline again from the active backend)."""
    return (f"batch_size {batch_size} is above the engine's batch {engine_batch}; lower "
            f"batch_size to {engine_batch} or less, or export a bundle that takes "
            f"{batch_size} frames per call with `jetyolo export --batch {batch_size}`")


class Pipeline:
    """One source (or a ``MultiSource``), one backend, one set of sinks, all opened by the
    caller. ``run()`` returns when the source ends, after ``max_frames``, or after
    ``request_stop``; errors in any stage are re-raised there. See the module docstring for the
    extension points."""

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
        batch_size: Optional[int] = None,
        batch_timeout_ms: float = 0.0,
        source_filters: Optional[Mapping[str, SourceFilter]] = None,
    ) -> None:
        if buffers < 2:
            raise ValueError("the pipeline needs at least 2 input buffers to overlap stages")
        if (batch_size is not None and batch_size < 1) or not 0 <= batch_timeout_ms < math.inf:
            raise ValueError(f"batch_size {batch_size} / batch_timeout_ms {batch_timeout_ms}: "
                             "at least 1 / a finite number >= 0")
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
        self.requested_batch = batch_size  # None: the engine's batch
        self.batch_size = 1  # frames per call, known once the backend is active
        self.batch_timeout_s = batch_timeout_ms / 1000.0
        self.source_filters = dict(source_filters or {})  # source name -> its own settings
        # several sources: the batching thread takes their frames (no pipeline capture thread)
        self._pulled = source if isinstance(source, MultiSource) else None
        # several live sources: inference seats the batching thread waits for (set at activation)
        self._live_pulled = self._pulled is not None and all(
            feed.source.live for feed in self._pulled.feeds)
        self._seats: Optional[threading.Semaphore] = None
        self.started = time.monotonic()
        self.stats = StageStats()
        self.source_stats: Dict[str, StageStats] = {}  # capture -> publish ms, per source
        self._source_frames: Dict[str, int] = {}  # published, per source
        self._source_rate: Dict[str, Tuple[float, int]] = {}  # at the last stats: time, frames
        self.stopped_by = "end of source"
        self._hooks: List[FrameHook] = []
        self._observers: List[FrameObserver] = []
        self._image_wanted: List[Callable[[str], bool]] = []  # per observer: for this source?
        self._batch_observers: List[Callable[[int], None]] = []
        self._stats_providers: List[Callable[[], Dict[str, Any]]] = []
        # source name -> its tracking step (device.setup puts them here; the HTTP preview
        # outlines their zones and lines)
        self.tracking: Dict[str, Any] = {}
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
        self._taken = 0  # frames the batching thread took from a MultiSource
        self._stop_requested_at: Optional[float] = None
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []

    # ---- extension points ----------------------------------------------------------------------
    def add_frame_hook(self, hook: FrameHook) -> None:
        """Run ``hook(result) -> result`` on every frame after postprocess, before publishing."""
        self._hooks.append(hook)

    def add_frame_observer(self, observer: FrameObserver,
                           wants_image: Callable[[str], bool] = lambda _source: True) -> None:
        """Run ``observer(image, result)`` on every frame after it was published (latencies
        complete); ``image`` is the captured frame (sources hand out a new array per frame)
        when ``wants_image(source name)`` was true as the frame was letterboxed, else
        ``RELEASED``."""
        self._image_wanted.append(wants_image)
        self._observers.append(observer)

    def add_batch_observer(self, observer: Callable[[int], None]) -> None:
        """Run ``observer(frames)`` once per inference call, before its frames are published."""
        self._batch_observers.append(observer)

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
            "batches": counters.batches,
            "batch_size": self.batch_size,
            "dropped_frames": self._dropped(),
            "decode_errors": self.source.decode_errors,
            "reconnects": self.source.reconnects,
            "fps_since_start": round(counters.frames / seconds, 2) if seconds > 0 else 0.0,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "backend": self.backend.kind,
            "backend_name": self.backend.name,
            "backend_swaps": counters.backend_swaps,
            "source": self.source_name,
            "stages": {stage: t.as_dict() for stage, t in self._times.items()},
            "queues": {"captured": self._captured_depth(),
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

    # ---- batching ------------------------------------------------------------------------------
    def _batch_loop(self) -> None:
        """Batches of up to ``batch_size`` frames, each in the rows of one free input buffer;
        see the module docstring."""
        while True:
            # hold a free buffer first, then take frames, so a frame never waits for a buffer
            # while newer ones arrive (a standing queue of stale frames)
            slot: _Slot = self._get(self._free_inputs)
            self._take_seat()
            first = self._next_decoded(self._first_frame)
            if first is None:
                self._free_inputs.put(slot)
                self._give_seat()
                self._put(self._preprocessed, None)
                return
            works = [first]
            self._preprocess(first, slot, 0)
            deadline = time.perf_counter() + self.batch_timeout_s
            while len(works) < self.batch_size:
                work = self._next_decoded(functools.partial(self._more_frame, deadline))
                if work is None:
                    break
                self._preprocess(work, slot, len(works))
                works.append(work)
            self._put(self._preprocessed, _Batch(works, slot))

    def _take_seat(self) -> None:
        """Several live sources: wait until an inference call can start (see the docstring)."""
        while self._seats is not None and not self._seats.acquire(timeout=POLL_S):
            if self._abort.is_set():
                raise _Aborted

    def _give_seat(self) -> None:
        if self._seats is not None:
            self._seats.release()

    def _preprocess(self, work: _Work, slot: _Slot, row: int) -> None:
        preprocessor, image = slot.preprocessors[row], work.frame.image
        with _Timed(self._times["preprocess"]) as timed:
            work.geometry = preprocessor(image, work.frame.reduction)
            if isinstance(preprocessor, FrameCopier) and preprocessor.feeds_itself(image):
                work.feed = image[None]  # not copied: the call reads the frame where it is
        work.latency_ms["preprocess"] = timed.ms
        source = work.frame.source or self.source_name
        if not any(wanted(source) for wanted in self._image_wanted):
            work.frame.image = RELEASED  # docs/BENCHMARKS.md: "Several cameras after less memory…"

    def _next_decoded(self, take: Callable[[], Optional[_Work]]) -> Optional[_Work]:
        """The next frame from ``take`` whose pixels decode; None when ``take`` has none."""
        while True:
            work = take()
            if work is None or self._decoded(work):
                return work

    @staticmethod
    def _decoded(work: _Work) -> bool:
        """Decode a frame its source handed out undecoded (a live MJPEG stream: see
        ``device.sources.Frame``), timed as part of its capture; False: it does not decode
        (its source counted it) and is skipped."""
        started = time.perf_counter()
        decodes = work.frame.decode()
        work.latency_ms["capture"] += _ms(started)
        return decodes

    def _first_frame(self) -> Optional[_Work]:
        """The next frame, waiting as long as it takes; None at the end."""
        if self._pulled is None:
            work: Optional[_Work] = self._get(self._captured)
            return work
        while True:
            if self._abort.is_set():
                raise _Aborted
            if self._pulled_enough():
                return None
            taken = self._pulled.take(self._stop, POLL_S)
            if taken is not None:
                return self._pulled_work(taken)
            if self._pulled.exhausted(self._stop):
                return None

    def _more_frame(self, deadline: float) -> Optional[_Work]:
        """A frame that is ready by ``deadline`` (perf_counter), else None."""
        wait = max(0.0, deadline - time.perf_counter())
        if self._pulled is None:
            try:
                work: Optional[_Work] = (self._captured.get(timeout=wait) if wait > 0
                                         else self._captured.get_nowait())
            except queue.Empty:
                return None
            if work is None:  # the end: left for _first_frame (the capture thread is done)
                self._captured.put_nowait(None)
            return work
        if self._pulled_enough():
            return None
        taken = self._pulled.take(self._stop, wait)
        return self._pulled_work(taken) if taken is not None else None

    def _pulled_enough(self) -> bool:
        if self.max_frames is None or self._taken < self.max_frames:
            return False
        self.stopped_by = "max frames"
        return True

    def _pulled_work(self, taken: Taken) -> _Work:
        self._taken += 1
        if self._counters.first_capture is None:
            self._counters.first_capture = taken.captured_at - taken.read_ms / 1000.0
        return _Work(taken.frame, taken.captured_at, {"capture": taken.read_ms})

    def _infer_loop(self) -> None:
        self.backend.activate()
        try:
            self._check_input(self.backend)
            check_class_names(self.backend, self.model)
            if self._live_pulled:  # before the slots exist, so the batching thread sees it
                self._seats = threading.Semaphore(self.backend.concurrency)
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
        """Up to ``backend.concurrency`` batches in flight, finished (and passed on) in the
        order submitted; a swap is applied only with nothing in flight. One live source: the
        newest preprocessed batch wins, older ones waiting behind it are dropped."""
        in_flight: Deque[_InFlight] = deque()
        while True:
            if not in_flight:
                self._apply_pending_swap()
            room = len(in_flight) < self.backend.concurrency
            if in_flight and (not room or self._preprocessed.empty()):
                self._finish(in_flight.popleft())
                continue
            batch = self._get(self._preprocessed)
            if batch is not None and self.source.live:
                batch = self._newest(batch)
            if batch is None:
                while in_flight:
                    self._finish(in_flight.popleft())
                self._put(self._inferred, None)
                return
            in_flight.append(self._submit(batch))

    def _newest(self, batch: _Batch) -> Optional[_Batch]:
        """The newest preprocessed batch; the ones before it are dropped (buffers returned)."""
        while True:
            try:
                newer: Optional[_Batch] = self._preprocessed.get_nowait()
            except queue.Empty:
                return batch
            if newer is None:  # the end: keep it for after this batch
                self._preprocessed.put_nowait(None)
                return batch
            self._return_slot(batch.slot)
            self._counters.dropped += len(batch.works)
            batch = newer

    def _submit(self, batch: _Batch) -> _InFlight:
        outputs = self._current_outputs()
        if self._input_spec is None:
            raise RuntimeError("a batch reached inference before the input was known")
        batch.model = self.model  # the model of the backend this batch is submitted to
        buffer = batch.slot.buffer
        if self.backend.dynamic_batch:  # k frames run as k rows; else all N (extra ignored)
            buffer = buffer[: len(batch.works)]
        if len(batch.works) == 1 and batch.works[0].feed is not None:
            buffer = batch.works[0].feed
        submitted_at = time.perf_counter()  # before: a synchronous backend runs in submit()
        future = self.backend.submit({self._input_spec.name: buffer}, outputs)
        return _InFlight(batch, outputs, future, submitted_at)

    def _finish(self, flight: _InFlight) -> None:
        timing = flight.future.result()  # re-raises what the call raised
        self._give_seat()
        stage = self._times["infer"]
        stage.calls += 1
        stage.wall_s += timing.wall_s
        stage.cpu_s += timing.cpu_s
        batch = flight.batch
        infer_ms = _ms(flight.submitted_at)
        for work in batch.works:
            work.latency_ms["infer"] = infer_ms
            work.feed = None  # read: the frame may go (unless an observer holds its image)
        self._return_slot(batch.slot)
        batch.outputs = flight.outputs
        self._put(self._inferred, batch)

    def _check_input(self, backend: Backend) -> None:
        spec = backend.input_spec
        engine_batch = int(spec.shape[0]) if spec.shape else 0
        if spec.name != FRAME_INPUT:  # the camera frame itself: FrameCopier checks each frame
            expected = Preprocessor.input_shape(self.input_size, spec.dtype.name)
            if tuple(spec.shape[1:]) != expected[1:] or engine_batch < 1:
                raise JetyoloError(
                    f"model input {spec.describe()} does not fit the bundle's preprocess size "
                    f"{list(self.input_size)} (expected {list(expected)}); re-export the bundle"
                )
        if self.requested_batch is not None and self.requested_batch > engine_batch:
            raise JetyoloError(batch_above_engine(self.requested_batch, engine_batch))
        self.batch_size = self.requested_batch or engine_batch

    def _add_generation(self, backend: Backend) -> None:
        """Input slots and output sets from ``backend`` (active), into the free lists."""
        self._generation += 1
        spec = backend.input_spec
        self._input_spec = spec
        for buffer in backend.allocate_inputs(self.buffers):
            rows = [buffer[row:row + 1] for row in range(len(buffer))]
            in_place = backend.reads_host_arrays and len(rows) == 1
            preprocessors: List[Union[Preprocessor, FrameCopier]] = [
                FrameCopier(self.input_size, row, in_place) if spec.name == FRAME_INPUT
                else Preprocessor(self.input_size, spec.dtype.name, buffer=row)
                for row in rows
            ]
            self._free_inputs.put(_Slot(buffer, preprocessors, self._generation))
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

    def _publish(self, batch: _Batch) -> None:
        outputs = batch.outputs if batch.outputs is not None else {}
        self._counters.batches += 1
        model = batch.model or self.model
        for observer in self._batch_observers:  # the call is done: counted before its frames
            observer(len(batch.works))
        for row, work in enumerate(batch.works):
            if self.max_frames is not None and self._counters.frames >= self.max_frames:
                self._counters.dropped += 1  # a live frame still in flight past max_frames
                continue
            self._publish_one(work, {name: array[row:row + 1] for name, array in outputs.items()},
                              model)
        self._free_outputs.put(outputs)

    def _publish_one(self, work: _Work, outputs: Dict[str, np.ndarray], model: ModelInfo) -> None:
        geometry = work.geometry
        if geometry is None:
            raise RuntimeError("frame reached postprocess without letterbox geometry")
        name = work.frame.source or self.source_name
        with _Timed(self._times["postprocess"]) as timed:
            detections = self._detections(outputs, geometry, model, name)
            image = work.frame.image
            result = FrameResult(
                source=name,
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
        self._record_source(name, work.latency_ms)
        self._counters.frames += 1
        self._counters.last_publish = time.perf_counter()
        if self.notifier is not None:
            self._notify_progress(name)
        for observer in self._observers:
            observer(image, result)

    def _detections(
        self, outputs: Dict[str, np.ndarray], geometry: Letterbox, model: ModelInfo, source: str
    ) -> Detections:
        """The frame's detections under its source's threshold and class filter."""
        own = self.source_filters.get(source)
        if own is None:
            return postprocess(outputs, geometry, model.postprocess)
        config = model.postprocess if own.conf is None else replace(model.postprocess,
                                                                    conf=own.conf)
        detections = postprocess(outputs, geometry, config)
        if own.class_ids is not None and len(detections):
            detections = detections[np.isin(detections.class_id, sorted(own.class_ids))]
        return detections

    def _record_source(self, name: str, latency_ms: Dict[str, float]) -> None:
        stats = self.source_stats.get(name)
        if stats is None:
            stats = self.source_stats[name] = StageStats(("total",), window=SOURCE_WINDOW)
        stats.record(latency_ms)
        self._source_frames[name] = self._source_frames.get(name, 0) + 1

    # ---- main ----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Run to the end; returns the summary or raises the first stage error."""
        self.started = time.monotonic()
        try:
            infer = self._stage("infer", self._infer_loop)
            if self._wait_ready(infer):
                if self._pulled is None:  # a MultiSource runs its own capture threads
                    self._stage("capture", self._capture_loop)
                self._stage("batch", self._batch_loop)
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
        LOG.info("pipeline: %s ready after %.1f s (batch %d); reading %s", self.backend.name,
                 time.monotonic() - started, self.batch_size, self.source.name)
        return True

    def _publish_loop(self) -> None:
        rate = RateMeter()
        next_stats = time.monotonic() + self.stats_interval_s
        while True:
            try:
                batch: Optional[_Batch] = self._inferred.get(timeout=POLL_S)
            except queue.Empty:
                batch = _IDLE
            if self._abort.is_set():
                raise _Aborted
            if batch is None:
                break
            if batch is not _IDLE:
                self._publish(batch)
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

    def _notify_progress(self, source: str) -> None:
        """READY=1 after the first frame; then each frame of any source counts for the watchdog
        (it fires only when no source makes progress) and STATUS='s per-source FPS."""
        if self.notifier is None:
            return
        if self._counters.frames == 1:
            self.notifier.ready(f"running: {self.backend.kind} on {self.source_name}")
        self.notifier.frame_done(1, source)

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
            "dropped_frames": self._dropped(),
            "decode_errors": self.source.decode_errors,
            "reconnects": self.source.reconnects,
            "backend": self.backend.kind,
            "source": self.source_name,
            "model_id": self.model.model_id,
            "latency_ms": self.stats.percentiles(last=max(1, int(fps * self.stats_interval_s))),
            "queues": {"captured": self._captured_depth(),
                       "preprocessed": self._preprocessed.qsize(),
                       "inferred": self._inferred.qsize()},
        }
        if self._pulled is not None:  # several cameras
            message["sources"] = self._per_source(self._pulled.per_source())
        if self.precision is not None:
            message["precision"] = self.precision
        readings = self.readings()
        if readings:
            message["jetson"] = readings
        for provider in self._stats_providers:
            message.update(provider())
        return message

    def _dropped(self) -> int:
        """Frames dropped here and, with several sources, in their own queues."""
        sources = self._pulled.feeds if self._pulled is not None else []
        return self._counters.dropped + sum(feed.dropped for feed in sources)

    def _captured_depth(self) -> int:
        sources = self._pulled.feeds if self._pulled is not None else []
        return self._captured.qsize() + sum(feed.waiting.qsize() for feed in sources)

    def _per_source(self, sections: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
        """Each source's section with its published fps since the last stats message and its
        capture -> publish latency percentiles over those frames."""
        now = time.monotonic()
        for name, section in sections.items():
            published = self._source_frames.get(name, 0)
            since, before = self._source_rate.get(name, (self.started, 0))
            self._source_rate[name] = (now, published)
            section["fps"] = round((published - before) / (now - since), 2) if now > since else 0.0
            stats = self.source_stats.get(name)
            total = stats.percentiles(last=max(1, published - before)).get("total") \
                if stats is not None else None
            section["latency_ms"] = {key: total[key] for key in ("p50", "p99")} if total else {}
        return sections

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
            dropped=self._dropped(),
            decode_errors=self.source.decode_errors,
            reconnects=self.source.reconnects,
            backend=self.backend.kind,
            source=self.source_name,
            stopped_by=self.stopped_by,
            batch_size=self.batch_size,
            sources=self._source_summary() if self._pulled is not None else {},
        )

    def _source_summary(self) -> Dict[str, Dict[str, Any]]:
        summary: Dict[str, Dict[str, Any]] = {}
        for name, stats in self.source_stats.items():
            total = stats.percentiles().get("total", {})
            summary[name] = {"frames": self._source_frames.get(name, 0),
                             "latency_ms": {key: total[key] for key in ("p50", "p99")
                                            if key in total}}
        return summary


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
