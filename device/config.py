"""``jetyolo run`` settings: a YAML file (for the service) equivalent to the flags.

Every key is a field of ``RunConfig`` with its rule (type, allowed values or range) and help
text in ``FIELD_RULES``; docs/runtime.md lists them. Unknown keys and bad values are refused
with the key's name, what is allowed and, for typos, the closest key. Flags override the file.
Relative paths in a file (``bundle``, ``spool_dir``, ``engine_cache_dir``) are relative to the
file's folder, so a unit file can point at one config next to its bundle.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from device.choice import BACKEND_KINDS, INT8_SOURCES, PRECISIONS
from device.errors import JetyoloError
from device.sinks.base import REPORT_MODES

REQUIRED_KEYS = ("bundle", "source")  # what `jetyolo run` needs; `jetyolo build` only the bundle
PATH_KEYS = ("bundle", "spool_dir", "engine_cache_dir", "mqtt_ca", "mqtt_cert", "mqtt_key",
             "http_token_file", "http_basic_auth_file")


@dataclass(frozen=True)
class Rule:
    kind: type  # str, int, float, bool or list (of str)
    help: str
    choices: Tuple[str, ...] = ()
    low: Optional[float] = None  # inclusive bounds for numbers
    high: Optional[float] = None
    optional: bool = True  # None allowed (means "default")


FIELD_RULES: Dict[str, Rule] = {
    "bundle": Rule(str, "bundle folder made by `jetyolo export`", optional=False),
    "source": Rule(str, "video file, image folder/glob, /dev/videoN, csi://N, rtsp://URL or a "
                        "GStreamer pipeline", optional=False),
    "backend": Rule(str, "inference backend; auto prefers TensorRT", BACKEND_KINDS,
                    optional=False),
    "precision": Rule(str, "TensorRT engine precision (default fp16; on TensorRT 11 fp16 from the "
                           "bundle's fp16 graph, else fp32); ONNX Runtime runs fp32",
                      PRECISIONS),
    "variant": Rule(str, "bundle graph to run (fp32, uint8, nms, int8-qdq); default per backend"),
    "int8_from": Rule(str, "INT8 engine from the calibration cache or the Q/DQ model",
                      INT8_SOURCES),
    "conf": Rule(float, "confidence threshold (default: the bundle's)", low=0.0, high=1.0),
    "iou": Rule(float, "NMS IoU threshold (default: the bundle's)", low=0.0, high=1.0),
    "max_det": Rule(int, "most detections per frame (default: the bundle's)", low=1),
    "sinks": Rule(list, "where results go: stdout, jsonl:PATH, mqtt://, tcp://, udp://",
                  optional=False),
    "device_id": Rule(str, "name of this device in messages (default: the hostname)"),
    "source_name": Rule(str, "name of the source in topics and messages (default: from the "
                             "source: file stem, videoN, csiN, the stream's host)"),
    "spool_dir": Rule(str, "on-disk spool for MQTT messages not yet acknowledged"),
    "engine_cache_dir": Rule(str, "where TensorRT engines are cached (default: "
                                  "$JETYOLO_ENGINE_CACHE, else ~/.cache/jetyolo/engines)"),
    "workspace_mib": Rule(int, "TensorRT builder workspace in MiB (default: auto, half the free "
                               "memory, at most 4 GiB); part of the engine's key, as `jetyolo "
                               "build --workspace MiB`", low=16, high=65536),
    "dla": Rule(int, "build and run the TensorRT engine on DLA core N with GPU fallback "
                     "(Xavier, Orin AGX/NX), as `jetyolo build --dla N`", low=0, high=1),
    "threads": Rule(int, "ONNX Runtime intra-op threads, shared by the infer_workers (default: "
                         "one per core)", low=1, high=256),
    "infer_workers": Rule(int, "ONNX Runtime inferences run at once on consecutive frames, "
                               "frame order kept; threads are shared among them (default 1)",
                          low=1, high=16),
    "report": Rule(str, "which frames are published: every frame, frames with detections, or "
                        "at most report_max_rate_hz per source", REPORT_MODES, optional=False),
    "report_max_rate_hz": Rule(float, "frames per second per source for report: max-rate",
                               low=0.0, optional=False),
    "topic_prefix": Rule(str, "MQTT topic prefix: PREFIX/DEVICE_ID/SOURCE/detections",
                         optional=False),
    "mqtt_qos": Rule(int, "MQTT QoS of detection messages", low=0, high=2, optional=False),
    "mqtt_ca": Rule(str, "CA certificate file for mqtts://"),
    "mqtt_cert": Rule(str, "client certificate file for mqtts://"),
    "mqtt_key": Rule(str, "client key file for mqtts://"),
    "stats_interval_s": Rule(float, "seconds between stats messages and STATUS updates",
                             low=0.1, optional=False),
    "max_frames": Rule(int, "stop after this many frames (default: until the source ends)", low=1),
    "capture_width": Rule(int, "camera capture width (V4L2/CSI)", low=1),
    "capture_height": Rule(int, "camera capture height (V4L2/CSI)", low=1),
    "capture_fps": Rule(int, "camera frame rate (V4L2/CSI)", low=1),
    "rtsp_latency_ms": Rule(int, "RTSP jitter buffer on the Jetson GStreamer path", low=0,
                            optional=False),
    "reconnect_max_s": Rule(float, "longest wait between reconnect attempts of a live source",
                            low=0.1, optional=False),
    "source_timeout_s": Rule(float, "seconds a live source (camera, stream) may take to open at "
                                    "start, retrying with the reconnect back-off; 0 fails at "
                                    "once, inf waits forever (default: inf under systemd, "
                                    "i.e. with NOTIFY_SOCKET set, else 0)", low=0.0),
    "spool_max_messages": Rule(int, "most MQTT messages kept in the on-disk spool while the "
                                    "broker is away; the oldest are dropped beyond it "
                                    "(default 100000)", low=1),
    "buffers": Rule(int, "input buffers in the preprocess -> infer ring", low=2, high=8,
                    optional=False),
    "http": Rule(str, "HTTP endpoint address (/metrics, /healthz, /api/stats, preview page), "
                      "e.g. 127.0.0.1:8080; off when unset (docs/http.md)"),
    "http_allow_remote": Rule(bool, "let http listen on a non-loopback address (needs "
                                    "http_token_file or http_basic_auth_file)", optional=False),
    "http_token_file": Rule(str, "file holding the bearer token HTTP requests must send"),
    "http_basic_auth_file": Rule(str, "file holding one user:password line for HTTP basic auth"),
    "http_preview_fps": Rule(float, "most preview frames per second per camera (encoded only "
                                    "while someone watches)", low=0.1, high=30.0,
                             optional=False),
    "homeassistant": Rule(bool, "publish Home Assistant MQTT discovery configs (retained)",
                          optional=False),
    "homeassistant_prefix": Rule(str, "Home Assistant's MQTT discovery prefix", optional=False),
}


@dataclass
class RunConfig:
    bundle: str = ""
    source: str = ""
    backend: str = "auto"
    precision: Optional[str] = None
    variant: Optional[str] = None
    int8_from: Optional[str] = None
    conf: Optional[float] = None
    iou: Optional[float] = None
    max_det: Optional[int] = None
    sinks: List[str] = field(default_factory=lambda: ["stdout"])
    device_id: Optional[str] = None
    source_name: Optional[str] = None
    spool_dir: Optional[str] = None
    engine_cache_dir: Optional[str] = None
    workspace_mib: Optional[int] = None
    dla: Optional[int] = None
    threads: Optional[int] = None
    infer_workers: Optional[int] = None
    report: str = "every"
    report_max_rate_hz: float = 0.0
    topic_prefix: str = "jetyolo"
    mqtt_qos: int = 1
    mqtt_ca: Optional[str] = None
    mqtt_cert: Optional[str] = None
    mqtt_key: Optional[str] = None
    stats_interval_s: float = 10.0
    max_frames: Optional[int] = None
    capture_width: Optional[int] = None
    capture_height: Optional[int] = None
    capture_fps: Optional[int] = None
    rtsp_latency_ms: int = 200
    reconnect_max_s: float = 30.0
    source_timeout_s: Optional[float] = None
    spool_max_messages: Optional[int] = None
    buffers: int = 3
    http: Optional[str] = None
    http_allow_remote: bool = False
    http_token_file: Optional[str] = None
    http_basic_auth_file: Optional[str] = None
    http_preview_fps: float = 5.0
    homeassistant: bool = False
    homeassistant_prefix: str = "homeassistant"

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def optional_path(value: Optional[str]) -> Optional[Path]:
    """A path-valued key (``spool_dir``, ``mqtt_ca``, ...) as a Path with ``~`` expanded; None
    when unset."""
    return Path(value).expanduser() if value else None


def parse_flag_bool(text: str) -> bool:
    """A boolean flag value: true/false, yes/no, on/off, 1/0 (argparse's ``type=bool`` would
    read "false" as True)."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _reject(origin: str, key: str, message: str) -> JetyoloError:
    return JetyoloError(f"{origin}: {key}: {message}")


def check_value(key: str, value: Any, origin: str = "config") -> Any:
    """``value`` converted to the key's type (int -> float allowed), or a JetyoloError."""
    rule = FIELD_RULES[key]
    if value is None:
        if rule.optional:
            return None
        raise _reject(origin, key, f"must be set ({rule.help})")
    if rule.kind is list:
        return _check_list(origin, key, value)
    if rule.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, rule.kind) or (rule.kind is not bool and isinstance(value, bool)):
        raise _reject(origin, key, f"must be {rule.kind.__name__}, got {value!r} ({rule.help})")
    _check_allowed(origin, key, rule, value)
    return value


def _check_allowed(origin: str, key: str, rule: Rule, value: Any) -> None:
    if rule.choices and value not in rule.choices:
        allowed = ", ".join(rule.choices)
        raise _reject(origin, key, f"{value!r} is not allowed; use one of {allowed}")
    if rule.low is not None and value < rule.low:
        raise _reject(origin, key, f"{value!r} is below the minimum {rule.low:g}")
    if rule.high is not None and value > rule.high:
        raise _reject(origin, key, f"{value!r} is above the maximum {rule.high:g}")
    if rule.kind is str and not value.strip():
        raise _reject(origin, key, f"is empty ({rule.help})")


def _check_list(origin: str, key: str, value: Any) -> List[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _reject(origin, key, f"must be a non-empty list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise _reject(origin, key, f"entries must be non-empty strings, got {item!r}")
    return list(value)


def unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELD_RULES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed keys: {', '.join(FIELD_RULES)}"


def checked_values(values: Mapping[str, Any], origin: str) -> Dict[str, Any]:
    """Each key known and each value valid; values converted to their key's type."""
    checked = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in FIELD_RULES:
            raise _reject(origin, str(key), unknown_key_message(str(key)))
        checked[key] = check_value(key, value, origin)
    return checked


def _complete(
    values: Dict[str, Any], origin: str, required_keys: Tuple[str, ...] = REQUIRED_KEYS
) -> RunConfig:
    config = RunConfig(**values)
    for required in required_keys:
        if not getattr(config, required):
            how = "the BUNDLE argument" if required == "bundle" else "--source"
            raise JetyoloError(
                f"{origin}: {required} is not set; give {how} or `{required}:` in the config file"
            )
    return config


def config_from_mapping(values: Mapping[str, Any], origin: str = "config") -> RunConfig:
    """A complete ``RunConfig`` from one mapping (defaults for the keys it leaves out)."""
    return _complete(checked_values(values, origin), origin)


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """The YAML mapping in ``path``, with path keys made relative to the file's folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise JetyoloError(f"config file {path} {what}; pass the YAML file (docs/runtime.md)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JetyoloError(f"config file {path} cannot be read as UTF-8 text ({exc})") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        reason = str(exc).replace("\n", " ")
        raise JetyoloError(f"config file {path} is not valid YAML: {reason}") from exc
    if not isinstance(data, dict):
        raise JetyoloError(f"config file {path} must be a mapping of keys to values, "
                           f"got {type(data).__name__}")
    for key in PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[key] = str(path.parent / value)
    return data


def load_config(
    path: Optional[Union[str, Path]],
    overrides: Mapping[str, Any],
    required_keys: Tuple[str, ...] = REQUIRED_KEYS,
) -> RunConfig:
    """File values (when ``path``), then every override that is not None (the flags).
    ``required_keys`` must be set by one of them (``jetyolo build`` needs no source)."""
    merged: Dict[str, Any] = {}
    if path:
        merged.update(checked_values(read_config_file(path), str(path)))
    given = {key: value for key, value in overrides.items() if value is not None}
    merged.update(checked_values(given, "flags"))
    return _complete(merged, str(path) if path else "flags", required_keys)
