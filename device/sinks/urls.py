"""``--sink`` URLs -> what to open: the one table of sink kinds (``SINK_KINDS``).

Each kind declares its URL schemes, the forms shown in help and errors, how a URL is parsed
(``parse``: text -> ``SinkUrl``) and which class opens it (``opener``, ``module:Class``,
imported only when that kind is opened; the class's ``from_url(url, options, spool_path)``
builds the sink). Parsing, opening (``device.sinks.sinkset``) and the help text of ``--sink``
and of the ``sinks`` config key all come from this table. A bad URL gets one line that shows
the forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple
from urllib.parse import SplitResult, unquote, urlsplit

from device.errors import JetyoloError
from device.redact import redact_url

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_TCP_HOST = "127.0.0.1"


@dataclass(frozen=True)
class SinkUrl:
    kind: str  # "stdout" | "jsonl" | "mqtt" | "tcp" | "udp"
    name: str  # the URL without its password: for logs and stats
    host: str = ""
    port: int = 0
    path: Optional[Path] = None
    username: Optional[str] = None
    password: Optional[str] = None
    tls: bool = False


def _bad(text: str, why: str) -> JetyoloError:
    return JetyoloError(f"bad --sink {redact_url(text)!r}: {why}; expected one of {FORMS}")


def _port(text: str, parts: SplitResult, default: Optional[int]) -> int:
    try:
        port = parts.port
    except ValueError:
        raise _bad(text, "the port is not a number in 0-65535") from None
    if port is None:
        if default is None:
            raise _bad(text, "a port is required")
        return default
    return port


def _check_no_extras(text: str, parts: SplitResult) -> None:
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        extra = text[len(parts.scheme) + 3 + len(parts.netloc):]
        raise _bad(text, f"unexpected path or query {extra!r}")


def parse_sink_url(text: str) -> SinkUrl:
    """``mqtt://user:pw@broker:1883`` -> SinkUrl(kind="mqtt", host="broker", port=1883, ...)."""
    stripped = text.strip()
    scheme = stripped.split(":", 1)[0].lower()
    kind = KIND_BY_SCHEME.get(scheme)
    if kind is None or (kind.url_form and "://" not in stripped):
        raise _bad(text, f"unknown scheme {scheme!r}" if "://" in stripped else "unknown sink")
    return kind.parse(text, stripped, scheme)


def _stdout(text: str, stripped: str, scheme: str) -> SinkUrl:
    if stripped != "stdout":
        raise _bad(text, "unknown sink")
    return SinkUrl("stdout", "stdout")


def _jsonl(text: str, stripped: str, scheme: str) -> SinkUrl:
    path = stripped[len("jsonl:"):]
    if not path:
        raise _bad(text, "jsonl needs a file path (jsonl:detections.jsonl)")
    return SinkUrl("jsonl", stripped, path=Path(path).expanduser())


def _mqtt(text: str, stripped: str, scheme: str) -> SinkUrl:
    parts = urlsplit(stripped)
    _check_no_extras(text, parts)
    if not parts.hostname:
        raise _bad(text, "the broker host is missing")
    port = _port(text, parts, DEFAULT_PORTS[scheme])
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    user_part = f"{username}@" if username else ""
    name = f"{scheme}://{user_part}{parts.hostname}:{port}"
    return SinkUrl("mqtt", name, parts.hostname, port, None, username, password, scheme == "mqtts")


def _socket(text: str, stripped: str, scheme: str) -> SinkUrl:
    parts = urlsplit(stripped)
    _check_no_extras(text, parts)
    if parts.username or parts.password:
        raise _bad(text, f"{scheme} sinks take no user or password")
    host = parts.hostname or ""
    if scheme == "udp" and not host:
        raise _bad(text, "udp needs a destination host")
    host = host or DEFAULT_TCP_HOST
    port = _port(text, parts, None)
    if scheme == "udp" and port == 0:
        raise _bad(text, "udp needs a destination port above 0")
    return SinkUrl(scheme, f"{scheme}://{host}:{port}", host, port)


@dataclass(frozen=True)
class SinkKind:
    """One kind of sink: its schemes, its forms (help), its parser and the class opening it."""

    kind: str
    schemes: Tuple[str, ...]
    forms: Tuple[str, ...]
    parse: Callable[[str, str, str], SinkUrl]  # (text as given, stripped, scheme) -> SinkUrl
    opener: str  # "module:Class" with a from_url(url, options, spool_path) classmethod
    url_form: bool = True  # scheme://...; False: a bare word or scheme:rest


SINK_KINDS: Tuple[SinkKind, ...] = (
    SinkKind("stdout", ("stdout",), ("stdout",), _stdout, "device.sinks.files:StdoutSink",
             url_form=False),
    SinkKind("jsonl", ("jsonl",), ("jsonl:PATH",), _jsonl, "device.sinks.files:JsonlSink",
             url_form=False),
    SinkKind("mqtt", ("mqtt", "mqtts"),
             ("mqtt://[user:pass@]host[:port]", "mqtts://[user:pass@]host[:port]"), _mqtt,
             "device.sinks.mqtt:MqttSink"),
    SinkKind("tcp", ("tcp",), ("tcp://[HOST]:PORT",), _socket,
             "device.sinks.sockets:TcpServerSink"),
    SinkKind("udp", ("udp",), ("udp://HOST:PORT",), _socket, "device.sinks.sockets:UdpSink"),
)
KIND_BY_SCHEME: Dict[str, SinkKind] = {s: k for k in SINK_KINDS for s in k.schemes}
KIND_BY_NAME: Dict[str, SinkKind] = {k.kind: k for k in SINK_KINDS}
FORMS = ", ".join(form for kind in SINK_KINDS for form in kind.forms)
