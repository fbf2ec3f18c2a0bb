"""A fake IP camera for tests: HTTP multipart JPEG (what many IP cameras serve) on loopback."""

from __future__ import annotations

import socket
import threading
import time
from typing import Optional

import cv2
import numpy as np


class MjpegCamera:
    """Serves ~20 fps of 320x240 JPEG frames at ``url``.

    It starts listening ``delay_s`` after construction, or when ``start()`` is called
    (``delay_s=None``: a camera booting after the detector, at a moment the test chooses);
    while ``flowing`` is cleared it holds connections open but silent (a stalled camera).
    """

    def __init__(self, delay_s: Optional[float] = 0.0) -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self.delay_s = delay_s
        self.started = threading.Event()
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self._go = threading.Event()
        self.sent = 0
        threading.Thread(target=self._serve, daemon=True).start()
        if delay_s == 0:
            self.started.wait(5.0)

    def start(self) -> None:
        """Start listening now (a camera made with ``delay_s=None``)."""
        self._go.set()

    def _serve(self) -> None:
        self._go.wait(self.delay_s)
        if self.closed.is_set():
            return
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(4)
        server.settimeout(0.2)
        self.started.set()
        while not self.closed.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=self._stream, args=(conn,), daemon=True).start()
        server.close()

    def _stream(self, conn: socket.socket) -> None:
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\n"
                         b"Content-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
            while not self.closed.is_set():
                if not self.flowing.is_set():
                    time.sleep(0.02)
                    continue
                image = np.full((240, 320, 3), (self.sent * 9) % 255, np.uint8)
                jpeg = cv2.imencode(".jpg", image)[1].tobytes()
                conn.sendall(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                             % len(jpeg) + jpeg + b"\r\n")
                self.sent += 1
                time.sleep(0.05)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self._go.set()
