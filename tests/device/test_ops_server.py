"""The HTTP endpoint with a fake run behind it: every route, the 401s, the preview stream, and
the page's escaping."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import pytest
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families

from device.detections import Detections, FrameResult
from device.ops.access import plan_access
from device.ops.metrics import RunMetrics, RunSnapshot, SourceCounters
from device.ops.preview import PreviewHub
from device.ops.server import OpsEndpoint, OpsView, health_report

Reply = Tuple[int, Dict[str, str], bytes]


class FakeRun:
    def __init__(self) -> None:
        self.counters = SourceCounters("gate <b>", frames=5, seconds_since_progress=0.5)
        self.stats: Optional[dict] = None
        self.previews = PreviewHub(["thing"], max_fps=0)
        self.running = True

    def snapshot(self) -> RunSnapshot:
        return RunSnapshot(sources=[self.counters])

    def view(self) -> OpsView:
        return OpsView("jetyolo test", RunMetrics(self.snapshot, process=False), self.previews,
                       self.snapshot, lambda: self.stats, 30.0, lambda: self.running)

    def frames(self, stop: threading.Event) -> None:
        image = np.full((96, 128, 3), 80, np.uint8)
        detections = Detections(np.array([[10, 10, 60, 50]], np.float32),
                                np.array([0.8], np.float32), np.array([0], np.int32))
        index = 0
        while not stop.is_set():
            self.previews.offer(image, FrameResult(self.counters.name, index, 0.0, (128, 96),
                                                   detections))
            index += 1
            time.sleep(0.02)


def get(endpoint: OpsEndpoint, path: str, headers: Optional[Dict[str, str]] = None) -> Reply:
    host, port = endpoint.address
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), body


@pytest.fixture
def run() -> Iterator[Tuple[FakeRun, OpsEndpoint]]:
    fake = FakeRun()
    stop = threading.Event()
    feeder = threading.Thread(target=fake.frames, args=(stop,), daemon=True)
    feeder.start()
    with OpsEndpoint(plan_access("127.0.0.1:0"), fake.view()) as endpoint:
        yield fake, endpoint
    stop.set()
    feeder.join(2)


def test_routes(run: Tuple[FakeRun, OpsEndpoint]) -> None:
    fake, endpoint = run
    status, headers, body = get(endpoint, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {s.name: s.value for f in text_string_to_metric_families(body.decode())
             for s in f.samples}
    assert names["jetyolo_frames_total"] == 5

    assert get(endpoint, "/api/stats")[0] == 503
    fake.stats = {"type": "stats", "fps": 12.5}
    status, _, body = get(endpoint, "/api/stats")
    assert status == 200 and json.loads(body) == {"type": "stats", "fps": 12.5}

    status, headers, page = get(endpoint, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"gate &lt;b&gt;" in page and b"<b>" not in page.replace(b"<body>", b"")
    assert b'src="preview/gate_b.mjpg"' in page
    assert b"http://" not in page and b"https://" not in page  # no external assets

    assert get(endpoint, "/nothing")[0] == 404
    assert get(endpoint, "/preview/other.jpg")[0] == 404
    host, port = endpoint.address
    connection = http.client.HTTPConnection(host, port, timeout=5)
    connection.request("POST", "/metrics", body=b"x")
    assert connection.getresponse().status == 405


def test_health(run: Tuple[FakeRun, OpsEndpoint]) -> None:
    fake, endpoint = run
    status, _, body = get(endpoint, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    fake.counters.seconds_since_progress = 31.0
    status, _, body = get(endpoint, "/healthz")
    assert status == 503
    assert json.loads(body)["reason"] == "gate <b>: no frame for 31.0 s (window 30 s)"
    fake.counters.seconds_since_progress = None
    assert json.loads(get(endpoint, "/healthz")[2])["reason"] == "gate <b>: no frame yet"
    fake.counters.seconds_since_progress = 0.1
    fake.running = False
    assert get(endpoint, "/healthz")[0] == 503


def test_health_report_needs_every_source() -> None:
    fresh, stale = SourceCounters("a", seconds_since_progress=1.0), SourceCounters(
        "b", seconds_since_progress=40.0)
    assert health_report([fresh], 30.0, True).healthy
    report = health_report([fresh, stale], 30.0, True)
    assert not report.healthy and report.reason.startswith("b: no frame for 40.0 s")
    assert not health_report([], 30.0, True).healthy


def test_single_preview_frame(run: Tuple[FakeRun, OpsEndpoint]) -> None:
    fake, endpoint = run
    status, headers, body = get(endpoint, "/preview/gate_b.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert body[:2] == b"\xff\xd8" and int(headers["X-Frame-Index"]) >= 0
    channel = fake.previews.channel("gate <b>")
    # the handler lets go of its viewer after the body is sent: the client can be faster
    assert wait_until(lambda: channel.viewers == 0, timeout=10)
    assert channel.encoded >= 1


def test_mjpeg_stream_updates_and_stops_costing_when_left(
        run: Tuple[FakeRun, OpsEndpoint]) -> None:
    fake, endpoint = run
    host, port = endpoint.address
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", "/preview/gate_b.mjpg")
    response = connection.getresponse()
    assert response.getheader("Content-Type") == "multipart/x-mixed-replace; boundary=jetyoloframe"
    indices = []
    for _ in range(3):
        assert response.fp.readline() == b"--jetyoloframe\r\n"
        part = {}
        while (line := response.fp.readline().decode().strip()):
            key, _, value = line.partition(":")
            part[key.strip()] = value.strip()
        jpeg = response.fp.read(int(part["Content-Length"]))
        assert jpeg[:2] == b"\xff\xd8"
        response.fp.readline()
        indices.append(int(part["X-Frame-Index"]))
    assert indices == sorted(indices) and len(set(indices)) == 3  # the picture moves on
    channel = fake.previews.channel("gate <b>")
    assert channel.viewers == 1
    response.close()  # the viewer leaves (the response holds the socket too)
    connection.close()
    # the server sees the viewer gone at its next write, once the feeder offers a frame: a
    # generous bound for a loaded machine (5 s was the old one)
    assert wait_until(lambda: channel.viewers == 0, timeout=30)
    encoded, offered = channel.encoded, channel.offered
    time.sleep(0.3)  # the feeder offers ~15 frames meanwhile: none is kept or encoded
    assert (channel.encoded, channel.offered) == (encoded, offered)


def test_credentials(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("right-token\n")
    token.chmod(0o600)
    users = tmp_path / "users"
    users.write_text("admin:pw\n")
    users.chmod(0o600)
    plan = plan_access("127.0.0.1:0", token_file=token, basic_auth_file=users)
    with OpsEndpoint(plan, FakeRun().view()) as endpoint:
        status, headers, body = get(endpoint, "/metrics")
        assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="jetyolo"'
        assert b"right-token" not in body
        assert get(endpoint, "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(endpoint, "/", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(endpoint, "/metrics", {"Authorization": "Bearer right-token"})[0] == 200
        basic = "Basic " + base64.b64encode(b"admin:pw").decode()
        assert get(endpoint, "/healthz", {"Authorization": basic})[0] == 200


def test_port_in_use_is_one_line() -> None:
    with OpsEndpoint(plan_access("127.0.0.1:0"), FakeRun().view()) as first:
        port = first.address[1]
        from device.errors import JetyoloError

        with pytest.raises(JetyoloError, match=f"cannot listen on http://127.0.0.1:{port}"):
            OpsEndpoint(plan_access(f"127.0.0.1:{port}"), FakeRun().view()).start()
