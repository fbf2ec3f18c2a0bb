"""``SinkSet``: the one object the runtime publishes to, and ``open_sinks`` that builds it.

The inference loop calls ``publish_frame``: a report-policy check and a ``put_nowait``, nothing
else. A dispatcher thread numbers each message (``seq``), builds and serialises it once, and puts
it on every sink's own queue. Each sink sends from its own thread.

Availability: the sinks announce the device ``online`` only once the first inference result
arrived (the first ``publish_frame``, reported or not), so a model that fails to load or to run
never says ``online``; ``offline`` is sent at close either way.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from device.detections import FrameResult
from device.errors import JetyoloError
from device.events import build_event_message, build_zone_message, events_topic, zone_topic
from device.message import (
    available_topic,
    build_frame_message,
    build_stats_message,
    detections_topic,
    encode,
    stats_topic,
)
from device.sinks.base import Outgoing, Sink, SinkOptions
from device.sinks.spool import SeqCounter, SpoolLock, prepare_spool_dir
from device.sinks.urls import KIND_BY_NAME, SinkUrl, parse_sink_url
from device.tracking_stage import TrackedFrame

logger = logging.getLogger(__name__)

# ("frame", FrameResult, 0), ("stats", dict, wall time) or ("events", TrackedFrame, 0)
_Item = Tuple[str, Any, float]


class ReportPolicy:
    """Which frames become messages: every frame, frames with detections, or at most N/s.

    "non-empty" also reports the first empty frame after a non-empty one, so a consumer sees
    objects leave. "max-rate" spaces messages by capture time, per source.
    """

    def __init__(
        self, mode: str, max_rate_hz: float = 0.0, per_source: Optional[Mapping[str, str]] = None
    ) -> None:
        self.mode = mode
        self.per_source = dict(per_source or {})  # a source's own mode (``sources:`` report)
        self._min_gap_s = 1.0 / max_rate_hz if max_rate_hz > 0 else 0.0
        self._last_sent: Dict[str, float] = {}
        self._last_nonempty: Dict[str, bool] = {}
        self._lock = threading.Lock()

    def should_report(self, result: FrameResult) -> bool:
        mode = self.per_source.get(result.source, self.mode)
        if mode == "every":
            return True
        if mode == "events":
            return False
        with self._lock:
            if mode == "non-empty":
                has_detections = len(result.detections) > 0
                had_detections = self._last_nonempty.get(result.source, False)
                self._last_nonempty[result.source] = has_detections
                return has_detections or had_detections
            last = self._last_sent.get(result.source)
            # 1 µs slack so 10 Hz timestamps at exactly 0.1 s spacing are not skipped by rounding
            if last is not None and 0 <= result.timestamp - last < self._min_gap_s - 1e-6:
                return False
            self._last_sent[result.source] = result.timestamp
            return True


class SinkSet:
    """Sinks behind one non-blocking front. Use as a context manager, or call ``close``."""

    def __init__(
        self, sinks: List[Sink], options: SinkOptions, seq: SeqCounter, lock: SpoolLock
    ) -> None:
        self.sinks = sinks
        self.options = options
        self._seq = seq
        self._lock = lock
        self._policy = ReportPolicy(options.report, options.max_rate_hz, options.source_reports)
        self._intake: queue.Queue[_Item] = queue.Queue(maxsize=options.queue_size)
        self._stopping = threading.Event()
        self._first_result = threading.Event()  # set by the publishing thread, once
        self._online_due = False  # the publishing thread's own flag for it
        self._online = False  # announced (the dispatcher's own flag)
        self._dispatcher = threading.Thread(target=self._dispatch, name="sinks", daemon=True)
        self._closed = False
        self.frames_reported = 0
        self.frames_skipped = 0
        self.intake_dropped = 0  # counted by the publishing thread
        self.build_errors = 0  # counted by the dispatcher (each thread owns its counter)
        self.last_stats: Optional[Dict[str, Any]] = None  # the latest stats message (HTTP)

    # ---- the publishing side (inference loop) ------------------------------------------
    def publish_frame(self, result: FrameResult) -> None:
        """Report one frame. Never blocks: a full queue drops the frame and counts it."""
        if self._closed:
            return
        if not self._online_due:
            self._online_due = True  # one bool per frame; the Event is set once
            self._first_result.set()
        if not self._policy.should_report(result):
            self.frames_skipped += 1
            return
        self._put(("frame", result, 0.0))

    def publish_events(self, tracked: TrackedFrame) -> None:
        """Send a frame's tracking events and changed zone counts (in every report mode).
        Never blocks, like ``publish_frame``."""
        if not self._closed and (tracked.events or tracked.changed_zones):
            self._put(("events", tracked, 0.0))

    def publish_stats(self, stats: Mapping[str, Any]) -> None:
        """Send a stats message; the sinks' ``depths()`` are added as ``sinks``."""
        if not self._closed:
            self._put(("stats", dict(stats), time.time()))

    def _put(self, item: _Item) -> None:
        try:
            self._intake.put_nowait(item)
        except queue.Full:
            self.intake_dropped += 1

    def depths(self) -> Dict[str, Any]:
        """Queue depths, drops and spool depth: what the stats message reports as ``sinks``."""
        return {
            "intake": self._intake.qsize(),
            "intake_dropped": self.intake_dropped + self.build_errors,
            "frames_reported": self.frames_reported,
            "frames_skipped": self.frames_skipped,
            "per_sink": {sink.name: sink.depth() for sink in self.sinks},
        }

    # ---- the dispatcher thread ---------------------------------------------------------
    def start(self) -> None:
        for sink in self.sinks:
            sink.start()
        self._dispatcher.start()

    def _go_online(self) -> None:
        """On the dispatcher, before the first result's messages: ``online`` everywhere."""
        self._online = True
        self._announce("online")
        for sink in self.sinks:
            if sink.handles_availability:
                sink.go_online()

    def _announce(self, state: str) -> None:
        """Availability for the line sinks (the MQTT sink has its own, with a last will)."""
        topic = available_topic(self.options.prefix, self.options.device_id)
        message = Outgoing(topic, state.encode(), retain=True, json_payload=False)
        for sink in self.sinks:
            if not sink.handles_availability:
                sink.submit(message)

    def _dispatch(self) -> None:
        while True:
            item: Optional[_Item]
            try:
                item = self._intake.get(timeout=0.05)
            except queue.Empty:
                item = None
            if not self._online and self._first_result.is_set():
                self._go_online()  # set before the first frame was queued: announced before it
            if item is None:
                if self._stopping.is_set():
                    return
                continue
            try:
                messages = self._build_events(item[1]) if item[0] == "events" else [
                    self._build(item)]
            except Exception:
                self.build_errors += 1
                logger.exception("could not build a %s message", item[0])
                continue
            for message in messages:
                for sink in self.sinks:
                    sink.submit(message)
            if item[0] == "frame":
                self.frames_reported += 1  # after the fan-out: then every sink has it queued

    def _build(self, item: _Item) -> Outgoing:
        kind, value, now = item
        options = self.options
        seq = self._seq.next()
        if kind == "frame":
            body = build_frame_message(value, seq, options)
            topic = detections_topic(options.prefix, options.device_id, value.source)
        else:
            stats = dict(value, sinks=self.depths())
            body = build_stats_message(stats, seq, options, now)
            self.last_stats = body  # one assignment: readers on other threads see old or new
            topic = stats_topic(options.prefix, options.device_id)
        return Outgoing(topic, encode(body), seq)

    def _build_events(self, tracked: TrackedFrame) -> List[Outgoing]:
        """One message per event, then one retained count per changed zone, each its own seq."""
        options, result = self.options, tracked.result
        messages = []
        for event in tracked.events:
            body = build_event_message(event, result, self._seq.next(), options)
            topic = events_topic(options.prefix, options.device_id, result.source)
            messages.append(Outgoing(topic, encode(body), body["seq"]))
        for zone in tracked.changed_zones:
            body = build_zone_message(zone, result, self._seq.next(), options)
            topic = zone_topic(options.prefix, options.device_id, result.source, zone.name)
            messages.append(Outgoing(topic, encode(body), body["seq"], retain=True))
        return messages

    # ---- shutdown ----------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (MQTT: until acknowledged) for up to ``timeout`` s, then stop.

        MQTT messages not acknowledged by then stay in the spool and go out at the next start.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._dispatcher.join(max(0.0, deadline - time.monotonic()))
        dispatcher_done = not self._dispatcher.is_alive()
        self._announce("offline")
        for sink in self.sinks:
            sink.request_stop(deadline)
        stuck = [sink.name for sink in self.sinks if not sink.join(deadline)]
        if stuck:
            logger.warning("sinks still busy after %.1f s, left behind: %s", timeout, stuck)
        if dispatcher_done:
            self._seq.close()
        self._lock.release()

    def __enter__(self) -> SinkSet:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _open_sink(url: SinkUrl, options: SinkOptions, spool_path: Path) -> Sink:
    """The class ``SINK_KINDS`` names for ``url.kind``, imported now (paho only with MQTT)."""
    module, name = KIND_BY_NAME[url.kind].opener.split(":")
    sink_class: Type[Sink] = getattr(importlib.import_module(module), name)
    return sink_class.from_url(url, options, spool_path)


def _check_urls(parsed: Sequence[SinkUrl], options: SinkOptions) -> None:
    names = [url.name for url in parsed]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise JetyoloError(f"--sink given twice: {', '.join(repeated)}; give each sink once")
    tls_files = [options.mqtt_ca, options.mqtt_cert, options.mqtt_key]
    if any(tls_files) and not any(url.kind == "mqtt" and url.tls for url in parsed):
        raise JetyoloError(
            "--mqtt-ca/--mqtt-cert/--mqtt-key apply to TLS brokers only: "
            "use an mqtts:// sink (or drop those flags)"
        )


def check_sinks(urls: Sequence[str], options: SinkOptions) -> List[SinkUrl]:
    """What can be checked without opening a sink: the URLs, repeats, and the TLS files (so a
    typo fails at once, not after a minutes-long engine build). The parsed URLs."""
    parsed = [parse_sink_url(url) for url in urls]
    _check_urls(parsed, options)
    if any(url.kind == "mqtt" and url.tls for url in parsed):
        from device.sinks.mqtt import make_ssl_context  # ssl only; paho is not imported

        make_ssl_context(options.mqtt_ca, options.mqtt_cert, options.mqtt_key)
    return parsed


def open_sinks(urls: Sequence[str], options: SinkOptions) -> SinkSet:
    """Check (``check_sinks``) and open every sink (or none: JetyoloError), start their threads."""
    return open_checked_sinks(check_sinks(urls, options), options)


def open_checked_sinks(parsed: Sequence[SinkUrl], options: SinkOptions) -> SinkSet:
    """Open every sink of what ``check_sinks`` returned (or none: JetyoloError)."""
    spool_path = prepare_spool_dir(options.spool_dir)
    lock = SpoolLock(options.spool_dir)
    lock.acquire()
    opened: List[Sink] = []
    seq: Optional[SeqCounter] = None
    try:
        seq = SeqCounter(spool_path)
        for url in parsed:
            opened.append(_open_sink(url, options, spool_path))
    except BaseException:
        for sink in opened:
            sink.close()
        if seq is not None:
            seq.close()
        lock.release()
        raise
    sinkset = SinkSet(opened, options, seq, lock)
    sinkset.start()
    return sinkset
