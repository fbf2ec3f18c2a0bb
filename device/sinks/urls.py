"""``--sink`` URLs -> what to open. Parsing only; a bad URL gets one line that shows the forms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import SplitResult, unquote, urlsplit

from device.errors import JetyoloError

FORMS = (
    "stdout, jsonl:PATH, mqtt://[user:pass@]host[:port], mqtts://[user:pass@]host[:port], "
    "tcp://[HOST]:PORT, udp://HOST:PORT"
)
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
    return JetyoloError(f"bad --sink {text!r}: {why}; expected one of {FORMS}")


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
    if stripped == "stdout":
        return SinkUrl("stdout", "stdout")
    if stripped.startswith("jsonl:"):
        path = stripped[len("jsonl:"):]
        if not path:
            raise _bad(text, "jsonl needs a file path (jsonl:detections.jsonl)")
        return SinkUrl("jsonl", stripped, path=Path(path).expanduser())
    if "://" not in stripped:
        raise _bad(text, "unknown sink")
    parts = urlsplit(stripped)
    scheme = parts.scheme.lower()
    if scheme in ("mqtt", "mqtts"):
        return _mqtt(text, parts, scheme)
    if scheme in ("tcp", "udp"):
        return _socket(text, parts, scheme)
    raise _bad(text, f"unknown scheme {scheme!r}")


def _mqtt(text: str, parts: SplitResult, scheme: str) -> SinkUrl:
    _check_no_extras(text, parts)
    if not parts.hostname:
        raise _bad(text, "the broker host is missing")
    port = _port(text, parts, DEFAULT_PORTS[scheme])
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    user_part = f"{username}@" if username else ""
    name = f"{scheme}://{user_part}{parts.hostname}:{port}"
    return SinkUrl("mqtt", name, parts.hostname, port, None, username, password, scheme == "mqtts")


def _socket(text: str, parts: SplitResult, scheme: str) -> SinkUrl:
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
