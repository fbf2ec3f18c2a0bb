"""Fixtures for the sink tests: a real mosquitto, throwaway TLS files, fake frame results."""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Tuple

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/mqtt_broker.py

from mqtt_broker import MosquittoBroker, TlsFiles, make_tls_files, mosquitto_available

from device.detections import Detections, FrameResult


def fake_result(index: int, detections: int = 1, source: str = "cam0", t0: float = 1.7e9,
                fps: float = 30.0) -> FrameResult:
    """Frame ``index`` of a 640x480 source with ``detections`` boxes (class = box number % 3)."""
    boxes = np.array([[10 + i, 20 + i, 110 + i, 220 + i] for i in range(detections)], np.float32)
    scores = np.linspace(0.9, 0.5, detections).astype(np.float32)
    classes = np.arange(detections, dtype=np.int32) % 3
    return FrameResult(source, index, t0 + index / fps, (640, 480),
                       Detections(boxes.reshape(-1, 4), scores, classes),
                       {"preprocess": 1.25, "infer": 8.5, "postprocess": 0.75})


FrameFactory = Callable[..., FrameResult]


@pytest.fixture
def make_result() -> FrameFactory:
    """``make_result(index, detections=1, source="cam0", t0=1.7e9, fps=30.0)``."""
    return fake_result


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    if not mosquitto_available():
        pytest.skip("mosquitto is not installed (make install adds it)")
    with MosquittoBroker(tmp_path / "broker") as running:
        yield running


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def notify_socket() -> Iterator[Tuple[socket.socket, str]]:
    """systemd's side of sd_notify: a bound AF_UNIX datagram socket and its path, in a short temp
    dir (sun_path is limited to 108 bytes); reads time out after 2 s."""
    with tempfile.TemporaryDirectory(prefix="sdn") as tmp:
        path = str(Path(tmp) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        try:
            yield sock, path
        finally:
            sock.close()
