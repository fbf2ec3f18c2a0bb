"""Run a bundle over a video, image folder, camera or stream and report the detections.

Examples:
  jetyolo run bundle/ --source video.mp4                       # JSON lines on stdout
  jetyolo run bundle/ --source /dev/video0 --sink mqtt://broker:1883 --backend tensorrt
  jetyolo run --config /etc/jetyolo/run.yaml                  # the service's form
  jetyolo run bundle/ --source video.mp4 --sink jsonl:out.jsonl --max-frames 300

Flags override the config file. The summary (frames, seconds, FPS and per-stage p50/p90/p99)
goes to stderr at the end, so stdout stays one JSON message per line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from device.bundle import Bundle
from device.config import BACKENDS, INT8_SOURCES, PRECISIONS, RunConfig, load_config
from device.pipeline import open_run, run_pipeline
from device.sinks import SinkOptions, open_sinks
from device.sinks.base import REPORT_MODES

LOG = logging.getLogger(__name__)

# flag dest -> config key, for flags whose names differ from their key
FLAG_KEYS = {"sink": "sinks", "stats_interval": "stats_interval_s"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle folder (or `bundle:` in --config)")
    parser.add_argument("--source", help="video file, image folder/glob, /dev/videoN, csi://N, "
                                         "rtsp://URL or a GStreamer pipeline")
    parser.add_argument("--config", help="YAML file with the same keys (docs/runtime.md)")
    parser.add_argument("--backend", choices=BACKENDS, help="default auto: TensorRT if possible")
    parser.add_argument("--precision", choices=PRECISIONS, help="TensorRT engine precision")
    parser.add_argument("--variant", help="bundle graph: fp32, uint8, nms, int8-qdq")
    parser.add_argument("--int8-from", choices=INT8_SOURCES, help="INT8 from cache or Q/DQ model")
    parser.add_argument("--conf", type=float, help="confidence threshold (default: bundle's)")
    parser.add_argument("--iou", type=float, help="NMS IoU threshold (default: bundle's)")
    parser.add_argument("--max-det", type=int, help="most detections per frame")
    parser.add_argument("--sink", action="append",
                        help="stdout (default), jsonl:PATH, mqtt://HOST[:PORT], tcp://[HOST]:PORT, "
                             "udp://HOST:PORT; repeat for several")
    parser.add_argument("--max-frames", type=int, help="stop after N frames")
    parser.add_argument("--device-id", help="device name in messages (default: hostname)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads")
    parser.add_argument("--report", choices=REPORT_MODES, help="which frames are published")
    parser.add_argument("--stats-interval", type=float, help="seconds between stats messages")
    parser.add_argument("--engine-cache-dir", help="TensorRT engine cache folder")
    parser.add_argument("--spool-dir", help="MQTT spool folder")
    parser.add_argument("--buffers", type=int, help="input buffer ring size (2-8, default 3)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides: Dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest == "config":
            continue
        overrides[FLAG_KEYS.get(dest, dest)] = value
    return load_config(args.config, overrides)


def sink_options(config: RunConfig, bundle: Bundle) -> SinkOptions:
    extra: Dict[str, Any] = {}
    if config.device_id:
        extra["device_id"] = config.device_id
    if config.spool_dir:
        extra["spool_dir"] = config.spool_dir
    return SinkOptions(
        class_names=bundle.class_names, model_id=bundle.model_id, prefix=config.topic_prefix,
        report=config.report, max_rate_hz=config.report_max_rate_hz, qos=config.mqtt_qos,
        mqtt_ca=_path(config.mqtt_ca), mqtt_cert=_path(config.mqtt_cert),
        mqtt_key=_path(config.mqtt_key),
        stats_interval_s=config.stats_interval_s, **extra,
    )


def _path(value: Optional[str]) -> Optional[Path]:
    return Path(value).expanduser() if value else None


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    bundle = Bundle.load(config.bundle)
    source, backend = open_run(config, bundle)  # bad sources fail before sinks announce us
    try:
        with open_sinks(config.sinks, sink_options(config, bundle)) as sinks:
            summary = run_pipeline(config, sinks, bundle=bundle, opened=(source, backend))
    finally:
        source.close()
    for line in summary.format_lines():
        print(line, file=sys.stderr, flush=True)
    return 0
