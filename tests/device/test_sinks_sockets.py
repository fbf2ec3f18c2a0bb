"""TCP, UDP, JSONL and stdout sinks, and the promise that publishing never blocks."""

from __future__ import annotations

import functools
import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
from polling import wait_until  # tests/ is on sys.path (tests/device/conftest.py)

from device.detections import FrameResult
from device.errors import JetyoloError
from device.sinks import SinkOptions, SinkSet, open_sinks
from device.sinks.sockets import TcpServerSink, UdpSink
from device.sinks.urls import parse_sink_url

WAIT_S = 10.0


def _options(tmp_path: Path, **fields: Any) -> SinkOptions:
    return SinkOptions(device_id="sock-dev", spool_dir=tmp_path / "spool", **fields)


_wait = functools.partial(wait_until, timeout=WAIT_S, interval=0.02)


def _read_lines(client: socket.socket, count: int) -> List[Dict[str, Any]]:
    client.settimeout(WAIT_S)
    data = b""
    while data.count(b"\n") < count:
        chunk = client.recv(65536)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()[:count]]


def _tcp_sink(sinks: SinkSet) -> TcpServerSink:
    (sink,) = [s for s in sinks.sinks if isinstance(s, TcpServerSink)]
    return sink


def test_two_tcp_clients_both_receive_the_stream(
    tmp_path: Path, make_result: Callable[..., FrameResult]
) -> None:
    with open_sinks(["tcp://127.0.0.1:0"], _options(tmp_path)) as sinks:
        sink = _tcp_sink(sinks)
        clients = [socket.create_connection(sink.address, timeout=WAIT_S) for _ in range(2)]
        try:
            assert _wait(lambda: sinks.depths()["per_sink"][sink.name]["clients"] == 2)
            for index in range(10):
                sinks.publish_frame(make_result(index))
            streams = [_read_lines(client, 11) for client in clients]
        finally:
            for client in clients:
                client.close()
    for stream in streams:
        assert stream[0] == {"topic": "jetyolo/sock-dev/available", "payload": "online"}
        assert [line["topic"] for line in stream[1:]] == ["jetyolo/sock-dev/cam0/detections"] * 10
        assert [line["payload"]["frame_index"] for line in stream[1:]] == list(range(10))
    assert [line["payload"]["seq"] for line in streams[0][1:]] == [
        line["payload"]["seq"] for line in streams[1][1:]
    ]


def test_tcp_binds_loopback_by_default(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open_sinks([f"tcp://:{port}"], _options(tmp_path)) as sinks:
        assert _tcp_sink(sinks).address == ("127.0.0.1", port)


def test_tcp_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(JetyoloError, match=f"tcp://127.0.0.1:{port}.*another program"):
            open_sinks([f"tcp://127.0.0.1:{port}"], _options(tmp_path))
    # the failed attempt released the spool lock: a corrected retry starts
    open_sinks(["tcp://127.0.0.1:0"], _options(tmp_path)).close()


def test_a_client_that_leaves_does_not_disturb_the_others(
    tmp_path: Path, make_result: Callable[..., FrameResult]
) -> None:
    with open_sinks(["tcp://127.0.0.1:0"], _options(tmp_path)) as sinks:
        sink = _tcp_sink(sinks)
        leaving = socket.create_connection(sink.address, timeout=WAIT_S)
        staying = socket.create_connection(sink.address, timeout=WAIT_S)
        assert _wait(lambda: sink.client_count == 2)
        leaving.close()
        for index in range(5):
            sinks.publish_frame(make_result(index))
        lines = _read_lines(staying, 6)
        staying.close()
        assert _wait(lambda: sink.client_count == 0)
    assert [line["payload"]["frame_index"] for line in lines[1:]] == list(range(5))


def test_udp_datagrams_arrive(tmp_path: Path, make_result: Callable[..., FrameResult]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(WAIT_S)
        port = receiver.getsockname()[1]
        with open_sinks([f"udp://127.0.0.1:{port}"], _options(tmp_path)) as sinks:
            for index in range(5):
                sinks.publish_frame(make_result(index))
            datagrams = [json.loads(receiver.recv(65536)) for _ in range(6)]
    assert datagrams[0]["payload"] == "online"
    assert [d["payload"]["frame_index"] for d in datagrams[1:]] == list(range(5))


def test_jsonl_and_stdout_write_envelopes(
    tmp_path: Path, make_result: Callable[..., FrameResult], capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "deep" / "out.jsonl"
    with open_sinks([f"jsonl:{path}", "stdout"], _options(tmp_path)) as sinks:
        for index in range(3):
            sinks.publish_frame(make_result(index))
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert printed == written
    assert [line["payload"] for line in written if line["topic"].endswith("available")] == [
        "online", "offline"]
    assert [line["payload"]["frame_index"] for line in written[1:4]] == [0, 1, 2]


def test_unwritable_jsonl_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(JetyoloError, match=r"cannot open .*for appending"):
        open_sinks([f"jsonl:{tmp_path / 'file' / 'out.jsonl'}"], _options(tmp_path))


def test_a_stuck_sink_never_blocks_publishing(
    tmp_path: Path, make_result: Callable[..., FrameResult]
) -> None:
    release = threading.Event()
    sinks = open_sinks([f"jsonl:{tmp_path / 'out.jsonl'}"], _options(tmp_path, queue_size=5))
    stuck = sinks.sinks[0]
    original_write = stuck.write

    def write_when_released(messages: list) -> None:
        release.wait(WAIT_S)
        original_write(messages)

    stuck.write = write_when_released  # type: ignore[method-assign]
    publisher = threading.Thread(
        target=lambda: [sinks.publish_frame(make_result(i)) for i in range(200)]
    )
    publisher.start()
    publisher.join(WAIT_S)
    try:
        assert not publisher.is_alive()  # 200 frames went by while the sink was stuck
        depths = sinks.depths()
        dropped = depths["intake_dropped"] + depths["per_sink"][stuck.name]["dropped"]
        assert dropped > 150  # queues of 5: most frames were dropped, and counted
    finally:
        release.set()
        sinks.close()


def test_a_frame_that_cannot_be_built_is_counted_and_the_rest_go_out(
    tmp_path: Path, make_result: Callable[..., FrameResult], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "out.jsonl"
    broken = make_result(0)
    broken.frame_size = None  # type: ignore[assignment]  # a runtime bug, not user input
    with open_sinks([f"jsonl:{path}"], _options(tmp_path)) as sinks:
        sinks.publish_frame(broken)
        sinks.publish_frame(make_result(1))
        assert _wait(lambda: sinks.frames_reported == 1)
        assert sinks.depths()["intake_dropped"] == 1
    frames = [json.loads(line)["payload"] for line in path.read_text().splitlines()[1:-1]]
    assert [frame["frame_index"] for frame in frames] == [1]
    assert any("could not build a frame message" in r.getMessage() for r in caplog.records)


def test_udp_sink_socket_is_connected_not_bound_to_every_interface(tmp_path: Path) -> None:
    """Connected: not listening on 0.0.0.0, and datagrams from anyone but the target dropped."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        sink = UdpSink(parse_sink_url(f"udp://127.0.0.1:{port}"), _options(tmp_path))
        try:
            assert sink._sock.getpeername() == ("127.0.0.1", port)
            assert sink._sock.getsockname()[0] == "127.0.0.1"
        finally:
            sink.close()
