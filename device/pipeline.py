"""The loop: capture -> preprocess -> infer -> postprocess/publish, one thread per stage.

::

    capture thread     preprocess thread        inference thread          main thread
    source.frames() -> [captured q] -> slot k <- [free input slots] ...
                                      letterbox into buffer k -> [preprocessed q] ->
                                                 infer(buffer k, out set j) -> slot k freed
                                                 -> [inferred q] -> postprocess, publish,
                                                                    out set j freed, stats

Buffers: the backend allocates ``buffers`` input buffers (a ring; page-locked memory on TensorRT)
and as many output sets. A buffer travels with its frame and returns to a free list only when
the stage that reads it is done, so preprocessing frame k+1 never writes into the buffer that
inference of frame k is reading, and postprocessing of frame k reads outputs that inference of
frame k+1 does not overwrite. No stage allocates model-sized arrays per frame.

Queues are bounded. A file source blocks when the pipeline is behind (no frame is lost); a live
source drops the oldest captured frame instead (counted in ``dropped``). ``request_stop`` (wired to
SIGTERM/SIGINT by ``run_pipeline``) stops capture; the frames already in flight are finished and
published before ``run`` returns. A second signal aborts without draining.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple

import numpy as np

from device.backends import Backend, open_backend
from device.bundle import Bundle
from device.config import RunConfig, optional_path
from device.detections import FrameResult
from device.errors import JetyoloError
from device.jetson_stats import jetson_readings
from device.postprocess import PostprocessConfig, postprocess
from device.preprocess import Letterbox, Preprocessor
from device.sources import CaptureOptions, Frame, Source, default_source_name, open_source
from device.stats import RateMeter, RunSummary, StageStats

if TYPE_CHECKING:
    from device.sdnotify import Notifier

LOG = logging.getLogger(__name__)
POLL_S = 0.1  # how often blocked stages look at the stop/abort flags
JOIN_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 10.0  # frames in flight after a stop are a handful; more means a stuck read
START_OPEN_MARGIN_S = 60.0  # FFmpeg's own connect timeouts are in the tens of seconds


class FrameSink(Protocol):
    """What the pipeline needs of ``device.sinks.SinkSet``."""

    def publish_frame(self, result: FrameResult) -> Any: ...

    def publish_stats(self, stats: Dict[str, Any]) -> Any: ...


class ProgressNotifier(Protocol):
    """What the pipeline needs of ``device.sdnotify.Notifier``."""

    def ready(self, text: Optional[str] = None) -> bool: ...

    def frame_done(self, count: int = 1) -> bool: ...

    def stopping(self, text: Optional[str] = None) -> bool: ...


class StartNotifier(Protocol):
    """What waiting for a camera at start needs of ``device.sdnotify.Notifier``."""

    def status(self, text: str) -> bool: ...

    def extend_timeout(self, seconds: float) -> bool: ...


class _Aborted(Exception):
    """A stage was told to give up (another stage failed, or a second signal came)."""


@dataclass
class _Work:
    frame: Frame
    captured_at: float  # perf_counter when the frame was in hand
    latency_ms: Dict[str, float]
    slot: int = -1
    geometry: Optional[Letterbox] = None
    outputs: Optional[Dict[str, np.ndarray]] = None


@dataclass
class _Counters:
    frames: int = 0
    dropped: int = 0
    first_capture: Optional[float] = None
    last_publish: Optional[float] = None
    errors: List[BaseException] = field(default_factory=list)


_IDLE = _Work(Frame(-1, 0.0, np.zeros((1, 1, 3), np.uint8)), 0.0, {})  # "nothing arrived yet"


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


class Pipeline:
    """One source, one backend, one set of sinks. ``run()`` returns when the source ends, after
    ``max_frames``, or after ``request_stop``; errors in any stage are re-raised there."""

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
    ) -> None:
        if buffers < 2:
            raise ValueError("the pipeline needs at least 2 input buffers to overlap stages")
        self.backend = backend
        self.source = source
        self.source_name = source_name or source.name  # what topics and messages call it
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.postprocess_config = postprocess_config
        self.sinks = sinks
        self.buffers = buffers
        self.max_frames = max_frames
        self.stats_interval_s = stats_interval_s
        self.notifier = notifier
        self.precision = precision  # what the stats message reports (see reported_precision)
        self.readings = readings  # device health for the stats message ({}: none)
        self.started = time.monotonic()
        self.stats = StageStats()
        self.stopped_by = "end of source"
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
        self._input_buffers: List[np.ndarray] = []
        self._preprocessors: List[Preprocessor] = []
        self._input_name = ""
        self._counters = _Counters()
        self._stop_requested_at: Optional[float] = None
        self._lock = threading.Lock()

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
        return thread

    # ---- stages --------------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        frames = self.source.frames(self._stop)
        captured = 0
        while True:
            if self.max_frames is not None and captured >= self.max_frames:
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
            work = self._get(self._captured)
            if work is None:
                self._put(self._preprocessed, None)
                return
            slot = self._get(self._free_inputs)
            started = time.perf_counter()
            work.geometry = self._preprocessors[slot](work.frame.image)
            work.latency_ms["preprocess"] = _ms(started)
            work.slot = slot
            self._put(self._preprocessed, work)

    def _infer_loop(self) -> None:
        self.backend.activate()
        try:
            self._allocate()
            self._ready.set()
            while True:
                work = self._get(self._preprocessed)
                if work is None:
                    self._put(self._inferred, None)
                    break
                outputs = self._get(self._free_outputs)
                started = time.perf_counter()
                self.backend.infer({self._input_name: self._input_buffers[work.slot]}, out=outputs)
                work.latency_ms["infer"] = _ms(started)
                self._free_inputs.put(work.slot)
                work.outputs = outputs
                self._put(self._inferred, work)
            while not self._post_done.wait(POLL_S) and not self._abort.is_set():
                pass  # output arrays may be backend memory: keep it alive until they are read
        finally:
            self.backend.deactivate()

    def _allocate(self) -> None:
        spec = self.backend.input_spec
        expected = Preprocessor.input_shape(self.input_size, spec.dtype.name)
        if tuple(spec.shape) != expected:
            raise JetyoloError(
                f"model input {spec.describe()} does not fit the bundle's preprocess size "
                f"{list(self.input_size)} (expected {list(expected)}); re-export the bundle"
            )
        self._input_name = spec.name
        self._input_buffers = self.backend.allocate_inputs(self.buffers)
        self._preprocessors = [
            Preprocessor(self.input_size, spec.dtype.name, buffer=buffer)
            for buffer in self._input_buffers
        ]
        for slot in range(self.buffers):
            self._free_inputs.put(slot)
            self._free_outputs.put(self.backend.allocate_outputs())

    def _publish(self, work: _Work) -> None:
        started = time.perf_counter()
        outputs = work.outputs if work.outputs is not None else {}
        geometry = work.geometry
        if geometry is None:
            raise RuntimeError("frame reached postprocess without letterbox geometry")
        detections = postprocess(outputs, geometry, self.postprocess_config)
        self._free_outputs.put(outputs)
        image = work.frame.image
        result = FrameResult(
            source=self.source_name,
            frame_index=work.frame.index,
            timestamp=work.frame.timestamp,
            frame_size=(int(image.shape[1]), int(image.shape[0])),
            detections=detections,
            latency_ms=work.latency_ms,
        )
        work.latency_ms["postprocess"] = _ms(started)
        work.latency_ms["total"] = _ms(work.captured_at)
        self.sinks.publish_frame(result)
        self.stats.record(work.latency_ms)
        self._counters.frames += 1
        self._counters.last_publish = time.perf_counter()

    # ---- main ----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Run to the end; returns the summary or raises the first stage error."""
        threads: List[threading.Thread] = []
        self.started = time.monotonic()
        try:
            threads.append(self._stage("infer", self._infer_loop))
            if self._wait_ready(threads[0]):
                threads.append(self._stage("capture", self._capture_loop))
                threads.append(self._stage("preprocess", self._preprocess_loop))
                self._publish_loop()
        except _Aborted:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._post_done.set()
            for thread in threads:
                thread.join(JOIN_TIMEOUT_S)
            self._close_source(threads)
            if self.notifier is not None:
                self.notifier.stopping(f"stopped: {self.stopped_by}")
        self._raise_errors()
        return self.summary()

    def _close_source(self, threads: List[threading.Thread]) -> None:
        capture = [thread for thread in threads if thread.name == "jetyolo-capture"]
        if capture and capture[0].is_alive():
            # Still blocked in a camera read: releasing the device under it can crash OpenCV.
            # The thread is a daemon; the process exit releases the device.
            LOG.warning("pipeline: %s did not return from a read; not closing it", self.source.name)
            return
        self.source.close()

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
            "latency_ms": self.stats.percentiles(last=max(1, int(fps * self.stats_interval_s))),
            "queues": {"captured": self._captured.qsize(),
                       "preprocessed": self._preprocessed.qsize(),
                       "inferred": self._inferred.qsize()},
        }
        if self.precision is not None:
            message["precision"] = self.precision
        readings = self.readings()
        if readings:
            message["jetson"] = readings
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


# ---- from a RunConfig ---------------------------------------------------------------------------


def reported_precision(backend_kind: str, config: RunConfig) -> str:
    """The arithmetic the backend runs: the engine's precision on TensorRT (fp16 unless asked),
    fp32 on ONNX Runtime (the uint8 graph only takes uint8 input), int8 for the Q/DQ graph."""
    if config.variant == "int8-qdq":
        return "int8"
    if backend_kind == "tensorrt":
        return config.precision or "fp16"
    return "fp32"


def postprocess_config(config: RunConfig, bundle: Bundle) -> PostprocessConfig:
    """Thresholds: the config's, else the bundle manifest's."""
    defaults: Mapping[str, Any] = bundle.manifest.get("postprocess", {})
    fallback = PostprocessConfig()
    return PostprocessConfig(
        conf=config.conf if config.conf is not None else float(defaults.get("conf", fallback.conf)),
        iou=config.iou if config.iou is not None else float(defaults.get("iou", fallback.iou)),
        max_det=config.max_det if config.max_det is not None
        else int(defaults.get("max_det", fallback.max_det)),
    )


def source_timeout_s(config: RunConfig, env: Mapping[str, str] = os.environ) -> float:
    """How long a live source may take to open at start: the config's, else forever under
    systemd (``$NOTIFY_SOCKET``: a restart would only burn the start limit) and 0 elsewhere (a
    wrong URL typed at a shell fails at once)."""
    if config.source_timeout_s is not None:
        return config.source_timeout_s
    return float("inf") if env.get("NOTIFY_SOCKET") else 0.0


def capture_options(config: RunConfig, env: Mapping[str, str] = os.environ) -> CaptureOptions:
    return CaptureOptions(
        width=config.capture_width, height=config.capture_height, fps=config.capture_fps,
        rtsp_latency_ms=config.rtsp_latency_ms, reconnect_max_s=config.reconnect_max_s,
        source_timeout_s=source_timeout_s(config, env),
    )


def _default_notifier() -> Notifier:
    from device.sdnotify import Notifier

    return Notifier.from_env()


def start_wait_reporter(notifier: StartNotifier) -> Callable[[str, float], None]:
    """``on_wait`` for ``open_source`` while the unit is still starting (before READY=1):
    ``STATUS=`` names the camera and ``EXTEND_TIMEOUT_USEC`` covers the pause plus one slow
    open, so ``TimeoutStartSec=`` does not kill a process that is only waiting."""

    def report(name: str, pause_s: float) -> None:
        notifier.status(f"waiting for camera {name}")
        notifier.extend_timeout(pause_s + START_OPEN_MARGIN_S)

    return report


def open_configured_backend(config: RunConfig, bundle: Bundle) -> Backend:
    """The (not yet activated) backend, precision, variant and engine cache ``config`` names."""
    return open_backend(
        config.backend, bundle, precision=config.precision, variant=config.variant,
        threads=config.threads, engine_cache_dir=optional_path(config.engine_cache_dir),
        int8_from=config.int8_from,
    )


def open_run(
    config: RunConfig, bundle: Bundle, notifier: Optional[StartNotifier] = None
) -> Tuple[Source, Backend]:
    """The source and (not yet activated) backend ``config`` names; the source first, so a bad
    ``--source`` fails before a minutes-long engine build. A live source that does not open yet
    is waited for (``source_timeout_s``), reported through ``notifier`` (default: from the
    environment)."""
    reporter = start_wait_reporter(notifier if notifier is not None else _default_notifier())
    source = open_source(config.source, capture_options(config), reporter)
    try:
        backend = open_configured_backend(config, bundle)
    except BaseException:
        source.close()
        raise
    return source, backend


def run_pipeline(
    config: RunConfig,
    sinks: FrameSink,
    max_frames: Optional[int] = None,
    *,
    bundle: Optional[Bundle] = None,
    opened: Optional[Tuple[Source, Backend]] = None,
    notifier: Optional[ProgressNotifier] = None,
    handle_signals: bool = True,
) -> RunSummary:
    """Run the bundle, source and backend ``config`` names until the source ends,
    ``max_frames`` (else ``config.max_frames``) frames are done, or SIGTERM/SIGINT.

    ``jetyolo run`` and ``jetyolo bench`` both call this. ``opened`` is what ``open_run``
    returned, for callers that open the source and backend before their sinks. Signals are
    handled only when called from the main thread.
    """
    bundle = bundle or Bundle.load(config.bundle)
    source, backend = opened if opened is not None else open_run(config, bundle)
    pipeline = Pipeline(
        backend, source, bundle.input_size, postprocess_config(config, bundle), sinks,
        buffers=config.buffers,
        max_frames=max_frames if max_frames is not None else config.max_frames,
        stats_interval_s=config.stats_interval_s,
        notifier=notifier if notifier is not None else _default_notifier(),
        precision=reported_precision(backend.kind, config),
        source_name=config.source_name or default_source_name(config.source),
    )
    with _signals_stop(pipeline, handle_signals):
        return pipeline.run()


class _signals_stop:
    """Route SIGTERM/SIGINT to ``pipeline.request_stop`` while the pipeline runs."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, pipeline: Pipeline, enabled: bool) -> None:
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
