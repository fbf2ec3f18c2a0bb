"""Where detections go: MQTT (with an on-disk spool), TCP/UDP sockets, JSONL files, stdout.

The runtime's whole contract::

    options = SinkOptions(device_id="cam-01", class_names=bundle.class_names,
                          model_id=bundle.model_id, spool_dir=Path("/var/lib/jetyolo/spool"))
    with open_sinks(["mqtt://broker:1883", "tcp://127.0.0.1:7070"], options) as sinks:
        sinks.publish_frame(result)          # never blocks
        sinks.publish_stats({"fps": 29.8})   # every options.stats_interval_s
        sinks.depths()                       # queue/spool depths and drops

See docs/mqtt.md for topics, payloads and the no-loss design.
"""

from device.sinks.base import Outgoing, Sink, SinkOptions
from device.sinks.sinkset import (
    ReportPolicy,
    SinkSet,
    check_sinks,
    open_checked_sinks,
    open_sinks,
)
from device.sinks.urls import SinkUrl, parse_sink_url

__all__ = [
    "Outgoing",
    "ReportPolicy",
    "Sink",
    "SinkOptions",
    "SinkSet",
    "SinkUrl",
    "check_sinks",
    "open_checked_sinks",
    "open_sinks",
    "parse_sink_url",
]
