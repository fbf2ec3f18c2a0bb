"""device.events: event and zone messages match docs/message.schema.json, and the schema bites."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict

import jsonschema
import numpy as np
import pytest

from device.detections import Detections, FrameResult
from device.events import build_event_message, build_zone_message, events_topic, zone_topic
from device.sinks import SinkOptions
from device.zones import TrackEvent, Zone

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs/message.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
NOW = 1_764_000_000.25


@pytest.fixture
def options(tmp_path: Path) -> SinkOptions:
    return SinkOptions(device_id="jetson-01", class_names=["car", "person"],
                       model_id="synth-1a2b", spool_dir=tmp_path)


def errors(message: Dict[str, Any]) -> list:
    return [e.message for e in VALIDATOR.iter_errors(json.loads(json.dumps(message)))]


CROSS = TrackEvent("cross", "gate", 4, 1, (1.0, 2.0, 30.0, 40.0), NOW, direction="in")
LEAVE = TrackEvent("leave", "door", 4, 0, (1.0, 2.0, 30.0, 40.0), NOW + 2.5, entered_at=NOW)


def frame(index: int = 12, timestamp: float = NOW, **extra: Any) -> FrameResult:
    return FrameResult("cam1", index, timestamp, (640, 480), Detections.empty(), **extra)


def test_event_messages(options: SinkOptions) -> None:
    cross = build_event_message(CROSS, frame(), 7, options)
    assert (cross["type"], cross["event"], cross["direction"], cross["label"]) == (
        "event", "cross", "in", "person")
    assert cross["region_type"] == "line" and cross["seq"] == 7 and errors(cross) == []
    leave = build_event_message(LEAVE, frame(99, NOW + 2.5), 8, options)
    assert leave["dwell_s"] == 2.5 and leave["region_type"] == "zone" and errors(leave) == []
    # the model that computed the frame names the class (a model switch mid-run)
    switched = build_event_message(CROSS, frame(model_id="m2", class_names=["a", "b"]), 9,
                                   options)
    assert (switched["model_id"], switched["label"]) == ("m2", "b")


@pytest.mark.parametrize(
    "event, key, value",
    [
        (CROSS, "direction", None),  # a cross without its direction
        (CROSS, "event", "linger"),  # not an event kind
        (LEAVE, "entered_at", None),  # a leave without when it entered
        (LEAVE, "track_id", -1),  # events are about confirmed tracks only
        (CROSS, "extra", 1),  # unknown field
    ],
)
def test_schema_rejects_broken_events(
    options: SinkOptions, event: TrackEvent, key: str, value: Any
) -> None:
    message = copy.deepcopy(build_event_message(event, frame(), 1, options))
    assert errors(message) == []
    if value is None:
        del message[key]
    else:
        message[key] = value
    assert errors(message) != []


def test_zone_message_counts_by_label(options: SinkOptions) -> None:
    zone = Zone("door", np.array([[0, 0], [100, 0], [100, 100], [0, 100]], float), None, "center")
    zone.update(Detections([[10, 10, 20, 20], [30, 30, 40, 40], [50, 50, 60, 60]], [0.9] * 3,
                           [1, 1, 0], track_id=[1, 2, 3]), NOW)
    message = build_zone_message(zone.snapshot(), frame(), 3, options)
    assert (message["count"], message["counts"]) == (3, {"car": 1, "person": 2})
    assert errors(message) == []
    message["count"] = -1
    assert errors(message) != []


def test_detections_carry_track_ids_when_tracked() -> None:
    tracked = Detections([[0, 0, 5, 5], [1, 1, 6, 6]], [0.9, 0.4], [0, 1], track_id=[3, -1])
    items = tracked.to_list(["car", "person"])
    assert [d["track_id"] for d in items] == [3, None]
    assert "track_id" not in Detections([[0, 0, 5, 5]], [0.9], [0]).to_list()[0]
    again = Detections.from_list(items)
    assert again.track_id is not None and again.track_id.tolist() == [3, -1]
    assert tracked[np.array([1])].track_id.tolist() == [-1]  # type: ignore[union-attr]


def test_topics() -> None:
    assert events_topic("jy", "dev", "rtsp://cam:554/x") == "jy/dev/rtsp_cam_554_x/events"
    assert zone_topic("jy", "dev", "cam1", "door") == "jy/dev/cam1/zones/door"
