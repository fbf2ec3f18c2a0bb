"""Home Assistant discovery: topics, retained configs, and templates that give the right counts
when rendered (with Jinja2, Home Assistant's template engine) on a real detections message."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from mqtt_broker import MosquittoBroker, Subscriber  # tests/ is on sys.path (conftest)
from polling import wait_until

from device.detections import Detections, FrameResult
from device.message import build_frame_message, encode
from device.ops.homeassistant import discovery_id, discovery_messages
from device.sinks import SinkOptions, open_sinks

jinja2 = pytest.importorskip("jinja2")  # comes with the host extra (torch depends on it)
NAMES = ["red_circle", "green square", 'quote"d']


def render(template: str, message: dict) -> str:
    return jinja2.Environment().from_string(template).render(value_json=message)


def frame_message(class_ids: list) -> dict:
    boxes = np.tile(np.array([[1, 2, 30, 40]], np.float32), (len(class_ids), 1))
    result = FrameResult("gate", 5, 1.7e9, (640, 480),
                         Detections(boxes, np.full(len(class_ids), 0.9, np.float32),
                                    np.array(class_ids, np.int32)))
    options = SinkOptions(device_id="jetson-01", class_names=NAMES, model_id="synth")
    return json.loads(encode(build_frame_message(result, 1, options)))


def test_topics_and_payloads() -> None:
    messages = discovery_messages("jetson.01", ["gate", "back yard"], NAMES, model_id="synth")
    topics = [m.topic for m in messages]
    assert len(messages) == 2 * (len(NAMES) + 1)
    assert "homeassistant/sensor/jetyolo_jetson_01/gate_red_circle_count/config" in topics
    assert "homeassistant/binary_sensor/jetyolo_jetson_01/back_yard_object_present/config" in topics
    assert all(m.retain and m.seq == 0 for m in messages)
    configs = [json.loads(m.payload) for m in messages]
    assert len({c["unique_id"] for c in configs}) == len(configs)
    for config in configs:
        assert config["availability_topic"] == "jetyolo/jetson.01/available"
        assert config["payload_available"] == "online"
        assert config["device"]["identifiers"] == ["jetyolo_jetson_01"]
    gate = [c for c in configs if c["name"].startswith("gate ")]
    assert {c["state_topic"] for c in gate} == {"jetyolo/jetson.01/gate/detections"}
    custom = discovery_messages("d", ["gate"], NAMES, topic_prefix="site/a",
                                discovery_prefix="ha")
    assert custom[0].topic.startswith("ha/sensor/") and \
        json.loads(custom[0].payload)["state_topic"] == "site/a/d/gate/detections"


def test_templates_count_each_class_on_a_real_message() -> None:
    configs = {json.loads(m.payload)["name"]: json.loads(m.payload)
               for m in discovery_messages("jetson-01", ["gate"], NAMES)}
    busy = frame_message([0, 0, 2, 0])
    empty = frame_message([])
    assert render(configs["gate red_circle count"]["value_template"], busy) == "3"
    assert render(configs["gate green square count"]["value_template"], busy) == "0"
    assert render(configs['gate quote"d count']["value_template"], busy) == "1"
    present = configs["gate object present"]
    assert render(present["value_template"], busy) == present["payload_on"]
    assert render(present["value_template"], empty) == present["payload_off"]
    assert render(configs["gate red_circle count"]["value_template"], empty) == "0"


def test_discovery_ids() -> None:
    assert discovery_id("rtsp cam/1.x") == "rtsp_cam_1_x"
    assert discovery_id("///") == "x"


def retained(port: int, topic: str, count: int) -> list:
    """What a subscriber arriving now gets on ``topic``: the broker's retained messages."""
    subscriber = Subscriber(port, topic=topic, client_id=f"late-{time.monotonic_ns()}")
    try:
        wait_until(lambda: len(subscriber.messages) >= count, timeout=10)
        return list(subscriber.messages)
    finally:
        subscriber.close()


def test_the_mqtt_sink_publishes_the_configs_retained_at_every_connection(
    tmp_path: Path, broker: MosquittoBroker, make_result: Callable[..., FrameResult]
) -> None:
    announcements = discovery_messages("cam-1", ["gate"], NAMES, model_id="synth")
    options = SinkOptions(device_id="cam-1", class_names=NAMES, spool_dir=tmp_path / "spool",
                          reconnect_min_s=1, reconnect_max_s=1, announcements=announcements)
    expected = {(m.topic, m.payload) for m in announcements}
    with open_sinks([f"mqtt://127.0.0.1:{broker.port}"], options) as sinks:
        got = retained(broker.port, "homeassistant/#", len(expected))
        assert set(got) == expected
        # the fixture's broker has no persistence: a restart forgets retained messages, and
        # only the sink's reconnect can bring them back
        broker.stop()
        broker.start()
        sinks.publish_frame(make_result(0))
        mqtt = sinks.sinks[0]
        assert wait_until(lambda: mqtt.depth()["connected"], timeout=15)
        assert set(retained(broker.port, "homeassistant/#", len(expected))) == expected
        assert wait_until(lambda: mqtt.depth()["spool"] == 0, timeout=15)



def test_the_run_config_turns_it_on_and_needs_an_mqtt_sink() -> None:
    from device.config import config_from_mapping
    from device.errors import JetyoloError
    from device.ops.homeassistant import config_announcements

    options = SinkOptions(device_id="cam-1", class_names=NAMES, model_id="synth")
    base = {"bundle": "b", "source": "rtsp://u:pw@gatecam/live", "homeassistant": True}
    with pytest.raises(JetyoloError, match="needs an mqtt:// or mqtts:// sink"):
        config_announcements(config_from_mapping({**base, "sinks": ["stdout"]}), options)
    config = config_from_mapping({**base, "sinks": ["mqtt://broker"],
                                  "homeassistant_prefix": "ha"})
    topics = [m.topic for m in config_announcements(config, options)]
    assert topics[-1] == "ha/binary_sensor/jetyolo_cam-1/gatecam_object_present/config"
    assert all("pw" not in topic for topic in topics)


def test_a_run_with_homeassistant_true_leaves_the_configs_at_the_broker(
    bundle_dir: Path, synth_video: Path, tmp_path: Path, broker: MosquittoBroker
) -> None:
    from device.bundle import Bundle
    from device.config import config_from_mapping
    from device.setup import run_configured

    config = config_from_mapping({
        "bundle": str(bundle_dir), "source": str(synth_video), "backend": "onnxruntime",
        "sinks": [f"mqtt://127.0.0.1:{broker.port}"], "spool_dir": str(tmp_path / "spool"),
        "device_id": "ha-dev", "source_name": "yard", "homeassistant": True, "max_frames": 3,
    })
    run_configured(config, handle_signals=False)
    names = Bundle.load(bundle_dir).class_names
    got = dict(retained(broker.port, "homeassistant/#", len(names) + 1))
    assert len(got) == len(names) + 1
    present = json.loads(got["homeassistant/binary_sensor/jetyolo_ha-dev/yard_object_present/"
                            "config"])
    assert present["state_topic"] == "jetyolo/ha-dev/yard/detections"
    assert dict(retained(broker.port, "jetyolo/ha-dev/available", 1)) == {
        "jetyolo/ha-dev/available": b"offline"}  # the run ended: availability says so
