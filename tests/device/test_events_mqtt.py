"""Tracking events and zone counts at a real mosquitto: in seq order with the frames, zone
counts retained for a late subscriber, and the example consumer of docs/mqtt.md works."""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
from pathlib import Path
from typing import Any, Callable

from mqtt_broker import MosquittoBroker, Subscriber
from polling import wait_until

from device.detections import FrameResult
from device.sinks import SinkOptions, open_sinks
from device.tracking_stage import TrackedFrame
from device.zones import TrackEvent, ZoneCount

REPO = Path(__file__).resolve().parents[2]
NOW = 1_764_000_000.0


def tracked_frame(make_result: Callable[..., FrameResult], index: int, car_in: bool,
                  occupancy: int) -> TrackedFrame:
    result = make_result(index, detections=1)
    events = [TrackEvent("cross", "gate", 7 + index, 0, (1.0, 2.0, 30.0, 40.0), NOW + index,
                         direction="in")] if car_in else []
    return TrackedFrame(result, events, [ZoneCount("door", occupancy, {1: occupancy})])


def test_events_in_order_and_zone_counts_retained(
    tmp_path: Path, broker: MosquittoBroker, make_result: Callable[..., FrameResult]
) -> None:
    subscriber = Subscriber(broker.port)
    options = SinkOptions(device_id="dev", class_names=["car", "person"], model_id="m",
                          spool_dir=tmp_path / "spool", reconnect_min_s=1, reconnect_max_s=1)
    try:
        with open_sinks([f"mqtt://127.0.0.1:{broker.port}"], options) as sinks:
            for index in range(3):
                tracked = tracked_frame(make_result, index, car_in=index != 1, occupancy=index)
                sinks.publish_events(tracked)
                sinks.publish_frame(tracked.result)
            assert wait_until(lambda: len(subscriber.payloads("/zones/door")) == 3, timeout=15)
            assert wait_until(lambda: len(subscriber.payloads("/events")) == 2, timeout=15)
        every = [json.loads(payload) for topic, payload in subscriber.messages
                 if not topic.endswith("/available")]
        kinds = [m["type"] for m in every]
        # per frame: its events, its zone count, then its detections; one seq for all
        assert kinds == ["event", "zone", "detections", "zone", "detections", "event", "zone",
                         "detections"]
        seqs = [m["seq"] for m in every]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        late = Subscriber(broker.port, topic="jetyolo/dev/+/zones/#", client_id="late")
        try:
            assert wait_until(lambda: len(late.payloads("/zones/door")) == 1, timeout=15)
            assert late.payloads("/zones/door")[0]["count"] == 2  # the retained, latest count
        finally:
            late.close()
    finally:
        subscriber.close()


def test_the_docs_example_consumer(
    tmp_path: Path, broker: MosquittoBroker, make_result: Callable[..., FrameResult]
) -> None:
    docs = (REPO / "docs/mqtt.md").read_text()
    section = docs[docs.index("## Tracking events"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    source = code.group(1).replace('client.connect("broker.lan", 1883)',
                                   f'client.connect("127.0.0.1", {broker.port})')
    source = source.replace("client.loop_forever()", "client.loop_start()")
    printed = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "docs/mqtt.md", "exec"), namespace)
        client: Any = namespace["client"]
        try:
            subscribed = threading.Event()
            client.on_subscribe = lambda *_: subscribed.set()
            assert wait_until(lambda: client.is_connected(), timeout=15)
            client.subscribe([("jetyolo/+/+/events", 1), ("jetyolo/+/+/zones/#", 1)])
            assert subscribed.wait(15)
            options = SinkOptions(device_id="dev", class_names=["car", "person"], model_id="m",
                                  spool_dir=tmp_path / "spool")
            with open_sinks([f"mqtt://127.0.0.1:{broker.port}"], options) as sinks:
                sinks.publish_events(tracked_frame(make_result, 0, car_in=True, occupancy=1))
                assert wait_until(lambda: "door: 1 inside" in printed.getvalue(), timeout=15)
        finally:
            client.loop_stop()
            client.disconnect()
    assert "car 7 crossed gate (in): {'in': 1, 'out': 0}" in printed.getvalue()
    assert namespace["passed"] == {"in": 1, "out": 0}
