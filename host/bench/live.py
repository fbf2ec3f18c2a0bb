"""A paced camera for ``jetyolo bench --live FPS``: the bench video served as an HTTP MJPEG
stream (what many IP cameras serve) on loopback, one frame every 1/FPS seconds, so the pipeline
and ultralytics meet the timing of a real camera instead of a file read flat out.

Frames are JPEG-encoded once, before serving, so encoding costs the measured processes nothing.
Each connection gets its own sender from the first frame, paced against its own start time
(late frames are sent at once, never bunched up to catch up beyond one frame).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import List, Optional, Type

import cv2

from device.errors import JetyoloError

log = logging.getLogger(__name__)
JPEG_QUALITY = 90
BOUNDARY = b"frame"


def encode_video(video: Path, frames: int) -> List[bytes]:
    """The first ``frames`` frames of ``video`` as JPEG bytes."""
    capture = cv2.VideoCapture(str(video))
    encoded: List[bytes] = []
    while len(encoded) < frames:
        ok, image = capture.read()
        if not ok:
            break
        encoded.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
                       .tobytes())
    capture.release()
    if not encoded:
        raise JetyoloError(f"--live: no frame of {video} could be read")
    return encoded


class PacedMjpegServer:
    """``with PacedMjpegServer(video, fps, frames) as camera:`` serves ``camera.url``."""

    def __init__(self, video: Path, fps: float, frames: int) -> None:
        if not fps > 0:
            raise JetyoloError(f"--live must be a frame rate above 0, got {fps}")
        self.fps = fps
        self.jpegs = encode_video(video, frames)
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}/stream.mjpg"
        self._closed = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._accept, name="bench-camera", daemon=True)

    def __enter__(self) -> PacedMjpegServer:
        self._thread.start()
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self._server.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            threading.Thread(target=self._stream, args=(conn,), daemon=True).start()

    def _stream(self, conn: socket.socket) -> None:
        period = 1.0 / self.fps
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; "
                         b"boundary=" + BOUNDARY + b"\r\n\r\n")
            due = time.perf_counter()
            index = 0
            while not self._closed.is_set():
                jpeg = self.jpegs[index % len(self.jpegs)]
                conn.sendall(b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(jpeg) + jpeg + b"\r\n")
                self.sent += 1
                index += 1
                due = max(due + period, time.perf_counter() - period)
                time.sleep(max(0.0, due - time.perf_counter()))
        except OSError:
            pass  # the client went away
        finally:
            conn.close()
