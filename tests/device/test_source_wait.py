"""A live source that is down at start is waited for (``source_timeout_s``) with the reconnect
back-off, reported to systemd, and fails with one line when the time is up; files and image
folders never wait."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np
import pytest
from http_camera import MjpegCamera  # tests/ is on sys.path (tests/device/conftest.py)

from device.config import RunConfig
from device.errors import JetyoloError
from device.sdnotify import Notifier
from device.setup import source_timeout_s, start_wait_reporter
from device.sources import CaptureOptions, LiveSource, open_failure, open_source, open_waiting

CLOSED_URLS = ("rtsp://127.0.0.1:1/x", "http://127.0.0.1:1/stream.mjpg")


class FakeCapture:
    def __init__(self, opened: bool) -> None:
        self.opened, self.released = opened, False

    def isOpened(self) -> bool:
        return self.opened

    def read(self) -> Tuple[bool, Optional[np.ndarray]]:
        return True, np.zeros((4, 4, 3), np.uint8)

    def release(self) -> None:
        self.released = True


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: List[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing_opener(failures: int, made: List[FakeCapture]) -> Callable[[], cv2.VideoCapture]:
    """Fails ``failures`` times, then opens; every capture it made is in ``made``."""

    def opener() -> FakeCapture:
        made.append(FakeCapture(len(made) >= failures))
        return made[-1]

    return opener  # type: ignore[return-value]  # duck-typed like cv2.VideoCapture


def test_waits_with_the_reconnect_back_off_then_opens(caplog: pytest.LogCaptureFixture) -> None:
    fake, made, waits = FakeTime(), [], []  # type: ignore[var-annotated]
    with caplog.at_level(logging.INFO, logger="device.sources"):
        capture = open_waiting("cam", failing_opener(5, made), float("inf"), max_delay_s=3.0,
                               on_wait=lambda name, pause: waits.append((name, pause)),
                               clock=fake.clock, sleep=fake.sleep)
    assert capture is made[-1] and capture.isOpened() and len(made) == 6
    assert fake.sleeps == [0.5, 1.0, 2.0, 3.0, 3.0]  # doubling, capped at reconnect_max_s
    assert waits == [("cam", pause) for pause in fake.sleeps]
    assert all(failed.released for failed in made[:-1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "waiting for it (forever)" in warnings[0]  # one per failure
    assert any("opened after 10 s (6 attempts)" in r.getMessage() for r in caplog.records)


def test_gives_up_after_the_timeout_with_one_line() -> None:
    fake, made = FakeTime(), []  # type: ignore[var-annotated]
    with pytest.raises(JetyoloError) as caught:
        open_waiting("rtsp://cam/x", failing_opener(100, made), 4.0, max_delay_s=30.0,
                     clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps == [0.5, 1.0, 2.0, 0.5]  # the last pause ends at the deadline
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot open source 'rtsp://cam/x' within 4 s (5 attempts): ")
    assert "--source-timeout" in message


def fail_if_called(seconds: float) -> None:
    pytest.fail(f"slept {seconds} s with a timeout of 0")


def test_timeout_zero_tries_once() -> None:
    made: List[FakeCapture] = []
    with pytest.raises(JetyoloError, match="cannot open source 'cam'"):
        open_waiting("cam", failing_opener(1, made), 0.0, sleep=fail_if_called)
    assert len(made) == 1


def test_failure_reasons_of_a_camera_device(tmp_path: Path) -> None:
    free = next(f"/dev/video{n}" for n in range(90, 100) if not Path(f"/dev/video{n}").exists())
    assert "does not exist" in open_failure(free)
    assert "not reachable" in open_failure("rtsp://127.0.0.1:1/x")


@pytest.mark.parametrize("url", CLOSED_URLS)
def test_unopenable_live_url_retries_then_fails_with_one_line(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    options = CaptureOptions(source_timeout_s=1.2, reconnect_max_s=0.4)
    pauses: List[float] = []
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="device.sources"), \
            pytest.raises(JetyoloError) as caught:
        open_source(url, options, on_wait=lambda _name, pause: pauses.append(pause))
    assert time.monotonic() - started >= 1.2
    assert len(pauses) >= 3  # 0.4 s back-off cap: several retries in 1.2 s
    assert f"cannot open source {url!r} within 1.2 s" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert len([r for r in caplog.records if r.name == "device.sources"]) == 1


def test_files_and_image_folders_never_wait(tmp_path: Path) -> None:
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"not a video")
    (tmp_path / "empty").mkdir()
    options = CaptureOptions(source_timeout_s=60.0)
    for text, message in ((str(broken), "is not a readable video"),
                          (str(tmp_path / "empty"), "has no images")):
        started = time.monotonic()
        with pytest.raises(JetyoloError, match=message):
            open_source(text, options)
        assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "configured, env, expected",
    [
        (None, {"NOTIFY_SOCKET": "/run/systemd/notify"}, float("inf")),  # the service waits
        (None, {}, 0.0),  # a shell fails at once
        (5.0, {"NOTIFY_SOCKET": "/run/systemd/notify"}, 5.0),
        (0.0, {"NOTIFY_SOCKET": "/run/systemd/notify"}, 0.0),
    ],
)
def test_source_timeout_default_depends_on_systemd(
    configured: Optional[float], env: dict, expected: float
) -> None:
    config = RunConfig(bundle="b", source="rtsp://cam/x", source_timeout_s=configured)
    assert source_timeout_s(config, env) == expected


def datagrams(sock: socket.socket, seconds: float = 0.0) -> List[str]:
    messages, end = [], time.monotonic() + seconds
    while True:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            return messages


def test_waiting_is_reported_to_systemd(notify_socket: Tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    report = start_wait_reporter(Notifier(path))
    report("rtsp://cam/x", 2.0)
    assert datagrams(sock) == ["STATUS=waiting for camera rtsp://cam/x",
                               "EXTEND_TIMEOUT_USEC=62000000"]


def test_a_camera_that_starts_late_is_waited_for_then_delivers() -> None:
    camera = MjpegCamera(delay_s=None)
    pauses: List[float] = []

    def waited(_name: str, pause: float) -> None:
        pauses.append(pause)
        if len(pauses) == 2:
            camera.start()  # the camera comes up after two failed attempts, however slow they are

    try:
        source = open_source(camera.url, CaptureOptions(source_timeout_s=60.0,
                                                        reconnect_max_s=1.0), on_wait=waited)
        assert isinstance(source, LiveSource) and camera.started.is_set()
        assert len(pauses) >= 2  # it did wait
        stop = threading.Event()
        frames = []
        for frame in source.frames(stop):
            frames.append(frame)
            if len(frames) == 3:
                stop.set()
        assert [f.image.shape for f in frames] == [(240, 320, 3)] * 3
        source.close()
    finally:
        camera.close()


@pytest.mark.slow
def test_jetyolo_run_under_systemd_waits_for_the_camera_then_runs(
    notify_socket: Tuple[socket.socket, str], bundle_dir: Path, tmp_path: Path
) -> None:
    sock, path = notify_socket
    camera = MjpegCamera(delay_s=None)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "device.cli", "run", str(bundle_dir), "--source", camera.url,
               "--backend", "onnxruntime", "--threads", "1", "--max-frames", "5",
               "--reconnect-max-s", "1", "--sink", f"jsonl:{out}"]
    env = {**os.environ, "NOTIFY_SOCKET": path}  # no --source-timeout: wait forever
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    waiting_line = f"STATUS=waiting for camera {camera.url}"
    messages: List[str] = []
    try:
        # the camera comes up once the run has said twice that it waits (however slowly it
        # started): a fixed delay let a slow start find the camera already up
        deadline = time.monotonic() + 120
        while messages.count(waiting_line) < 2 and process.poll() is None \
                and time.monotonic() < deadline:
            messages += datagrams(sock, 0.2)
        camera.start()
        stderr = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        camera.close()
    assert process.returncode == 0, stderr
    messages += datagrams(sock)
    waiting = [m for m in messages if m == waiting_line]
    assert len(waiting) >= 2, messages
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages)
    first_ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
    assert first_ready > messages.index(waiting[-1])
    assert len(out.read_text().splitlines()) >= 5
    assert stderr.count("cannot be opened") == 1  # one line for the one distinct failure


def test_opencv_warnings_are_quiet_only_during_retries() -> None:
    api = cv2.utils.logging
    before = api.getLogLevel()
    levels: List[int] = []
    made: List[FakeCapture] = []
    opener = failing_opener(2, made)

    def recording_opener() -> cv2.VideoCapture:
        levels.append(api.getLogLevel())
        return opener()

    fake = FakeTime()
    open_waiting("cam", recording_opener, 10.0, clock=fake.clock, sleep=fake.sleep)
    assert levels == [before, api.LOG_LEVEL_ERROR, api.LOG_LEVEL_ERROR]
    assert api.getLogLevel() == before
