"""Event and zone-count messages, as plain JSON-ready dicts: pure functions, no I/O.

An ``event`` message is one ``TrackEvent`` (enter/leave a zone, cross a line) on
``PREFIX/DEVICE/SOURCE/events``; a ``zone`` message is a zone's occupancy on
``PREFIX/DEVICE/SOURCE/zones/NAME``, sent retained whenever it changes, so a new subscriber
reads the current count at once. Both carry the envelope of every message (``seq`` from the same
counter, so the spool keeps them in order with the detections). docs/message.schema.json
(``$defs/event``, ``$defs/zone``) describes them.
"""

from __future__ import annotations

from typing import Any, Dict, List

from device.detections import FrameResult, class_label
from device.message import SCHEMA_VERSION, MessageContext, iso_utc, topic_segment
from device.zones import TrackEvent, ZoneCount

EVENT_TYPE = "event"
ZONE_TYPE = "zone"


def events_topic(prefix: str, device_id: str, source: str) -> str:
    return f"{prefix}/{device_id}/{topic_segment(source)}/events"


def zone_topic(prefix: str, device_id: str, source: str, zone: str) -> str:
    return f"{prefix}/{device_id}/{topic_segment(source)}/zones/{topic_segment(zone)}"


def _envelope(
    kind: str, seq: int, context: MessageContext, result: FrameResult, timestamp: float
) -> Dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "type": kind,
        "device_id": context.device_id,
        "seq": int(seq),
        "timestamp": iso_utc(timestamp),
        "model_id": result.model_id or context.model_id,
        "source": result.source,
    }


def _names(result: FrameResult, context: MessageContext) -> List[str]:
    """The class names of the model that computed the frame (as build_frame_message)."""
    return list(result.class_names if result.class_names is not None else context.class_names)


def build_event_message(
    event: TrackEvent, result: FrameResult, seq: int, context: MessageContext
) -> Dict[str, Any]:
    """One event of the frame ``result``; ``timestamp`` is that frame's capture time."""
    message = _envelope(EVENT_TYPE, seq, context, result, event.timestamp)
    message.update({
        "frame_index": int(result.frame_index),
        "event": event.kind,
        "region": event.region,
        "region_type": "line" if event.kind == "cross" else "zone",
        "track_id": int(event.track_id),
        "class_id": int(event.class_id),
        "label": class_label(event.class_id, _names(result, context)),
        "box": [float(v) for v in event.box],
    })
    if event.direction is not None:
        message["direction"] = event.direction
    if event.entered_at is not None:
        message["entered_at"] = iso_utc(event.entered_at)
        message["dwell_s"] = round(event.timestamp - event.entered_at, 3)
    return message


def build_zone_message(
    zone: ZoneCount, result: FrameResult, seq: int, context: MessageContext
) -> Dict[str, Any]:
    """A zone's occupancy after the frame ``result``: ``count`` and ``counts`` per class label."""
    names = _names(result, context)
    message = _envelope(ZONE_TYPE, seq, context, result, result.timestamp)
    message.update({
        "zone": zone.name,
        "count": zone.count,
        "counts": {class_label(c, names): n for c, n in sorted(zone.counts_by_class.items())},
    })
    return message

