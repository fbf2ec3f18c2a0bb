"""Home Assistant MQTT discovery: the retained ``homeassistant/...`` config messages.

Per source, one ``sensor`` per class (how many of that class the latest frame holds) and one
``binary_sensor`` "object present"; all read the source's detections topic with a template and
share the device's availability topic (``online``/``offline``, retained, the MQTT last will).
Topics follow Home Assistant's ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``.
The MQTT sink publishes them (retained, QoS 1) at every connection, so a broker that lost its
retained messages gets them again. Pure functions: no I/O here.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Sequence

from device.config import RunConfig
from device.errors import JetyoloError
from device.message import available_topic, detections_topic
from device.sinks.base import Outgoing, SinkOptions
from device.sinks.urls import parse_sink_url
from device.sources import default_source_name

DEFAULT_PREFIX = "homeassistant"
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")  # node_id/object_id: [a-zA-Z0-9_-]


def discovery_id(text: str) -> str:
    return _UNSAFE_ID_CHARS.sub("_", text).strip("_") or "x"


def _device_block(device_id: str, model_id: str) -> Dict[str, Any]:
    return {
        "identifiers": [f"jetyolo_{discovery_id(device_id)}"],
        "name": f"jetyolo {device_id}",
        "manufacturer": "jetyolo",
        "model": model_id or "jetyolo detector",
    }


def count_template(label: str) -> str:
    """How many detections of ``label`` the message holds (Home Assistant's Jinja)."""
    return (f"{{{{ value_json.detections | selectattr('label', 'equalto', {json.dumps(label)})"
            " | list | length }}")


PRESENT_TEMPLATE = "{{ 'ON' if value_json.detections | length > 0 else 'OFF' }}"


def discovery_messages(
    device_id: str,
    sources: Sequence[str],
    class_names: Sequence[str],
    *,
    topic_prefix: str = "jetyolo",
    discovery_prefix: str = DEFAULT_PREFIX,
    model_id: str = "",
) -> List[Outgoing]:
    """The config messages for every source and class (retained; ``seq`` 0: state, not data)."""
    node = discovery_id(f"jetyolo_{device_id}")
    common = {
        "availability_topic": available_topic(topic_prefix, device_id),
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": _device_block(device_id, model_id),
    }
    messages = []
    for source in sources:
        state_topic = detections_topic(topic_prefix, device_id, source)
        source_id = discovery_id(source)
        for label in class_names:
            object_id = f"{source_id}_{discovery_id(label)}_count"
            config = dict(common, name=f"{source} {label} count",
                          unique_id=f"{node}_{object_id}", state_topic=state_topic,
                          value_template=count_template(label), state_class="measurement",
                          icon="mdi:counter")
            messages.append(_config(discovery_prefix, "sensor", node, object_id, config))
        object_id = f"{source_id}_object_present"
        config = dict(common, name=f"{source} object present", unique_id=f"{node}_{object_id}",
                      state_topic=state_topic, value_template=PRESENT_TEMPLATE,
                      payload_on="ON", payload_off="OFF", device_class="occupancy")
        messages.append(_config(discovery_prefix, "binary_sensor", node, object_id, config))
    return messages


def _config(prefix: str, component: str, node: str, object_id: str,
            config: Dict[str, Any]) -> Outgoing:
    topic = f"{prefix}/{component}/{node}/{object_id}/config"
    payload = json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Outgoing(topic, payload, retain=True)


def config_announcements(config: RunConfig, options: SinkOptions) -> List[Outgoing]:
    """The discovery messages of a run with ``homeassistant: true``; refused without an MQTT
    sink (Home Assistant would never hear of them)."""
    if not any(parse_sink_url(url).kind == "mqtt" for url in config.sinks):
        raise JetyoloError("homeassistant: true needs an mqtt:// or mqtts:// sink (the "
                           "discovery configs go to the broker Home Assistant reads)")
    source = config.source_name or default_source_name(config.source)
    return discovery_messages(options.device_id, [source], options.class_names,
                              topic_prefix=options.prefix,
                              discovery_prefix=config.homeassistant_prefix,
                              model_id=options.model_id)
