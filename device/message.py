"""What the device says about each frame, as plain JSON-ready dicts: pure functions, no I/O.

The sinks (``device.sinks``) serialise these dicts once and send the same bytes everywhere.
The format is described by ``docs/message.schema.json`` (``$defs/frame`` and ``$defs/stats``);
bump ``SCHEMA_VERSION`` on any change a consumer could notice.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Any, Dict, Mapping, Optional, Protocol, Sequence

from device.detections import FrameResult

SCHEMA_VERSION = 1
FRAME_TYPE = "detections"
STATS_TYPE = "stats"
# Fields every message carries; a stats dict from the runtime may not override them.
ENVELOPE_KEYS = ("schema_version", "type", "device_id", "seq", "timestamp", "model_id")

_UNSAFE_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")


class MessageContext(Protocol):
    """What a message needs to know about the device (``SinkOptions`` provides it)."""

    device_id: str
    model_id: str
    class_names: Sequence[str]


def iso_utc(timestamp: float) -> str:
    """Seconds since the epoch -> ``2026-11-24T09:07:22.123Z`` (UTC, millisecond precision)."""
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_time(payload: bytes) -> Optional[float]:
    """The ``timestamp`` of an encoded message in seconds since the epoch; None when it has
    none (availability payloads) or is not one of ours."""
    try:
        text = json.loads(payload).get("timestamp")
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, TypeError, AttributeError):
        return None


def topic_segment(name: str) -> str:
    """A source or device name as one MQTT topic level: no ``/``, ``+``, ``#`` or spaces.

    ``/dev/video0`` -> ``dev_video0``, ``rtsp://cam:554/live`` -> ``rtsp_cam_554_live``.
    """
    segment = _UNSAFE_TOPIC_CHARS.sub("_", name).strip("_")
    return segment or "source"


def detections_topic(prefix: str, device_id: str, source: str) -> str:
    return f"{prefix}/{device_id}/{topic_segment(source)}/detections"


def stats_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/stats"


def available_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/available"


def _finite_latencies(latency_ms: Mapping[str, float]) -> Dict[str, float]:
    """Per-stage milliseconds rounded to µs; NaN/inf (a stage that did not run) are left out."""
    finite = {}
    for stage, value in latency_ms.items():
        number = float(value)
        if math.isfinite(number):
            finite[str(stage)] = round(number, 3)
    return finite


def build_frame_message(result: FrameResult, seq: int, context: MessageContext) -> Dict[str, Any]:
    """The detections message of one processed frame (sent for empty frames too)."""
    width, height = result.frame_size
    names = list(result.class_names if result.class_names is not None
                  else context.class_names) or None
    return {
        "schema_version": SCHEMA_VERSION,
        "type": FRAME_TYPE,
        "device_id": context.device_id,
        "seq": int(seq),
        "timestamp": iso_utc(result.timestamp),
        "model_id": result.model_id or context.model_id,
        "source": result.source,
        "frame_index": int(result.frame_index),
        "frame_size": {"width": int(width), "height": int(height)},
        "detections": result.detections.to_list(names),
        "latency_ms": _finite_latencies(result.latency_ms),
    }


def build_stats_message(
    stats: Mapping[str, Any], seq: int, context: MessageContext, now: float
) -> Dict[str, Any]:
    """A periodic health message: the runtime's ``stats`` plus the envelope fields.

    ``stats`` holds what the runtime measured (``fps``, ``latency_ms`` p50/p90 per stage,
    ``dropped_frames``, ``uptime_s``, ``backend``, ``precision``, ``jetson`` readings...) and the
    sinks' own ``sinks`` depths. Envelope keys in ``stats`` are ignored (the envelope is ours),
    except ``model_id``: the model running now, which ``jetyolo update`` changes.
    """
    message: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "type": STATS_TYPE,
        "device_id": context.device_id,
        "seq": int(seq),
        "timestamp": iso_utc(now),
        "model_id": str(stats.get("model_id") or context.model_id),
    }
    for key, value in stats.items():
        if key not in ENVELOPE_KEYS:
            message[key] = value
    return message


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays (common in runtime stats) become plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def encode(message: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, one line, no NaN (strict JSON parsers reject it)."""
    text = json.dumps(
        message, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )
    return text.encode("utf-8")

