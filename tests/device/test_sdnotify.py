"""device.sdnotify against a real AF_UNIX datagram socket owned by the test (what systemd
listens on), plus the frame-progress watchdog with a fake clock."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

from device import sdnotify
from device.sdnotify import Notifier, Watchdog, socket_address, watchdog_seconds


@pytest.fixture()
def listener() -> Iterator[Tuple[socket.socket, str]]:
    """A bound datagram socket in a short temp dir (sun_path is limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn") as tmp:
        path = str(Path(tmp) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        try:
            yield sock, path
        finally:
            sock.close()


def received(sock: socket.socket) -> List[str]:
    """Every datagram waiting on ``sock``, without blocking."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return messages


def recorder(sent: List[str]) -> Callable[[str], bool]:
    def send(state: str) -> bool:
        sent.append(state)
        return True

    return send


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ready_status_watchdog_reach_the_socket(listener: Tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("running")
    assert sock.recv(4096) == b"READY=1\nSTATUS=running"
    assert notifier.status("12.5 fps")
    assert sock.recv(4096) == b"STATUS=12.5 fps"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.extend_timeout(1.5)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"
    notifier.close()


def test_abstract_namespace_address() -> None:
    name = f"@jetyolo-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.settimeout(2)
    try:
        assert Notifier.from_env({"NOTIFY_SOCKET": name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog() and not notifier.frame_done()


def test_a_vanished_socket_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier("/nonexistent/jetyolo/notify")
    assert notifier.ready() is False
    assert "sd_notify" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "4000000"}, 4.0),  # armed, no pid restriction
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}, 4.0),  # for us
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None),  # disabled
        ({"WATCHDOG_USEC": "soon"}, None),  # garbage
        ({}, None),  # no watchdog
    ],
)
def test_watchdog_seconds(env: dict, expected: object) -> None:
    assert watchdog_seconds(env) == expected


def test_socket_address() -> None:
    assert socket_address("@x") == "\0x"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_watchdog_pings_only_while_frames_progress() -> None:
    sent: List[str] = []
    clock = FakeClock()
    dog = Watchdog(recorder(sent), timeout_s=2.0, clock=clock)
    # 10 fps for 3 s: a ping at most every 1 s (half the timeout), each with the FPS.
    for _ in range(30):
        clock.now += 0.1
        dog.frame_done()
    pings = [s for s in sent if s.startswith("WATCHDOG=1\n")]
    assert len(pings) == 3
    assert "STATUS=running: 10.0 fps" in pings[-1]
    # The source stalls: time passes, no frame_done() calls, so no ping however long we wait.
    before = len(sent)
    clock.now += 60
    assert len(sent) == before
    # Frames resume: the first frame after the stall pings at once.
    clock.now += 0.1
    assert dog.frame_done()
    assert sent[-1].startswith("WATCHDOG=1\n")


def test_without_watchdog_frame_done_sends_status_only() -> None:
    sent: List[str] = []
    clock = FakeClock()
    dog = Watchdog(recorder(sent), timeout_s=None, clock=clock)
    for _ in range(100):
        clock.now += 0.1
        dog.frame_done()
    assert sent and all(s.startswith("STATUS=") for s in sent)
    assert len(sent) == int(10 / sdnotify.STATUS_EVERY_S)


def test_frame_done_pings_the_real_socket_then_stops(listener: Tuple[socket.socket, str]) -> None:
    sock, path = listener
    clock = FakeClock()
    notifier = Notifier(path, watchdog_s=1.0, clock=clock)
    for _ in range(20):  # 2 s at 10 fps: 4 pings at 0.5 s spacing
        clock.now += 0.1
        notifier.frame_done()
    messages = received(sock)
    assert sum(m.startswith("WATCHDOG=1") for m in messages) == 4
    clock.now += 10  # stalled: nothing calls frame_done
    assert received(sock) == []


def test_module_level_functions_use_the_environment(
    listener: Tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setattr(sdnotify, "_DEFAULT", None)
    assert sdnotify.watchdog_interval() == 3.0
    assert sdnotify.ready() and sdnotify.watchdog() and sdnotify.status("ok")
    assert sdnotify.notify("STOPPING=1")
    assert received(sock) == ["READY=1", "WATCHDOG=1", "STATUS=ok", "STOPPING=1"]
