"""Run a bundle over a video, image folder, camera or stream and report the detections.

Examples:
  jetyolo run bundle/ --source video.mp4                       # JSON lines on stdout
  jetyolo run bundle/ --source /dev/video0 --sink mqtt://broker:1883 --backend tensorrt
  jetyolo run --config /etc/jetyolo/run.yaml                  # the service's form
  jetyolo run bundle/ --source video.mp4 --sink jsonl:out.jsonl --max-frames 300
  jetyolo run bundle/ --source cut.mp4 --verbose                # FFmpeg's own lines too

Flags override the config file. The summary (frames, seconds, FPS and per-stage p50/p90/p99)
goes to stderr at the end, so stdout stays one JSON message per line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Dict

from device.config import FIELD_RULES, RunConfig, flag_type, load_config
from device.ops.extension import http_extensions
from device.reload import Reloader, crash_guard
from device.sdnotify import Notifier
from device.setup import run_configured
from device.sources import quiet_native_logs

# Every config key is also a flag: ``stats_interval_s`` <-> ``--stats-interval-s``.
EXPLICIT_FLAGS = ("bundle", "source", "sinks", "sources")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle folder (or `bundle:` in --config)")
    parser.add_argument("--source", action="append",
                        help=FIELD_RULES["source"].help + "; repeat for several sources")
    parser.add_argument("--config", help="YAML file with the same keys (docs/runtime.md)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show FFmpeg's and OpenCV's own log lines and jetyolo's debug "
                             "lines (off by default: jetyolo says what they mean in its own)")
    parser.add_argument("--sink", dest="sinks", action="append",
                        help=f"{FIELD_RULES['sinks'].help}; repeat for several (default stdout)")
    for key, rule in FIELD_RULES.items():
        if key in EXPLICIT_FLAGS or rule.kind is dict:  # dict sections live in the file only
            continue
        parser.add_argument(
            "--" + key.replace("_", "-"), *rule.flags, dest=key,
            type=flag_type(rule),
            choices=rule.choices or None, help=rule.help.replace("%", "%%"),
        )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides: Dict[str, Any] = {key: value for key, value in vars(args).items()
                                 if key not in ("config", "verbose")}
    sources = overrides.pop("source", None) or []
    if len(sources) == 1:
        overrides["source"] = sources[0]
    elif sources:
        overrides["sources"] = sources
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    if args.verbose:
        quiet_native_logs(False)  # before the first source opens: FFmpeg reads it then
        logging.getLogger("device").setLevel(logging.DEBUG)
    config = config_from_args(args)
    crash_guard(config)  # a model that keeps crashing the service is rolled back first
    notifier = Notifier.from_env()
    reloader = Reloader(config, notifier)  # SIGHUP: switch to what `bundle:` names now
    summary = run_configured(config, notifier=notifier, wrap_sinks=reloader.wrap_sinks,
                             extensions=[reloader.attach, *http_extensions(config)])
    for line in summary.format_lines():
        print(line, file=sys.stderr, flush=True)
    return 0
