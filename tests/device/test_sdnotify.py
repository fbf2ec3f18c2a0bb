"""device.sdnotify against a real AF_UNIX datagram socket owned by the test (what systemd
listens on), plus the frame-progress watchdog with a fake clock."""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
from http_camera import MjpegCamera  # tests/ is on sys.path (tests/device/conftest.py)

from device import sdnotify
from device.sdnotify import Notifier, Watchdog, socket_address, watchdog_seconds


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


def test_ready_status_watchdog_reach_the_socket(notify_socket: Tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
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


def test_several_sources_status_has_each_fps_and_one_live_source_keeps_the_watchdog_fed() -> None:
    sent: List[str] = []
    clock = FakeClock()
    dog = Watchdog(recorder(sent), timeout_s=2.0, clock=clock)
    for step in range(20):  # 2 s: door at 10 fps, yard at 5 fps
        clock.now += 0.1
        dog.frame_done(1, "door")
        if step % 2:
            dog.frame_done(1, "yard")
    assert sent[-1].endswith("STATUS=running: 15.0 fps, 29 frames; door 10.0 fps, yard 5.0 fps")
    for _ in range(20):  # yard is down: door alone still earns the pings, yard shows 0
        clock.now += 0.1
        dog.frame_done(1, "door")
    assert sent[-1].startswith("WATCHDOG=1\nSTATUS=running: 10.0 fps, ")
    assert sent[-1].endswith("frames; door 10.0 fps, yard 0.0 fps")
    before = len(sent)
    clock.now += 60  # no source progresses: no ping
    assert len(sent) == before
    one = Watchdog(recorder(sent), timeout_s=2.0, clock=clock)
    clock.now += 1.5
    one.frame_done(1, "door")
    assert sent[-1].endswith("frames")  # one source: no per-source list


def test_without_watchdog_frame_done_sends_status_only() -> None:
    sent: List[str] = []
    clock = FakeClock()
    dog = Watchdog(recorder(sent), timeout_s=None, clock=clock)
    for _ in range(100):
        clock.now += 0.1
        dog.frame_done()
    assert sent and all(s.startswith("STATUS=") for s in sent)
    assert len(sent) == int(10 / sdnotify.STATUS_EVERY_S)


def test_frame_done_pings_the_real_socket_then_stops(
    notify_socket: Tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
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
    notify_socket: Tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setattr(sdnotify, "_DEFAULT", None)
    assert sdnotify.watchdog_interval() == 3.0
    assert sdnotify.ready() and sdnotify.watchdog() and sdnotify.status("ok")
    assert sdnotify.notify("STOPPING=1")
    assert received(sock) == ["READY=1", "WATCHDOG=1", "STATUS=ok", "STOPPING=1"]


# --- The real loop: `jetyolo run` against a camera stream that the test can stall ----------

try:  # the runtime is another part of the project; these tests need it
    importlib.import_module("device.run")
    importlib.import_module("device.pipeline")
    RUNTIME_MISSING = ""
except ImportError as exc:
    RUNTIME_MISSING = f"device.run / device.pipeline not importable yet ({exc})"


def collect(sock: socket.socket, seconds: float, log: List[Tuple[float, str]]) -> None:
    """Append (arrival time, datagram) to ``log`` for ``seconds``."""
    import time

    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            log.append((time.monotonic(), sock.recv(4096).decode()))
        except socket.timeout:
            break


@pytest.mark.slow
@pytest.mark.skipif(bool(RUNTIME_MISSING), reason=RUNTIME_MISSING or "runtime present")
def test_run_loop_ready_after_first_frame_pings_while_frames_flow_stops_on_stall(
    notify_socket: Tuple[socket.socket, str], bundle_dir: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    sock, path = notify_socket
    camera = MjpegCamera()
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}  # ping every 0.5 s
    command = [sys.executable, "-m", "device.cli", "run", str(bundle_dir), "--source", camera.url,
               "--backend", "onnxruntime", "--threads", "1",
               "--sink", f"jsonl:{tmp_path / 'out.jsonl'}"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    log: List[Tuple[float, str]] = []
    try:
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for _, m in log) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            collect(sock, 0.5, log)
        ready_at = next(t for t, m in log if "READY=1" in m)
        assert camera.sent > 0, "READY=1 came before the camera sent a frame"
        assert not any("WATCHDOG=1" in m for t, m in log if t < ready_at)
        collect(sock, 3.0, log)  # frames flow
        flowing_pings = [t for t, m in log if "WATCHDOG=1" in m and t > ready_at]
        assert len(flowing_pings) >= 4, log
        assert any("fps" in m for _, m in log), "no STATUS= with the FPS"

        camera.flowing.clear()  # the camera stalls; the process keeps running, blocked on read
        stalled_at = time.monotonic()
        collect(sock, 3.5, log)
        assert process.poll() is None
        late = [t - stalled_at for t, m in log if "WATCHDOG=1" in m and t > stalled_at + 1.0]
        assert late == [], f"WATCHDOG=1 kept coming {late} s into the stall"

        camera.flowing.set()  # frames again: pings resume
        resumed_at = time.monotonic()
        collect(sock, 3.0, log)
        assert any("WATCHDOG=1" in m for t, m in log if t > resumed_at)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
            camera.close()
    collect(sock, 0.5, log)
    assert any("STOPPING=1" in m for _, m in log)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
