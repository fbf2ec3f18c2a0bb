"""The MQTT sink: paho-mqtt 2.x, QoS 1, persistent session, TLS, and a spool so nothing is lost.

Flow of one message (all on the sink's thread except the paho callbacks):

1. ``write``: the batch is appended to the SQLite outbox (``Spool``) in one transaction.
2. ``_hand_over``: while connected, the oldest rows not yet given to paho are published, at most
   ``WINDOW`` unacknowledged at a time; ``mid -> row id`` is remembered.
3. ``on_publish`` (paho's thread) only records the mid; ``_apply_acks`` deletes those rows.

paho keeps what it was given and re-sends it itself after a reconnect (same process); after a
restart ``_last_handed`` starts at 0, so every row left in the outbox is sent again, oldest first.
Either way a message may arrive twice, never zero times: consumers de-duplicate by ``seq``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional

from device.errors import JetyoloError
from device.message import available_topic
from device.sinks.base import Outgoing, Sink, SinkOptions
from device.sinks.spool import Spool
from device.sinks.urls import SinkUrl

logger = logging.getLogger(__name__)

WINDOW = 256  # rows handed to paho and not yet acknowledged
PAHO_INFLIGHT = 128  # paho sends at most this many before waiting for PUBACKs
ACK_POLL_S = 0.002  # how often to look for PUBACKs while messages are in flight
PROBE_TIMEOUT_S = 3.0
AUTH_REASONS = (134, 135)  # "Bad user name or password", "Not authorized" (MQTT 5 numbering)
SPOOL_WARN_INTERVAL_S = 30.0
OLDEST_REFRESH_S = 1.0  # how often the sink's thread looks up the oldest spooled message


def _import_paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError as err:
        raise JetyoloError(
            "MQTT sinks need paho-mqtt 2.x: pip install 'paho-mqtt>=2.0' (or jetyolo[device])"
        ) from err
    if not hasattr(mqtt, "CallbackAPIVersion"):
        raise JetyoloError("paho-mqtt is older than 2.0: pip install --upgrade 'paho-mqtt>=2.0'")
    return mqtt


def make_ssl_context(
    ca: Optional[Path], cert: Optional[Path], key: Optional[Path]
) -> ssl.SSLContext:
    """A verifying client context: ``ca`` (or the system CAs) plus an optional client cert."""
    for flag, path in (("--mqtt-ca", ca), ("--mqtt-cert", cert), ("--mqtt-key", key)):
        if path is not None and not path.is_file():
            raise JetyoloError(f"{flag} {path} does not exist or is not a file")
    if key is not None and cert is None:
        raise JetyoloError("--mqtt-key was given without --mqtt-cert: pass both or neither")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (ssl.SSLError, OSError) as err:
        raise JetyoloError(
            f"cannot load the MQTT TLS files (ca={ca}, cert={cert}, key={key}): {err}"
        ) from err
    return context


def describe_connect_failure(host: str, port: int, context: Optional[ssl.SSLContext]) -> str:
    """Why a connection fails, found by trying TCP and then TLS ourselves (paho does not say)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw:
            if context is None:
                return "TCP connects, but the MQTT handshake failed"
            try:
                with context.wrap_socket(raw, server_hostname=host):
                    return "TLS works, but the MQTT handshake failed"
            except ssl.SSLCertVerificationError as err:
                return (
                    f"TLS certificate check failed ({err.verify_message}): is --mqtt-ca the CA "
                    f"that signed the broker's certificate for {host!r}?"
                )
            except (ssl.SSLError, OSError) as err:
                return f"TLS handshake failed ({err}): does the port speak TLS (mqtts)?"
    except socket.gaierror as err:
        return f"cannot resolve host {host!r} ({err.strerror})"
    except OSError as err:
        return f"unreachable ({err.strerror or err})"


class MqttSink(Sink):
    handles_availability = True

    @classmethod
    def from_url(cls, url: SinkUrl, options: SinkOptions, spool_path: Path) -> Sink:
        return cls(url, options, spool_path)

    def __init__(self, url: SinkUrl, options: SinkOptions, spool_path: Path) -> None:
        super().__init__(url.name, options.queue_size)
        self._url = url
        self._qos = options.qos
        self._keepalive = options.keepalive_s
        self._availability = available_topic(options.prefix, options.device_id)
        self._announcements = list(options.announcements)
        self._context = (
            make_ssl_context(options.mqtt_ca, options.mqtt_cert, options.mqtt_key)
            if url.tls
            else None
        )
        self._spool = Spool(spool_path, url.name, options.spool_max_messages)
        self._inflight: Dict[int, int] = {}  # paho mid -> outbox row id
        self._acked: Deque[int] = collections.deque()  # mids, appended by paho's thread
        self._last_handed = 0  # highest outbox row id given to paho in this process
        self._connected = threading.Event()
        self._online = threading.Event()  # go_online was called: "online" at every connect
        self._spool_warned_at = float("-inf")
        self._oldest_time: Optional[float] = None  # of the oldest spooled message
        self._oldest_checked_at = float("-inf")
        self.last_error: Optional[str] = None
        self._last_logged: Optional[str] = None
        self._client = self._make_client(options)

    # ---- setup -------------------------------------------------------------------------
    def _make_client(self, options: SinkOptions) -> Any:
        mqtt = _import_paho()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=options.mqtt_client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        if self._url.username:
            client.username_pw_set(self._url.username, self._url.password)
        if self._context is not None:
            client.tls_set_context(self._context)
        client.will_set(self._availability, "offline", qos=1, retain=True)
        client.reconnect_delay_set(options.reconnect_min_s, options.reconnect_max_s)
        client.max_inflight_messages_set(PAHO_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        return client

    def start(self) -> None:
        if self._spool.depth:
            logger.info("%s: %d message(s) left in the spool will be sent first",
                        self.name, self._spool.depth)
        self._client.connect_async(self._url.host, self._url.port, keepalive=self._keepalive)
        self._client.loop_start()
        super().start()

    # ---- paho callbacks (paho's network thread) ----------------------------------------
    def _on_connect(self, client: Any, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            auth = reason.value in AUTH_REASONS
            hint = " - check user:password in the --sink URL" if auth else ""
            self._note_problem(f"broker refused the connection: {str(reason).lower()}{hint}", True)
            return
        self.last_error = self._last_logged = None
        self._connected.set()
        if self._online.is_set():
            client.publish(self._availability, "online", qos=1, retain=True)
        for message in self._announcements:  # acks carry no outbox row: _apply_acks skips them
            client.publish(message.topic, message.payload, qos=1, retain=message.retain)
        logger.info("%s: connected (session present: %s); %d message(s) spooled",
                    self.name, bool(flags.session_present), self._spool.depth)

    def go_online(self) -> None:
        # Set before reading _connected (and _on_connect sets _connected before reading
        # _online): a connect racing this call publishes "online" twice at worst, never not.
        self._online.set()
        if self._connected.is_set():
            self._client.publish(self._availability, "online", qos=1, retain=True)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and not self._stopping.is_set():
            self._note_problem(f"connection lost ({reason}); spooling and reconnecting", False)

    def _on_connect_fail(self, _client: Any, _userdata: Any) -> None:
        why = describe_connect_failure(self._url.host, self._url.port, self._context)
        self._note_problem(why, why.startswith("TLS"))

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
        self._acked.append(mid)

    def _note_problem(self, why: str, is_config_error: bool) -> None:
        """Remember the problem for the stats; log it once, not at every retry."""
        self.last_error = why
        if why == self._last_logged:
            return
        self._last_logged = why
        level = logging.ERROR if is_config_error else logging.WARNING
        logger.log(level, "MQTT %s: %s (messages stay in the spool %s; retrying)",
                   self.name, why, self._spool.path)

    # ---- the sink's thread -------------------------------------------------------------
    def write(self, messages: List[Outgoing]) -> None:
        dropped = self._spool.append(messages)
        if dropped and time.monotonic() - self._spool_warned_at > SPOOL_WARN_INTERVAL_S:
            self._spool_warned_at = time.monotonic()
            logger.warning("%s: spool full (%d messages): dropped the oldest, %d so far",
                           self.name, self._spool.max_messages, self._spool.dropped)
        self._pump()

    def idle(self) -> None:
        self._pump()

    def _pump(self) -> None:
        self._apply_acks()
        if self._connected.is_set():
            self._hand_over()
            self._apply_acks()
        if time.monotonic() - self._oldest_checked_at >= OLDEST_REFRESH_S:
            # On this thread: the spool's connection is this thread's; depth() only reads it.
            self._oldest_checked_at = time.monotonic()
            self._oldest_time = self._spool.oldest_timestamp() if self._spool.depth else None

    def _apply_acks(self) -> None:
        row_ids = []
        while self._acked:
            row_id = self._inflight.pop(self._acked.popleft(), None)
            if row_id is not None:  # None: the availability message, not an outbox row
                row_ids.append(row_id)
        self._spool.remove(row_ids)

    def _hand_over(self) -> None:
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        for row in self._spool.pending(self._last_handed, room):
            info = self._client.publish(row.topic, row.payload, qos=self._qos, retain=row.retain)
            # MQTT_ERR_NO_CONN (4): paho keeps QoS 1/2 messages for the reconnect, drops QoS 0
            if info.rc != 0 and not (info.rc == 4 and self._qos > 0):
                logger.debug("%s: paho did not take row %d (rc %s)", self.name, row.row_id, info.rc)
                return
            self._inflight[info.mid] = row.row_id
            self._last_handed = row.row_id

    def wait_s(self) -> float:
        # PUBACKs do not wake this thread: while some are due, or rows wait for room in the
        # window, look again soon instead of sleeping the full idle wait.
        if self._connected.is_set() and (self._inflight or self._spool.depth):
            return ACK_POLL_S
        return self.idle_wait_s

    def finished(self) -> bool:
        return self._spool.depth == 0 and not self._inflight

    def depth(self) -> Dict[str, Any]:
        depth = super().depth()
        depth.update(
            spool=self._spool.depth,
            spool_dropped=self._spool.dropped,
            spool_oldest_age_s=self.spool_oldest_age_s(),
            connected=self._connected.is_set(),
            last_error=self.last_error,
        )
        return depth

    def spool_oldest_age_s(self) -> float:
        """How long the oldest unacknowledged message has waited (0: spool empty), refreshed
        every ``OLDEST_REFRESH_S``."""
        oldest = self._oldest_time
        if oldest is None or not self._spool.depth:
            return 0.0
        return round(max(0.0, time.time() - oldest), 3)

    def request_stop(self, deadline: float) -> None:
        # Keep the last half second for "offline" and a clean disconnect.
        super().request_stop(deadline - 0.5)

    def close(self) -> None:
        if self._connected.is_set():
            info = self._client.publish(self._availability, "offline", qos=1, retain=True)
            # RuntimeError: disconnected meanwhile, and the broker publishes the will instead
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=0.5)
        self._client.disconnect()
        self._client.loop_stop()
        if self._spool.depth:
            logger.warning("%s: %d message(s) not acknowledged yet stay in %s for the next start",
                           self.name, self._spool.depth, self._spool.path)
        self._spool.close()
