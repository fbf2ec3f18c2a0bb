"""Where the HTTP endpoint listens and who may read it.

Loopback (``127.0.0.1``, ``::1``, ``localhost``) is the default and needs nothing else. Any other
address is refused unless the config says so explicitly (``http_allow_remote: true``) *and*
names a credentials file: a bearer token (``http_token_file``, one line) or basic-auth
credentials (``http_basic_auth_file``, one ``user:password`` line). Secrets live in files only:
never in a URL, a flag value or the log. A file that other users may read is refused too (the
config dir is ``root:jetyolo 0640``; a secret should be no less private).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from device.errors import JetyoloError

DEFAULT_HOST = "127.0.0.1"
HELP = "docs/http.md"


@dataclass(frozen=True)
class HttpAddress:
    host: str  # an IP literal
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_http_address(text: str) -> HttpAddress:
    """``127.0.0.1:8080``, ``[::1]:8080``, ``localhost:8080``, ``0.0.0.0:8080`` or a bare port
    (loopback). Host names other than ``localhost`` are refused: what a name resolves to can
    change, and whether the endpoint is reachable from the network must not."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    host = host.strip("[]")
    if host == "localhost":
        host = DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise JetyoloError(f"http: {text!r} has no valid port; write HOST:PORT such as "
                           f"127.0.0.1:8080 ({HELP})")
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise JetyoloError(f"http: {host!r} is not an IP address; write an address such as "
                           f"127.0.0.1:8080 or 0.0.0.0:8080 ({HELP})") from exc
    return HttpAddress(host, port)


def read_secret_file(path: Path, key: str) -> str:
    """The first line of ``path`` (stripped), refusing a missing, empty or world-readable file.
    The message names the file, never its content."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise JetyoloError(f"{key}: cannot read {path} ({reason}); give a readable UTF-8 file "
                           f"({HELP})") from exc
    if mode & stat.S_IROTH:
        raise JetyoloError(f"{key}: {path} is readable by every user; chmod o-r {path} "
                           "(it holds a secret)")
    lines = text.splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise JetyoloError(f"{key}: {path} is empty; put the secret on its first line ({HELP})")
    return secret


@dataclass(frozen=True)
class Credentials:
    """What a request must present: ``Authorization: Bearer TOKEN`` or ``Basic`` user:password
    (either, when both are configured)."""

    token: Optional[str] = None
    basic: Optional[Tuple[str, str]] = None

    @classmethod
    def from_files(cls, token_file: Optional[Path], basic_file: Optional[Path]) -> Credentials:
        token = read_secret_file(token_file, "http_token_file") if token_file else None
        basic = None
        if basic_file is not None:
            line = read_secret_file(basic_file, "http_basic_auth_file")
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise JetyoloError(f"http_basic_auth_file: {basic_file} must hold one line "
                                   f"user:password ({HELP})")
            basic = (user, password)
        return cls(token, basic)

    def allows(self, authorization: Optional[str]) -> bool:
        """Whether an ``Authorization`` header value matches (constant-time comparisons)."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.token is not None:
            return hmac.compare_digest(value.encode(), self.token.encode())
        if scheme.lower() == "basic" and self.basic is not None:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            expected = f"{self.basic[0]}:{self.basic[1]}"
            return hmac.compare_digest(decoded.encode(), expected.encode())
        return False

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401 (basic first: browsers then ask for it)."""
        return 'Basic realm="jetyolo"' if self.basic is not None else 'Bearer realm="jetyolo"'


@dataclass(frozen=True)
class AccessPlan:
    address: HttpAddress
    credentials: Optional[Credentials]  # None: open (loopback only)


def plan_access(
    address_text: str,
    allow_remote: bool = False,
    token_file: Optional[Path] = None,
    basic_auth_file: Optional[Path] = None,
) -> AccessPlan:
    """Check the settings before anything listens; one line for each refusal."""
    address = parse_http_address(address_text)
    if not address.loopback and not allow_remote:
        raise JetyoloError(
            f"http: {address_text} is not a loopback address; serving other machines needs "
            "http_allow_remote: true and http_token_file or http_basic_auth_file "
            f"(keep 127.0.0.1 otherwise; {HELP})"
        )
    has_file = token_file is not None or basic_auth_file is not None
    if not address.loopback and not has_file:
        raise JetyoloError(
            f"http: {address_text} with http_allow_remote needs credentials: set "
            f"http_token_file or http_basic_auth_file to a file holding the secret ({HELP})"
        )
    credentials = Credentials.from_files(token_file, basic_auth_file) if has_file else None
    return AccessPlan(address, credentials)
