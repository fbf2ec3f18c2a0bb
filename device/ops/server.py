"""The HTTP endpoint: the standard library's ``ThreadingHTTPServer`` on its own daemon thread.

Routes: ``/`` (page), ``/metrics`` (Prometheus), ``/healthz`` (200 / 503 + JSON reason),
``/api/stats`` (the latest stats message), ``/preview/<source>.mjpg`` (MJPEG stream) and
``/preview/<source>.jpg`` (one frame). Every request is checked against the credentials first
when there are any (401 otherwise). One thread per connection; a preview stream holds its
thread while it is open, so viewers per source are bounded.

Why not a framework: the device stays lean (no extra dependency, no event loop), the traffic is
one scraper and a viewer or two, and the preview's cost is the JPEG encoding, not the server.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import unquote, urlsplit

from device.errors import JetyoloError
from device.message import encode, topic_segment
from device.ops.access import AccessPlan, Credentials, HttpAddress
from device.ops.metrics import CONTENT_TYPE, RunMetrics, RunSnapshot, SourceCounters
from device.ops.page import render_page
from device.ops.preview import PreviewChannel, PreviewHub

LOG = logging.getLogger(__name__)
BOUNDARY = "jetyoloframe"
MAX_VIEWERS = 4  # per source: each viewer holds a thread and its share of the encoding
FRAME_WAIT_S = 1.0  # how often a stream looks at the closing flag while no frame comes
SINGLE_FRAME_WAIT_S = 5.0


@dataclass
class HealthReport:
    healthy: bool
    reason: str
    sources: Dict[str, Optional[float]]  # source -> seconds since its last frame

    def body(self) -> Dict[str, Any]:
        status = "ok" if self.healthy else "unhealthy"
        ages = {name: None if age is None else round(age, 3) for name, age in self.sources.items()}
        return {"status": status, "reason": self.reason, "seconds_since_last_frame": ages}


def health_report(sources: List[SourceCounters], window_s: float, running: bool) -> HealthReport:
    """Healthy when the run is running and every source published a frame within
    ``window_s`` (the watchdog's window)."""
    ages = {source.name: source.seconds_since_progress for source in sources}
    problems = []
    if not running:
        problems.append("the pipeline is not running")
    if not sources:
        problems.append("no source")
    for name, age in ages.items():
        if age is None:
            problems.append(f"{name}: no frame yet")
        elif age > window_s:
            problems.append(f"{name}: no frame for {age:.1f} s (window {window_s:g} s)")
    return HealthReport(not problems, "; ".join(problems) or "every source progressed", ages)


@dataclass
class OpsView:
    """What the routes read; built by the run (``device.ops.wiring``) or by tests."""

    title: str
    metrics: RunMetrics
    previews: PreviewHub
    snapshot: Callable[[], RunSnapshot]
    stats: Callable[[], Optional[Mapping[str, Any]]]
    health_window_s: float
    running: Callable[[], bool] = lambda: True


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection; streams end with the socket
    server_version = "jetyolo"
    sys_version = ""  # no Python version in the Server header

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("http %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path = unquote(urlsplit(self.path).path)
        view = self.server.view
        if path == "/":
            cameras = [(name, topic_segment(name)) for name in self._source_names()]
            self._send(HTTPStatus.OK, "text/html; charset=utf-8",
                       render_page(view.title, cameras).encode("utf-8"))
        elif path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE, view.metrics.exposition())
        elif path == "/healthz":
            snap = view.snapshot()
            report = health_report(snap.sources, view.health_window_s, view.running())
            status = HTTPStatus.OK if report.healthy else HTTPStatus.SERVICE_UNAVAILABLE
            self._send_json(status, report.body())
        elif path == "/api/stats":
            stats = view.stats()
            if stats is None:
                self._send_json(HTTPStatus.SERVICE_UNAVAILABLE,
                                {"error": "no stats message yet (one every stats_interval_s)"})
            else:
                self._send_json(HTTPStatus.OK, stats)
        elif path.startswith("/preview/"):
            self._preview(path[len("/preview/"):])
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "read-only endpoint"})

    do_PUT = do_DELETE = do_POST

    # ---- helpers ------------------------------------------------------------------------
    def _authorized(self) -> bool:
        credentials = self.server.credentials
        if credentials is None or credentials.allows(self.headers.get("Authorization")):
            return True
        body = encode({"error": "unauthorized"})
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", credentials.challenge())
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return False

    def _source_names(self) -> List[str]:
        names = [source.name for source in self.server.view.snapshot().sources]
        return names or self.server.view.previews.sources()

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
        self._send(status, "application/json", encode(body))

    def _channel(self, key: str) -> Optional[PreviewChannel]:
        for name in self._source_names():
            if topic_segment(name) == key:
                return self.server.view.previews.channel(name)
        return None

    def _preview(self, name: str) -> None:
        key, _, kind = name.rpartition(".")
        channel = self._channel(key) if kind in ("mjpg", "jpg") else None
        if channel is None:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no preview {name}"})
            return
        if channel.viewers >= MAX_VIEWERS:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE,
                            {"error": f"{MAX_VIEWERS} viewers already watch this source"})
            return
        with channel.watching():
            if kind == "jpg":
                self._single_frame(channel)
            else:
                self._stream(channel)

    def _single_frame(self, channel: PreviewChannel) -> None:
        got = channel.next_frame(0, SINGLE_FRAME_WAIT_S)
        if got is None:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE,
                            {"error": f"no frame within {SINGLE_FRAME_WAIT_S:g} s"})
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("X-Frame-Index", str(got[1].index))
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(got[1].jpeg)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(got[1].jpeg)

    def _stream(self, channel: PreviewChannel) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        serial = 0
        try:
            while not self.server.closing.is_set():
                got = channel.next_frame(serial, FRAME_WAIT_S)
                if got is None:
                    continue
                serial, frame = got
                head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                        f"Content-Length: {len(frame.jpeg)}\r\n"
                        f"X-Frame-Index: {frame.index}\r\n\r\n").encode("ascii")
                self.wfile.write(head + frame.jpeg + b"\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            LOG.debug("http: preview viewer %s left", self.address_string())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: HttpAddress, view: OpsView,
                 credentials: Optional[Credentials]) -> None:
        import socket

        self.address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.view = view
        self.credentials = credentials
        self.closing = threading.Event()
        super().__init__((address.host, address.port), _Handler)


class OpsEndpoint:
    """``start()`` binds and serves on a daemon thread; ``close()`` stops it (streams end)."""

    def __init__(self, plan: AccessPlan, view: OpsView) -> None:
        self.plan = plan
        self.view = view
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> Tuple[str, int]:
        if self._server is None:
            return self.plan.address.host, self.plan.address.port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return HttpAddress(host, port).url()

    def start(self) -> OpsEndpoint:
        try:
            self._server = _Server(self.plan.address, self.view, self.plan.credentials)
        except OSError as exc:
            raise JetyoloError(
                f"http: cannot listen on {self.plan.address.url()} ({exc.strerror or exc}); "
                "pick a free port or stop what uses it"
            ) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="jetyolo-http",
                                        daemon=True)
        self._thread.start()
        LOG.info("http: serving %s (/metrics, /healthz, /api/stats, preview at /)%s", self.url,
                 "" if self.plan.credentials is None else " with credentials")
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.closing.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._server = None

    def __enter__(self) -> OpsEndpoint:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.close()
