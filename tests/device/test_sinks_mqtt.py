"""The MQTT sink against a real mosquitto: round trip, outages, restarts, auth, TLS, overflow.

Every wait is bounded. Reconnect back-off is 1 s here so outages heal quickly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import jsonschema
import pytest
from mqtt_broker import MosquittoBroker, Subscriber, TlsFiles, free_port, mosquitto_available
from polling import wait_until

from device.detections import FrameResult
from device.errors import JetyoloError
from device.sinks import SinkOptions, SinkSet, open_sinks
from device.sinks.spool import SPOOL_FILE, Spool

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "docs/message.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
WAIT_S = 15.0


def _options(tmp_path: Path, **fields: Any) -> SinkOptions:
    fields.setdefault("device_id", "test-dev")
    fields.setdefault("spool_dir", tmp_path / "spool")
    return SinkOptions(class_names=["car", "person", "bike"], model_id="synth320-abcdef12",
                       reconnect_min_s=1, reconnect_max_s=1, **fields)


def _mqtt_state(sinks: SinkSet) -> Dict[str, Any]:
    (state,) = [v for k, v in sinks.depths()["per_sink"].items() if k.startswith("mqtt")]
    return state


_wait = functools.partial(wait_until, timeout=WAIT_S)


def _publish(sinks: SinkSet, make_result: Callable[..., FrameResult], indexes: range) -> None:
    target = sinks.frames_reported + len(indexes)
    for index in indexes:
        sinks.publish_frame(make_result(index, detections=index % 3))
    # everything numbered and spooled before the test changes the world around it
    assert _wait(lambda: sinks.frames_reported == target
                 and all(sink.handled == sink.submitted for sink in sinks.sinks))


def _spooled_seqs(spool_dir: Path, sink_name: str) -> List[int]:
    spool = Spool(spool_dir / SPOOL_FILE, sink_name, 10**6)
    try:
        return [row.seq for row in spool.pending(0, 10**6)]
    finally:
        spool.close()


@pytest.mark.parametrize("qos", [1, 0])  # QoS 0: rows are deleted once sent, not acknowledged
def test_round_trip_every_message_arrives_schema_valid_in_order(
    tmp_path: Path, broker: MosquittoBroker, make_result: Callable[..., FrameResult], qos: int
) -> None:
    subscriber = Subscriber(broker.port)
    try:
        options = _options(tmp_path, qos=qos)
        with open_sinks([f"mqtt://127.0.0.1:{broker.port}"], options) as sinks:
            _publish(sinks, make_result, range(200))
            sinks.publish_stats({"fps": 30.0, "backend": "onnxruntime", "precision": "fp32"})
            assert _wait(lambda: len(subscriber.payloads()) == 200)
            assert _wait(lambda: len(subscriber.payloads("/stats")) == 1)
        frames = subscriber.payloads()
        assert [m["frame_index"] for m in frames] == list(range(200))
        seqs = [m["seq"] for m in frames]
        assert seqs == list(range(seqs[0], seqs[0] + 200))  # no gap, no duplicate, in order
        for message in [*frames, *subscriber.payloads("/stats")]:
            assert list(VALIDATOR.iter_errors(message)) == []
        assert frames[4]["detections"][0]["label"] == "car"
        stats = subscriber.payloads("/stats")[0]
        assert stats["seq"] == seqs[-1] + 1
        assert stats["sinks"]["frames_reported"] == 200
        # availability: online with the first result, offline (retained) at close
        assert _wait(lambda: subscriber.messages[-1] == ("jetyolo/test-dev/available", b"offline"))
        assert ("jetyolo/test-dev/available", b"online") in subscriber.messages
        assert _spooled_seqs(tmp_path / "spool", f"mqtt://127.0.0.1:{broker.port}") == []
    finally:
        subscriber.close()


def test_online_only_once_the_first_result_exists(
    tmp_path: Path, broker: MosquittoBroker, make_result: Callable[..., FrameResult]
) -> None:
    available = ("jetyolo/test-dev/available", b"online")
    subscriber = Subscriber(broker.port)
    try:
        with open_sinks([f"mqtt://127.0.0.1:{broker.port}"], _options(tmp_path)) as sinks:
            assert _wait(lambda: _mqtt_state(sinks)["connected"])
            # a stats message before any frame: it arrives, and "online" did not come with it
            sinks.publish_stats({"fps": 0.0, "backend": "onnxruntime"})
            assert _wait(lambda: len(subscriber.payloads("/stats")) == 1)
            assert available not in subscriber.messages
            sinks.publish_frame(make_result(0))
            assert _wait(lambda: len(subscriber.payloads()) == 1)
            topics = [topic for topic, _ in subscriber.messages]
            assert available in subscriber.messages
            assert topics.index(available[0]) < topics.index("jetyolo/test-dev/cam0/detections")
    finally:
        subscriber.close()


def test_broker_outage_loses_nothing(
    tmp_path: Path, make_result: Callable[..., FrameResult]
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", persistence=True).start()
    # persistent session: the broker queues for the subscriber while it reconnects
    subscriber = Subscriber(broker.port, client_id="outage-sub", session=True)
    try:
        with open_sinks([f"mqtt://127.0.0.1:{broker.port}"], _options(tmp_path)) as sinks:
            _publish(sinks, make_result, range(0, 50))
            assert _wait(lambda: len(subscriber.payloads()) == 50)
            broker.stop()
            assert _wait(lambda: not _mqtt_state(sinks)["connected"])
            _publish(sinks, make_result, range(50, 100))
            time.sleep(3.0)  # several seconds without a broker
            assert _mqtt_state(sinks)["spool"] >= 50
            broker.start()
            _publish(sinks, make_result, range(100, 150))
            assert _wait(lambda: _mqtt_state(sinks)["spool"] == 0)
        assert _wait(lambda: {m["frame_index"] for m in subscriber.payloads()} == set(range(150)))
        seqs = sorted({m["seq"] for m in subscriber.payloads()})
        assert seqs == list(range(seqs[0], seqs[0] + 150))
    finally:
        subscriber.close()
        broker.stop()


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from device.detections import Detections, FrameResult
    from device.sinks import SinkOptions, open_sinks

    port, spool_dir = int(sys.argv[1]), Path(sys.argv[2])
    options = SinkOptions(device_id="restart-dev", spool_dir=spool_dir,
                          reconnect_min_s=1, reconnect_max_s=1)
    sinks = open_sinks([f"mqtt://127.0.0.1:{port}"], options)
    print("SPOOL", sinks.depths()["per_sink"][f"mqtt://127.0.0.1:{port}"]["spool"], flush=True)
    total = 0
    for line in sys.stdin:
        words = line.split()
        if words[0] == "publish":
            first, count = int(words[1]), int(words[2])
            total += count
            for index in range(first, first + count):
                sinks.publish_frame(FrameResult("cam0", index, time.time(), (64, 48),
                                                Detections.empty(), {"infer": 1.0}))
            deadline = time.monotonic() + 60  # the test's reply() waits 60 s for this line
            while sinks.sinks[0].handled < total and time.monotonic() < deadline:
                time.sleep(0.01)
            print("SPOOLED", sinks.sinks[0].handled, flush=True)
        elif words[0] == "close":
            sinks.close(timeout=10)
            print("CLOSED", flush=True)
            break
    """
)


class Child:
    """A device process publishing through SinkSet, driven line by line over stdin."""

    def __init__(self, port: int, spool_dir: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(port), str(spool_dir)], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.spool_at_start = int(self.reply("SPOOL"))

    def reply(self, word: str) -> str:
        assert self.process.stdout is not None
        # one line per command, so nothing waits in Python's buffer while select() looks at the fd
        readable, _, _ = select.select([self.process.stdout], [], [], 60)
        assert readable, f"the child did not say {word} within 60 s"
        line = self.process.stdout.readline()
        assert line.startswith(word), f"child said {line!r}, expected {word}"
        return line.split()[1] if len(line.split()) > 1 else ""

    def send(self, command: str, expect: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.reply(expect)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


def test_killed_device_delivers_its_spool_after_restart(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    subscriber = Subscriber(broker.port)
    spool_dir = tmp_path / "spool"
    first = second = None
    try:
        first = Child(broker.port, spool_dir)
        assert first.send("publish 0 30", "SPOOLED") == "30"
        assert _wait(lambda: len(subscriber.payloads()) == 30)
        broker.pause()  # connection stays up, nothing is acknowledged any more
        assert first.send("publish 30 40", "SPOOLED") == "70"  # all 70 in the spool
        first.kill()  # SIGKILL mid-run with 40 unacknowledged messages on disk
        # read before the second process starts: its connection may drain some at once
        left = _spooled_seqs(spool_dir, f"mqtt://127.0.0.1:{broker.port}")
        assert len(left) >= 40  # what the first process left behind (and the last acks)
        broker.resume()
        second = Child(broker.port, spool_dir)
        assert second.spool_at_start <= len(left)
        assert second.send("publish 70 10", "SPOOLED") == "10"
        second.send("close", "CLOSED")
        second.process.wait(timeout=10)
        assert _wait(lambda: {m["frame_index"] for m in subscriber.payloads()} == set(range(80)))
        by_frame = {m["frame_index"]: m["seq"] for m in subscriber.payloads()}
        # seq kept growing across the SIGKILL: the restarted process numbers above the old one
        assert min(by_frame[i] for i in range(70, 80)) > max(by_frame[i] for i in range(70))
    finally:
        broker.resume()
        for child in (first, second):
            if child is not None and child.process.poll() is None:
                child.kill()
        subscriber.close()


def test_unreachable_broker_at_start_keeps_running_then_delivers(
    tmp_path: Path, make_result: Callable[..., FrameResult], caplog: pytest.LogCaptureFixture
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", persistence=True).start()
    subscriber = Subscriber(broker.port, client_id="late-sub", session=True)
    subscriber.close()
    broker.stop()  # the subscriber's session (and subscription) is kept on disk
    caplog.set_level(logging.WARNING, logger="device.sinks")
    try:
        with open_sinks([f"mqtt://127.0.0.1:{broker.port}"], _options(tmp_path)) as sinks:
            _publish(sinks, make_result, range(20))
            assert _wait(lambda: "unreachable" in (_mqtt_state(sinks)["last_error"] or ""))
            assert _mqtt_state(sinks)["spool"] == 20
            assert any("Connection refused" in r.getMessage() for r in caplog.records)
            broker.start()
            subscriber = Subscriber(broker.port, client_id="late-sub", session=True)
            assert _wait(lambda: _mqtt_state(sinks)["spool"] == 0)
        assert _wait(lambda: [m["frame_index"] for m in subscriber.payloads()] == list(range(20)))
    finally:
        subscriber.close()
        broker.stop()


def test_close_with_the_broker_down_is_bounded_and_keeps_the_spool(
    tmp_path: Path, make_result: Callable[..., FrameResult]
) -> None:
    port = free_port()
    sinks = open_sinks([f"mqtt://127.0.0.1:{port}"], _options(tmp_path))
    _publish(sinks, make_result, range(5))
    started = time.monotonic()
    sinks.close(timeout=1.0)
    assert time.monotonic() - started < 4.0  # 1 s to drain plus paho's loop_stop
    assert len(_spooled_seqs(tmp_path / "spool", f"mqtt://127.0.0.1:{port}")) == 5


def test_spool_overflow_drops_the_oldest_and_stats_report_it(
    tmp_path: Path, make_result: Callable[..., FrameResult]
) -> None:
    port = free_port()  # no broker: everything stays in the spool
    jsonl = tmp_path / "out.jsonl"
    options = _options(tmp_path, spool_max_messages=10)
    with open_sinks([f"mqtt://127.0.0.1:{port}", f"jsonl:{jsonl}"], options) as sinks:
        _publish(sinks, make_result, range(25))
        assert _mqtt_state(sinks)["spool"] == 10
        assert _mqtt_state(sinks)["spool_dropped"] == 15
        sinks.publish_stats({"fps": 1.0})
        sinks.close(timeout=0.5)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    stats = next(line["payload"] for line in lines if line["topic"].endswith("/stats"))
    assert stats["sinks"]["per_sink"][f"mqtt://127.0.0.1:{port}"]["spool_dropped"] == 15
    frames = [line["payload"] for line in lines if line["topic"].endswith("/detections")]
    kept = _spooled_seqs(tmp_path / "spool", f"mqtt://127.0.0.1:{port}")
    # the newest survive: the last 9 frames and the stats message
    assert kept == [m["seq"] for m in frames[-9:]] + [stats["seq"]]


def test_spool_reports_the_age_of_its_oldest_message(
    tmp_path: Path, make_result: Callable[..., FrameResult]
) -> None:
    port = free_port()  # no broker: everything waits in the spool
    captured = time.time() - 100.0  # frames captured 100 s ago, 30 fps
    with open_sinks([f"mqtt://127.0.0.1:{port}"], _options(tmp_path)) as sinks:
        assert _mqtt_state(sinks)["spool_oldest_age_s"] == 0.0  # empty
        for index in range(5):
            sinks.publish_frame(make_result(index, t0=captured))
        assert _wait(lambda: _mqtt_state(sinks)["spool_oldest_age_s"] > 0)
        age = _mqtt_state(sinks)["spool_oldest_age_s"]
        assert 100.0 <= age < 100.0 + WAIT_S + 2  # the first frame's, not the last one's
        sinks.close(timeout=0.2)


def test_auth_right_credentials_deliver_wrong_ones_are_a_clear_error(
    tmp_path: Path, make_result: Callable[..., FrameResult], caplog: pytest.LogCaptureFixture
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", users={"cam": "s3cret:!"}).start()
    caplog.set_level(logging.ERROR, logger="device.sinks")
    subscriber = Subscriber(broker.port, username="cam", password="s3cret:!")
    try:
        url = f"mqtt://cam:s3cret%3A%21@127.0.0.1:{broker.port}"
        with open_sinks([url], _options(tmp_path, spool_dir=tmp_path / "a")) as sinks:
            _publish(sinks, make_result, range(5))
            assert _wait(lambda: len(subscriber.payloads()) == 5)
        wrong = f"mqtt://cam:nope@127.0.0.1:{broker.port}"
        with open_sinks([wrong], _options(tmp_path, spool_dir=tmp_path / "b")) as sinks:
            _publish(sinks, make_result, range(5, 10))
            assert _wait(lambda: "not authorized" in (_mqtt_state(sinks)["last_error"] or ""))
            assert _mqtt_state(sinks)["spool"] == 5  # kept for when the credentials are fixed
            sinks.close(timeout=0.5)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("not authorized" in e and "user:password" in e for e in errors)
        assert all("nope" not in e for e in errors)  # the password is never logged
        assert len(subscriber.payloads()) == 5
    finally:
        subscriber.close()
        broker.stop()


def test_tls_with_the_right_ca_works_and_a_wrong_ca_fails_clearly(
    tmp_path: Path, tls_files: TlsFiles, make_result: Callable[..., FrameResult],
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", tls=tls_files).start()
    caplog.set_level(logging.ERROR, logger="device.sinks")
    subscriber = Subscriber(broker.port, ca=tls_files.ca)
    url = f"mqtts://127.0.0.1:{broker.port}"
    try:
        good = _options(tmp_path, spool_dir=tmp_path / "a", mqtt_ca=tls_files.ca)
        with open_sinks([url], good) as sinks:
            _publish(sinks, make_result, range(5))
            assert _wait(lambda: len(subscriber.payloads()) == 5)
        bad = _options(tmp_path, spool_dir=tmp_path / "b", mqtt_ca=tls_files.other_ca)
        with open_sinks([url], bad) as sinks:
            _publish(sinks, make_result, range(5, 8))
            assert _wait(lambda: "certificate" in (_mqtt_state(sinks)["last_error"] or ""))
            assert _mqtt_state(sinks)["spool"] == 3
            sinks.close(timeout=0.5)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("TLS certificate check failed" in e and "--mqtt-ca" in e for e in errors)
    finally:
        subscriber.close()
        broker.stop()


def test_missing_ca_file_is_refused_at_start(tmp_path: Path) -> None:
    options = _options(tmp_path, mqtt_ca=tmp_path / "missing-ca.crt")
    with pytest.raises(JetyoloError, match=r"--mqtt-ca .*missing-ca\.crt does not exist"):
        open_sinks(["mqtts://127.0.0.1:8883"], options)
    # nothing left behind holding the spool: a corrected retry can start
    open_sinks(["stdout"], _options(tmp_path)).close()


def test_unwritable_spool_dir_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(JetyoloError, match="spool directory"):
        open_sinks(["mqtt://127.0.0.1:1883"], _options(tmp_path, spool_dir=tmp_path / "file/x"))
