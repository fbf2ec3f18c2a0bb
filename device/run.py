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
from typing import Any, Dict

from device.bundle import Bundle
from device.config import FIELD_RULES, RunConfig, load_config, optional_path
from device.pipeline import open_run, run_pipeline
from device.sdnotify import Notifier
from device.sinks import SinkOptions, check_sinks, open_sinks

LOG = logging.getLogger(__name__)

# Every config key is also a flag: ``stats_interval_s`` <-> ``--stats-interval-s``.
EXPLICIT_FLAGS = ("bundle", "source", "sinks")
FLAG_ALIASES = {"source_timeout_s": ("--source-timeout",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle folder (or `bundle:` in --config)")
    parser.add_argument("--source", help=FIELD_RULES["source"].help)
    parser.add_argument("--config", help="YAML file with the same keys (docs/runtime.md)")
    parser.add_argument("--sink", dest="sinks", action="append",
                        help="stdout (default), jsonl:PATH, mqtt://HOST[:PORT], mqtts://..., "
                             "tcp://[HOST]:PORT, udp://HOST:PORT; repeat for several")
    for key, rule in FIELD_RULES.items():
        if key in EXPLICIT_FLAGS:
            continue
        parser.add_argument(
            "--" + key.replace("_", "-"), *FLAG_ALIASES.get(key, ()), dest=key, type=rule.kind,
            choices=rule.choices or None, help=rule.help.replace("%", "%%"),
        )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides: Dict[str, Any] = {key: value for key, value in vars(args).items() if key != "config"}
    return load_config(args.config, overrides)


def sink_options(config: RunConfig, bundle: Bundle) -> SinkOptions:
    extra: Dict[str, Any] = {}
    if config.device_id:
        extra["device_id"] = config.device_id
    if config.spool_dir:
        extra["spool_dir"] = config.spool_dir
    if config.spool_max_messages is not None:
        extra["spool_max_messages"] = config.spool_max_messages
    return SinkOptions(
        class_names=bundle.class_names, model_id=bundle.model_id, prefix=config.topic_prefix,
        report=config.report, max_rate_hz=config.report_max_rate_hz, qos=config.mqtt_qos,
        mqtt_ca=optional_path(config.mqtt_ca), mqtt_cert=optional_path(config.mqtt_cert),
        mqtt_key=optional_path(config.mqtt_key),
        stats_interval_s=config.stats_interval_s, **extra,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    bundle = Bundle.load(config.bundle)
    notifier = Notifier.from_env()
    options = sink_options(config, bundle)
    check_sinks(config.sinks, options)  # a --sink typo fails before an engine build
    # Bad sources fail (a live one after source_timeout_s) before sinks announce us.
    source, backend = open_run(config, bundle, notifier)
    try:
        sinks = open_sinks(config.sinks, options)
    except BaseException:
        source.close()
        raise
    with sinks:  # the pipeline closes the source
        summary = run_pipeline(config, sinks, bundle=bundle, opened=(source, backend),
                               notifier=notifier)
    for line in summary.format_lines():
        print(line, file=sys.stderr, flush=True)
    return 0
