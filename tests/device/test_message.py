"""Message building is pure: check the fields, the schema in docs/, and that the schema bites."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict

import jsonschema
import pytest

from device.detections import Detections, FrameResult
from device.message import (
    build_frame_message,
    build_stats_message,
    detections_topic,
    encode,
    iso_utc,
    topic_segment,
)
from device.sinks import SinkOptions

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs/message.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


@pytest.fixture
def frame(make_result: Callable[..., FrameResult]) -> Callable[..., FrameResult]:
    return make_result


@pytest.fixture
def options(tmp_path: Path) -> SinkOptions:
    return SinkOptions(device_id="jetson-01", class_names=["car", "person", "bike"],
                       model_id="synth320-1a2b3c4d", spool_dir=tmp_path)


def schema_errors(message: Dict[str, Any]) -> list:
    return [error.message for error in VALIDATOR.iter_errors(message)]


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_frame_message_fields(options: SinkOptions, frame: Callable[..., FrameResult]) -> None:
    result = frame(7, detections=2, t0=1_700_000_000.0)
    message = build_frame_message(result, 42, options)
    assert message["seq"] == 42
    assert message["device_id"] == "jetson-01"
    assert message["model_id"] == "synth320-1a2b3c4d"
    assert message["frame_index"] == 7
    assert message["timestamp"] == iso_utc(1_700_000_000.0 + 7 / 30)
    assert message["frame_size"] == {"width": 640, "height": 480}
    assert message["detections"][0] == {"label": "car", "class_id": 0, "score": 0.9,
                                        "box": [10.0, 20.0, 110.0, 220.0]}
    assert message["detections"][1]["label"] == "person"
    assert message["latency_ms"] == {"preprocess": 1.25, "infer": 8.5, "postprocess": 0.75}
    assert schema_errors(message) == []


def test_empty_frame_is_a_valid_message(
    options: SinkOptions, frame: Callable[..., FrameResult]
) -> None:
    message = build_frame_message(frame(0, detections=0), 1, options)
    assert message["detections"] == []
    assert schema_errors(message) == []


def test_iso_utc_is_utc_with_milliseconds() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"


def test_non_finite_latency_is_left_out_and_encoding_is_strict_json(
    options: SinkOptions,
) -> None:
    result = FrameResult("cam0", 0, 1.7e9, (640, 480), Detections.empty(),
                         {"infer": float("nan"), "capture": 2.0})
    message = build_frame_message(result, 1, options)
    assert message["latency_ms"] == {"capture": 2.0}
    json.loads(encode(message))
    with pytest.raises(ValueError):
        encode({"fps": math.inf})


def test_class_id_without_a_name_gets_its_number(
    options: SinkOptions, frame: Callable[..., FrameResult]
) -> None:
    result = frame(0, detections=1)
    result.detections.class_id[:] = 9
    assert build_frame_message(result, 1, options)["detections"][0]["label"] == "9"


def test_a_frame_from_a_switched_model_carries_its_model_id_and_names(
    options: SinkOptions, frame: Callable[..., FrameResult]
) -> None:
    result = frame(0, detections=1)
    result.model_id, result.class_names = "synth-b@0f0f0f0f0f0f", ["truck"]
    message = build_frame_message(result, 1, options)
    assert (message["model_id"], message["detections"][0]["label"]) == (
        "synth-b@0f0f0f0f0f0f", "truck")
    assert build_frame_message(frame(0), 2, options)["model_id"] == "synth320-1a2b3c4d"
    stats = build_stats_message({"model_id": "synth-b@0f0f0f0f0f0f", "sinks": {}}, 3, options, 0.0)
    assert stats["model_id"] == "synth-b@0f0f0f0f0f0f"
    assert build_stats_message({"sinks": {}}, 4, options, 0.0)["model_id"] == "synth320-1a2b3c4d"


def test_stats_message_keeps_its_envelope_and_encodes_numpy(options: SinkOptions) -> None:
    import numpy as np

    stats = {"fps": np.float32(29.5), "seq": 999, "device_id": "spoof", "backend": "tensorrt",
             "latency_ms": {"infer": {"p50": 8.0, "p90": 9.5}},
             "sinks": {"intake": 0, "intake_dropped": 0, "frames_reported": 3,
                       "frames_skipped": 0, "per_sink": {"stdout": {"queue": 0, "dropped": 0}}}}
    message = json.loads(encode(build_stats_message(stats, 5, options, now=1.7e9)))
    assert (message["seq"], message["device_id"], message["type"]) == (5, "jetson-01", "stats")
    assert message["fps"] == pytest.approx(29.5)
    assert schema_errors(message) == []


def _frame(options: SinkOptions) -> Dict[str, Any]:
    boxes = Detections([[10, 20, 110, 220]], [0.9], [0])
    return build_frame_message(FrameResult("cam0", 3, 1.7e9, (640, 480), boxes, {"infer": 8.0}),
                               10, options)


def _set(message: Dict[str, Any], path: str, value: Any) -> Dict[str, Any]:
    broken = copy.deepcopy(message)
    target = broken
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    if value is KeyError:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return broken


@pytest.mark.parametrize(
    "path, value",
    [
        ("seq", 0),  # seq starts at 1
        ("seq", "10"),  # seq is a number, not a string
        ("timestamp", "2026-11-24 09:00:00"),  # not ISO-8601 UTC with Z
        ("timestamp", "2026-11-24T09:00:00.000+01:00"),  # not UTC
        ("device_id", "a/b"),  # would add a topic level
        ("detections.0.box", [1, 2, 3]),  # box needs four numbers
        ("detections.0.score", 1.5),  # a score is a probability
        ("detections.0.extra", 1),  # detections are closed objects
        ("frame_size.width", 0),  # frames have pixels
        ("latency_ms.infer", -1.0),  # durations are not negative
        ("schema_version", 2),  # unknown version
        ("model_id", KeyError),  # required field missing
        ("unexpected", True),  # frame messages are closed objects
    ],
)
def test_schema_rejects_broken_frame_messages(options: SinkOptions, path: str, value: Any) -> None:
    assert schema_errors(_frame(options)) == []
    assert schema_errors(_set(_frame(options), path, value)) != []


@pytest.mark.parametrize(
    "name, segment",
    [
        ("cam0", "cam0"),  # already safe
        ("/dev/video0", "dev_video0"),  # a device path
        ("rtsp://user@cam:554/live", "rtsp_user_cam_554_live"),  # a URL
        ("a+b#c d", "a_b_c_d"),  # MQTT wildcards and spaces
        ("///", "source"),  # nothing left
    ],
)
def test_topic_segment(name: str, segment: str) -> None:
    assert topic_segment(name) == segment


def test_detections_topic_has_one_level_per_part() -> None:
    topic = detections_topic("jetyolo", "jetson-01", "/dev/video0")
    assert topic == "jetyolo/jetson-01/dev_video0/detections"
