"""What every sink shares: the options, the outgoing message, and a thread behind a bounded queue.

A sink never runs on the caller's thread. ``Sink.submit`` is a ``put_nowait`` on a bounded queue:
when the queue is full the message is dropped and counted (``dropped`` in the stats), so a slow
sink shows up as queue depth and drops, never as a slower inference loop.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from device.errors import JetyoloError

logger = logging.getLogger(__name__)

# "events": no detections messages, only tracking events and zone counts (low-bandwidth links)
REPORT_MODES = ("every", "non-empty", "max-rate", "events")
_TOPIC_LEVEL = re.compile(r"^[^/+#\s]+$")
_TOPIC_PREFIX = re.compile(r"^[^+#\s]+$")


def is_topic_level(text: str) -> bool:
    """True when ``text`` can be one MQTT topic level (no '/', '+', '#', spaces)."""
    return bool(_TOPIC_LEVEL.match(text))


def default_device_id() -> str:
    """The host name as a topic-safe device id (``jetson-01``)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", socket.gethostname()) or "jetyolo"


def default_spool_dir() -> Path:
    home = os.environ.get("JETYOLO_HOME") or os.path.join(os.path.expanduser("~"), ".jetyolo")
    return Path(home) / "spool"


def _optional_path(value: Any) -> Optional[Path]:
    return None if value in (None, "") else Path(value).expanduser()


@dataclass
class SinkOptions:
    """Everything the sinks need besides their URLs. ``None`` means the default."""

    device_id: str = field(default_factory=default_device_id)
    prefix: str = "jetyolo"
    class_names: Sequence[str] = ()
    model_id: str = ""
    spool_dir: Path = field(default_factory=default_spool_dir)
    spool_max_messages: int = 100_000
    report: str = "every"  # "every" | "non-empty" | "max-rate" | "events"
    max_rate_hz: float = 0.0  # frames per second per source, for report="max-rate"
    source_reports: Mapping[str, str] = field(default_factory=dict)  # a source's own report
    mqtt_ca: Optional[Path] = None
    mqtt_cert: Optional[Path] = None
    mqtt_key: Optional[Path] = None
    qos: int = 1
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    stats_interval_s: float = 10.0  # read by the runtime, which calls SinkSet.publish_stats
    queue_size: int = 1000  # per sink, messages held in memory before the sink takes them
    client_id: Optional[str] = None  # MQTT client id; default "jetyolo-<device_id>"
    # Retained messages every MQTT sink publishes at each connection, after "online" (Home
    # Assistant discovery configs: a broker that lost its retained messages gets them again).
    announcements: Sequence[Outgoing] = ()

    def __post_init__(self) -> None:
        self.spool_dir = Path(self.spool_dir).expanduser()
        self.mqtt_ca = _optional_path(self.mqtt_ca)
        self.mqtt_cert = _optional_path(self.mqtt_cert)
        self.mqtt_key = _optional_path(self.mqtt_key)
        self.class_names = list(self.class_names)
        self.check()

    def check(self) -> None:
        """Refuse inconsistent options (again after a caller changed them)."""
        for problem in self._problems():
            raise JetyoloError(problem)

    def _problems(self) -> List[str]:
        problems = []
        if not _TOPIC_LEVEL.match(self.device_id):
            problems.append(
                f"device id {self.device_id!r} cannot be an MQTT topic level: "
                "use letters, digits, '-', '_' or '.' (no '/', '+', '#', spaces)"
            )
        if not _TOPIC_PREFIX.match(self.prefix) or self.prefix.startswith("/"):
            problems.append(
                f"topic prefix {self.prefix!r} must not be empty or hold '+', '#', spaces"
            )
        for source, mode in {"": self.report, **self.source_reports}.items():
            where = f"source {source!r}: " if source else ""
            if mode not in REPORT_MODES:
                problems.append(f"{where}report mode {mode!r} is not one of "
                                f"{', '.join(REPORT_MODES)}")
            elif mode == "max-rate" and not self.max_rate_hz > 0:
                problems.append(f"{where}report mode 'max-rate' needs a max rate above 0 "
                                "frames/s (report_max_rate_hz)")
        if self.qos not in (0, 1, 2):
            problems.append(f"MQTT QoS must be 0, 1 or 2, got {self.qos}")
        if self.spool_max_messages < 1 or self.queue_size < 1:
            problems.append("spool size and queue size must be at least 1 message")
        if self.keepalive_s < 5 or not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            problems.append(
                "MQTT keepalive must be >= 5 s and 0 < reconnect min <= reconnect max seconds"
            )
        return problems

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"jetyolo-{self.device_id}"


@dataclass(frozen=True)
class Outgoing:
    """One message, serialised once and shared by every sink."""

    topic: str
    payload: bytes  # UTF-8 JSON, except plain-text state payloads (json_payload=False)
    seq: int = 0  # 0 for state messages (availability) that carry no sequence number
    retain: bool = False
    json_payload: bool = True

    def envelope_line(self) -> bytes:
        """``{"topic": ..., "payload": ...}`` + newline: the socket and file sinks' format."""
        topic = json.dumps(self.topic, ensure_ascii=False).encode("utf-8")
        payload = self.payload if self.json_payload else json.dumps(self.payload.decode()).encode()
        return b'{"topic":' + topic + b',"payload":' + payload + b"}\n"


class Sink:
    """A destination with its own thread. Subclasses implement ``write`` (and maybe ``close``)."""

    idle_wait_s = 0.05  # how long the thread waits for a message before it looks at its state
    handles_availability = False  # True: the sink publishes online/offline itself (MQTT will)

    @classmethod
    def from_url(cls, url: Any, options: SinkOptions, spool_path: Path) -> Sink:
        """The sink for a parsed ``SinkUrl`` (``device.sinks.urls.SINK_KINDS`` names the class
        for each scheme). Most sinks need only the URL and the options."""
        return cls(url, options)  # type: ignore[arg-type]

    def __init__(self, name: str, queue_size: int) -> None:
        self.name = name
        self.dropped = 0  # queue full (counted by the publishing thread)
        self.failed = 0  # could not be sent (counted by the sink's own thread)
        self.submitted = 0  # accepted by submit
        self.handled = 0  # taken off the queue and written/spooled (or failed)
        self._queue: queue.Queue[Outgoing] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._main, name=f"sink {name}", daemon=True)

    # ---- called from the publishing side -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, message: Outgoing) -> bool:
        """Queue ``message`` without waiting; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1
            return False
        self.submitted += 1
        return True

    def depth(self) -> Dict[str, Any]:
        return {"queue": self._queue.qsize(), "dropped": self.dropped + self.failed}

    def go_online(self) -> None:
        """The first inference result exists: a sink that ``handles_availability`` says
        ``online`` now (and at every reconnect from now on); the others get it as a message."""

    def request_stop(self, deadline: float) -> None:
        """Finish what is queued (until ``deadline``, a ``time.monotonic()`` value), then stop."""
        self._deadline = deadline
        self._stopping.set()

    def join(self, deadline: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    # ---- the sink's own thread ----------------------------------------------------------
    def write(self, messages: List[Outgoing]) -> None:
        raise NotImplementedError

    def idle(self) -> None:
        """Called between batches (and when nothing arrived): housekeeping such as accepting."""

    def wait_s(self) -> float:
        """How long the thread may wait for new messages before it runs ``idle`` again."""
        return self.idle_wait_s

    def finished(self) -> bool:
        """Whether the sink may stop once its queue is empty (the MQTT sink waits for acks)."""
        return True

    def close(self) -> None:
        """Release what the sink holds (sockets, files); runs on the sink's thread at the end."""

    def take(self, wait_s: float, limit: int = 512) -> List[Outgoing]:
        """Up to ``limit`` queued messages, waiting at most ``wait_s`` for the first one."""
        try:
            batch = [self._queue.get(timeout=wait_s)] if wait_s > 0 else [self._queue.get_nowait()]
        except queue.Empty:
            return []
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _main(self) -> None:
        try:
            while True:
                batch = self.take(self.wait_s())
                if batch:
                    self._write_safely(batch)
                self.idle()
                drained = self._stopping.is_set() and self._queue.empty()
                if drained and (self.finished() or time.monotonic() >= self._deadline):
                    break
        finally:
            try:
                self.close()
            except Exception:
                logger.exception("%s: error while closing", self.name)

    def _write_safely(self, batch: List[Outgoing]) -> None:
        try:
            self.write(batch)
        except Exception:
            # A bug or an unexpected OS error in one sink must not stop the others (or this one).
            self.failed += len(batch)
            logger.exception("%s: could not send %d message(s)", self.name, len(batch))
        finally:
            self.handled += len(batch)
