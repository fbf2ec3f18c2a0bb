"""``jetyolo run`` settings: a YAML file (for the service) equivalent to the flags.

Every key is a field of ``RunConfig`` with its rule (type, allowed values or range) and help
text in ``FIELD_RULES``; docs/runtime.md lists them. Unknown keys and bad values are refused
with the key's name, what is allowed and, for typos, the closest key. Flags override the file.
Relative paths in a file (``bundle``, ``spool_dir``, ``engine_cache_dir``) are relative to the
file's folder, so a unit file can point at one config next to its bundle.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from device.choice import BACKEND_KINDS, INT8_SOURCES, PRECISIONS
from device.decode_scale import DECODE_SCALES
from device.errors import JetyoloError
from device.sinks.base import REPORT_MODES
from device.sinks.urls import FORMS as SINK_FORMS
from device.tracking import TRACKER_KINDS
from device.tracking_config import parse_tracking

INFINITY_ALLOWED = ("source_timeout_s",)  # inf: wait for the camera forever (docs/runtime.md)
REQUIRED_KEYS = ("bundle", "source")  # what `jetyolo run` needs; `jetyolo build` only the bundle
PATH_KEYS = ("bundle", "spool_dir", "engine_cache_dir", "mqtt_ca", "mqtt_cert", "mqtt_key",
             "http_token_file", "http_basic_auth_file")


@dataclass(frozen=True)
class Rule:
    """A key's rule, derived from its ``RunConfig`` field (type from the annotation)."""

    kind: type  # str, int, float, bool, list (of str) or dict (a file-only section)
    help: str
    choices: Tuple[str, ...] = ()
    low: Optional[float] = None  # inclusive bounds for numbers
    high: Optional[float] = None
    optional: bool = True  # None allowed (means "default")
    default: Any = None
    flags: Tuple[str, ...] = ()  # extra flag spellings beside --the-key
    check: Optional[Callable[[Any, str], Any]] = None  # a dict section's own checker
    entries: Optional[type] = None  # a list of these (strings or mappings), e.g. SourceEntry
    auto: bool = False  # "auto" is a value: the key's auto rule, as when unset (None)


def key(
    default: Any,
    help: str,
    *,
    choices: Tuple[str, ...] = (),
    low: Optional[float] = None,
    high: Optional[float] = None,
    flags: Tuple[str, ...] = (),
    check: Optional[Callable[[Any, str], Any]] = None,
    entries: Optional[type] = None,
    auto: bool = False,
) -> Any:
    """A ``RunConfig`` (or ``SourceEntry``) field with its rule: the one place a key is
    declared."""
    rule = {"help": help, "choices": choices, "low": low, "high": high, "flags": flags,
            "check": check, "entries": entries, "auto": auto}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=rule)
    return field(default=default, metadata=rule)


# The keys a ``sources:`` entry may set for itself, with the top-level key's rule (declared
# once, in RunConfig); an entry's ``name`` is the top-level ``source_name``.
SOURCE_OVERRIDES = ("capture_width", "capture_height", "capture_fps", "conf", "classes",
                    "report")


@dataclass
class SourceEntry:
    """One entry of ``sources:``: a string (the source) or a mapping of ``source``, ``name``
    and the ``SOURCE_OVERRIDES`` keys (unset: the top-level value)."""

    source: str = ""
    name: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, config: Any) -> Any:
        """This entry's ``key``, else ``config``'s."""
        value = self.overrides.get(key)
        return value if value is not None else getattr(config, key)


@dataclass
class RunConfig:
    bundle: str = key("", "bundle folder made by `jetyolo export`")
    source: str = key("", "video file, image folder/glob, /dev/videoN, csi://N, rtsp://URL or a "
                          "GStreamer pipeline")
    backend: str = key("auto", "inference backend; auto prefers TensorRT", choices=BACKEND_KINDS)
    precision: Optional[str] = key(None, "TensorRT engine precision (default fp16; on TensorRT 11 "
                                         "fp16 from the bundle's fp16 graph, else fp32); ONNX "
                                         "Runtime runs fp32", choices=PRECISIONS)
    variant: Optional[str] = key(None, "bundle graph to run (fp32, uint8, nms, int8-qdq); "
                                       "default per backend")
    int8_from: Optional[str] = key(None, "INT8 engine from the calibration cache or the Q/DQ "
                                         "model", choices=INT8_SOURCES)
    conf: Optional[float] = key(None, "confidence threshold (default: the bundle's)",
                                low=0.0, high=1.0)
    classes: Optional[List[str]] = key(None, "publish only these classes, by name or id "
                                             "(default: every class)")
    iou: Optional[float] = key(None, "NMS IoU threshold (default: the bundle's)",
                               low=0.0, high=1.0)
    max_det: Optional[int] = key(None, "most detections per frame (default: the bundle's)", low=1)
    sinks: List[str] = key(["stdout"], f"where results go: {SINK_FORMS}")
    device_id: Optional[str] = key(None, "name of this device in messages (default: the "
                                         "hostname)")
    source_name: Optional[str] = key(None, "name of the source in topics and messages (default: "
                                           "from the source: file stem, videoN, csiN, the "
                                           "stream's host)")
    sources: Optional[List[SourceEntry]] = key(
        None, "several sources in one process, one engine: a list of sources, each a string or "
              "a mapping with source, name and its own capture_width, capture_height, "
              "capture_fps, conf, classes, report (instead of source; a repeated --source "
              "makes one)",
        entries=SourceEntry)
    batch_size: Optional[int] = key(None, "frames per inference call, at most the engine's "
                                          "batch (default: the engine's batch; `jetyolo export "
                                          "--batch N`)", low=1)
    batch_timeout_ms: float = key(5.0, "longest wait for more frames to fill a batch once its "
                                       "first frame is in; 0 sends what is ready", low=0.0)
    spool_dir: Optional[str] = key(None, "on-disk spool for MQTT messages not yet acknowledged "
                                         "(default: `$JETYOLO_HOME/spool`, else "
                                         "`~/.jetyolo/spool`)")
    engine_cache_dir: Optional[str] = key(None, "where TensorRT engines are cached (default: "
                                                "`$JETYOLO_ENGINE_CACHE`, else "
                                                "`$XDG_CACHE_HOME/jetyolo/engines`, else "
                                                "`~/.cache/jetyolo/engines`)")
    workspace_mib: Optional[int] = key(None, "TensorRT builder workspace in MiB (default: auto, "
                                             "half the free memory, at most 4 GiB); part of the "
                                             "engine's key, as `jetyolo build --workspace MiB`",
                                       low=16, high=65536)
    dla: Optional[int] = key(None, "build and run the TensorRT engine on DLA core N with GPU "
                                   "fallback (Xavier, Orin AGX/NX), as `jetyolo build --dla N`",
                             low=0, high=1)
    threads: Optional[int] = key(None, "ONNX Runtime intra-op threads, shared by the "
                                       "infer_workers; auto: the rule in docs/runtime.md "
                                       "(Threads auto)", low=1, high=256, auto=True)
    infer_workers: Optional[int] = key(None, "ONNX Runtime inferences run at once on consecutive "
                                             "frames, frame order kept; threads are shared among "
                                             "them; auto: one per core, at most 2 (1 when "
                                             "threads is set; docs/runtime.md, Threads auto)",
                                       low=1, high=16, auto=True)
    report: str = key("every", "which frames are published: every frame, frames with "
                               "detections, at most report_max_rate_hz per source, or none "
                               "(events: only tracking events and zone counts)",
                      choices=REPORT_MODES)
    report_max_rate_hz: float = key(0.0, "frames per second per source for report: max-rate",
                                    low=0.0)
    topic_prefix: str = key("jetyolo", "MQTT topic prefix: PREFIX/DEVICE_ID/SOURCE/detections")
    mqtt_qos: int = key(1, "MQTT QoS of detection messages", low=0, high=2)
    mqtt_ca: Optional[str] = key(None, "CA certificate file for mqtts://")
    mqtt_cert: Optional[str] = key(None, "client certificate file for mqtts://")
    mqtt_key: Optional[str] = key(None, "client key file for mqtts://")
    stats_interval_s: float = key(10.0, "seconds between stats messages and STATUS updates",
                                  low=0.1)
    max_frames: Optional[int] = key(None, "stop after this many frames (default: until the "
                                          "source ends)", low=1)
    capture_width: Optional[int] = key(None, "camera capture width (V4L2/CSI)", low=1)
    capture_height: Optional[int] = key(None, "camera capture height (V4L2/CSI)", low=1)
    capture_fps: Optional[int] = key(None, "camera frame rate (V4L2/CSI)", low=1)
    decode_scale: str = key("auto", "MJPEG streams (http://): decode at 1/2, 1/4 or 1/8 of the "
                                    "frame size, boxes still in source pixels; auto: the "
                                    "largest reduction that keeps the frame at least its "
                                    "letterboxed size (docs/runtime.md, Sources)",
                            choices=DECODE_SCALES)
    rtsp_latency_ms: int = key(200, "RTSP jitter buffer on the Jetson GStreamer path", low=0)
    reconnect_max_s: float = key(30.0, "longest wait between reconnect attempts of a live "
                                       "source", low=0.1)
    source_timeout_s: Optional[float] = key(
        None, "seconds a live source (camera, stream) may take to open at start, retrying with "
              "the reconnect back-off; 0 fails at once, inf waits forever (default: inf under "
              "systemd, i.e. with NOTIFY_SOCKET set, else 0)", low=0.0,
        flags=("--source-timeout",))
    spool_max_messages: Optional[int] = key(None, "most MQTT messages kept in the on-disk spool "
                                                  "while the broker is away; the oldest are "
                                                  "dropped beyond it (default 100000)", low=1)
    buffers: int = key(3, "input buffers in the preprocess -> infer ring", low=2, high=8)
    http: Optional[str] = key(None, "HTTP endpoint address (/metrics, /healthz, /api/stats, "
                                    "preview page), e.g. 127.0.0.1:8080; off when unset "
                                    "(docs/http.md)")
    http_allow_remote: bool = key(False, "let http listen on a non-loopback address (needs "
                                         "http_token_file or http_basic_auth_file)")
    http_token_file: Optional[str] = key(None, "file holding the bearer token HTTP requests must "
                                               "send")
    http_basic_auth_file: Optional[str] = key(None, "file holding one user:password line for "
                                                    "HTTP basic auth")
    http_preview_fps: float = key(5.0, "most preview frames per second per camera (encoded only "
                                       "while someone watches)", low=0.1, high=30.0)
    homeassistant: bool = key(False, "publish Home Assistant MQTT discovery configs (retained)")
    homeassistant_prefix: str = key("homeassistant", "Home Assistant's MQTT discovery prefix")
    tracker: str = key("bytetrack", "multi-object tracker per source (track_id on each "
                                    "detection; zones and lines need it): bytetrack, botsort or "
                                    "none", choices=TRACKER_KINDS)
    tracking: Optional[Dict[str, Any]] = key(None, "file only: tracker settings, zones, lines "
                                                   "and per-source overrides (docs/runtime.md, "
                                                   "Tracking)", check=parse_tracking)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _kind_and_optional(hint: Any) -> Tuple[type, bool]:
    """``Optional[int]`` -> (int, True); ``List[str]`` -> (list, False)."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is Union and type(None) in args
    if optional:
        hint = next(arg for arg in args if arg is not type(None))
    origin = typing.get_origin(hint)
    return (origin if origin is not None else hint), optional


def _rule(spec: Field, hint: Any) -> Rule:
    kind, optional = _kind_and_optional(hint)
    default = spec.default_factory() if callable(spec.default_factory) else spec.default
    return Rule(kind=kind, optional=optional, default=default, **spec.metadata)


def rules_of(cls: type) -> Dict[str, Rule]:
    hints = typing.get_type_hints(cls)
    return {spec.name: _rule(spec, hints[spec.name]) for spec in fields(cls)}


FIELD_RULES: Dict[str, Rule] = rules_of(RunConfig)
SOURCE_RULES: Dict[str, Rule] = {
    "source": FIELD_RULES["source"], "name": FIELD_RULES["source_name"],
    **{name: FIELD_RULES[name] for name in SOURCE_OVERRIDES},
}


def docs_table() -> str:
    """The key table of docs/runtime.md, from the rules (a test keeps the docs equal to it)."""
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, rule in FIELD_RULES.items():
        kind = "list of str" if rule.kind is list else rule.kind.__name__
        if rule.entries is not None:
            kind = "list of sources"
        default = "(required)" if name in REQUIRED_KEYS else _shown(rule.default)
        if rule.auto and rule.default is None:
            default = "auto"
        meaning = rule.help + (f". Flag: `{rule.flags[0]}`" if rule.flags else "")
        rows.append(f"| `{name}` | {kind} | `{default}` | {_allowed(rule)} | {meaning} |")
    return "\n".join(rows) + "\n"


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return str(default).lower()  # as YAML writes it
    return repr(default) if isinstance(default, list) else str(default)


def _allowed(rule: Rule) -> str:
    if rule.auto:
        return "auto, " + _allowed(replace(rule, auto=False))
    if rule.choices:
        return ", ".join(rule.choices)
    if rule.low is not None and rule.high is not None:
        return f"{rule.low:g} … {rule.high:g}"
    if rule.low is not None:
        return f">= {rule.low:g}"
    return ""


def flag_type(rule: Rule) -> Callable[[str], Any]:
    """How a key's flag value is read: booleans as ``parse_flag_bool``, ``auto`` kept as the
    word for keys that take it (so it overrides a file's value; ``check_value`` makes it
    None), else the key's type."""
    if rule.kind is bool:
        return parse_flag_bool
    if not rule.auto:
        return rule.kind

    def parse(text: str) -> Any:
        return "auto" if text.strip().lower() == "auto" else rule.kind(text)

    parse.__name__ = f"{rule.kind.__name__} or auto"  # argparse's "invalid ... value"
    return parse


def parse_flag_bool(text: str) -> bool:
    """A boolean flag value: true/false, yes/no, on/off, 1/0 (argparse's ``type=bool`` would
    read "false" as True)."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def optional_path(value: Optional[str]) -> Optional[Path]:
    """A path-valued key (``spool_dir``, ``mqtt_ca``, ...) as a Path with ``~`` expanded; None
    when unset."""
    return Path(value).expanduser() if value else None


def _reject(origin: str, key: str, message: str) -> JetyoloError:
    return JetyoloError(f"{origin}: {key}: {message}")


def check_value(
    key: str, value: Any, origin: str = "config", rules: Optional[Mapping[str, Rule]] = None
) -> Any:
    """``value`` converted to the key's type (int -> float allowed), or a JetyoloError."""
    rule = (rules or FIELD_RULES)[key]
    if rule.auto and isinstance(value, str) and value.strip().lower() == "auto":
        value = None
    if value is None:
        if rule.optional:
            return None
        raise _reject(origin, key, f"must be set ({rule.help})")
    if rule.entries is not None:
        return _check_entries(origin, key, value)
    if rule.kind is list:
        if key == "classes" and isinstance(value, list):  # `classes: [0, person]` in YAML
            value = [str(item) if isinstance(item, int) and not isinstance(item, bool) else item
                     for item in value]
        return _check_list(origin, key, value)
    if rule.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if rule.kind is str and rule.choices and isinstance(value, int) \
            and not isinstance(value, bool):
        value = str(value)  # `decode_scale: 2` in YAML; one not allowed is named with the choices
    if not isinstance(value, rule.kind) or (rule.kind is not bool and isinstance(value, bool)):
        raise _reject(origin, key, f"must be {rule.kind.__name__}, got {value!r} ({rule.help})")
    if isinstance(value, float) and not math.isfinite(value) and not (
        value == math.inf and key in INFINITY_ALLOWED
    ):  # NaN passes every range check below (nan < low and nan > high are both false)
        raise _reject(origin, key, f"{value!r} is not a finite number ({rule.help})")
    _check_allowed(origin, key, rule, value)
    if rule.check is not None:
        rule.check(value, origin)
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


def _check_entries(origin: str, key: str, value: Any) -> List[SourceEntry]:
    """``sources:``: a non-empty list of strings or mappings of ``SourceEntry`` keys."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _reject(origin, key, "must be a non-empty list of sources (strings or mappings "
                                   "with a `source:` key)")
    entries = []
    for index, item in enumerate(value):
        where = f"{origin}: {key}[{index}]"
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, dict):
            raise JetyoloError(f"{where}: must be a string or a mapping, got {item!r}")
        if "source" not in item:
            raise JetyoloError(f"{where}: source is not set; give `source: ...`")
        checked = checked_values(item, where, SOURCE_RULES)
        entries.append(SourceEntry(checked.pop("source"), checked.pop("name", None), checked))
    return entries


def unknown_key_message(key: str, rules: Optional[Mapping[str, Rule]] = None) -> str:
    known = list(rules or FIELD_RULES)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed keys: {', '.join(known)}"


def checked_values(
    values: Mapping[str, Any], origin: str, rules: Optional[Mapping[str, Rule]] = None
) -> Dict[str, Any]:
    """Each key known and each value valid; values converted to their key's type."""
    rules = rules or FIELD_RULES
    checked = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in rules:
            raise _reject(origin, str(key), unknown_key_message(str(key), rules))
        checked[key] = check_value(key, value, origin, rules)
    return checked


def _complete(
    values: Dict[str, Any], origin: str, required_keys: Tuple[str, ...] = REQUIRED_KEYS
) -> RunConfig:
    config = RunConfig(**values)
    if config.source and config.sources:
        raise JetyoloError(f"{origin}: give source or sources, not both (a list of one source "
                           "is `sources: [SOURCE]`)")
    for required in required_keys:
        if required == "source" and config.sources:
            continue
        if not getattr(config, required):
            how = "the BUNDLE argument" if required == "bundle" else "--source"
            raise JetyoloError(
                f"{origin}: {required} is not set; give {how} or `{required}:` in the config file"
            )
    return config


def config_from_mapping(values: Mapping[str, Any], origin: str = "config") -> RunConfig:
    """A complete ``RunConfig`` from one mapping (defaults for the keys it leaves out)."""
    return _complete(checked_values(values, origin), origin)


class _RepeatedKey(ValueError):
    """A mapping key given twice: YAML keeps the last silently, which hides a typo'd edit."""


def _unique_key_loader() -> Any:
    """yaml's SafeLoader refusing a key given twice in one mapping."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        lines: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _RepeatedKey(f"key {key!r} is given twice (lines {lines[key]} and {line})")
            lines[key] = line
        return loader.construct_mapping(node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeyLoader


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
        data = yaml.load(text, Loader=_unique_key_loader()) or {}
    except _RepeatedKey as exc:
        raise JetyoloError(f"config file {path}: {exc}; keep one of them") from exc
    except yaml.YAMLError as exc:
        reason = str(exc).replace("\n", " ")
        raise JetyoloError(f"config file {path} is not valid YAML: {reason}") from exc
    if not isinstance(data, dict):
        raise JetyoloError(f"config file {path} must be a mapping of keys to values, "
                           f"got {type(data).__name__}")
    source = data.get("source")
    if isinstance(source, int) and not isinstance(source, bool):
        data["source"] = str(source)  # `source: 0`, the camera index docs/runtime.md lists
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
    if "source" in given or "sources" in given:  # --source replaces the file's source(s)
        merged.pop("source", None)
        merged.pop("sources", None)
    merged.update(checked_values(given, "flags"))
    return _complete(merged, str(path) if path else "flags", required_keys)
