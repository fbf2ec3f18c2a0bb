"""Where the HTTP endpoint may listen and who may read it: loopback by default, another address
only with an explicit setting and a credentials file, secrets never in messages."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from device.errors import JetyoloError
from device.ops.access import Credentials, parse_http_address, plan_access


def secret_file(folder: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(mode)
    return path


def basic(user_password: str) -> str:
    return "Basic " + base64.b64encode(user_password.encode()).decode()


@pytest.mark.parametrize("text, host, port, loopback", [
    ("127.0.0.1:8080", "127.0.0.1", 8080, True),
    ("localhost:9000", "127.0.0.1", 9000, True),
    ("8080", "127.0.0.1", 8080, True),
    ("[::1]:8080", "::1", 8080, True),
    ("0.0.0.0:8080", "0.0.0.0", 8080, False),
    ("192.168.1.20:80", "192.168.1.20", 80, False),
])
def test_addresses(text: str, host: str, port: int, loopback: bool) -> None:
    address = parse_http_address(text)
    assert (address.host, address.port, address.loopback) == (host, port, loopback)


@pytest.mark.parametrize("text, words", [
    ("camera.lan:8080", "not an IP address"),
    ("127.0.0.1:http", "no valid port"),
    ("127.0.0.1:70000", "no valid port"),
])
def test_bad_addresses_are_one_line(text: str, words: str) -> None:
    with pytest.raises(JetyoloError, match=words) as caught:
        parse_http_address(text)
    assert "\n" not in str(caught.value)


def test_loopback_needs_nothing_else() -> None:
    plan = plan_access("127.0.0.1:8080")
    assert plan.credentials is None and plan.address.loopback


def test_other_addresses_need_the_explicit_setting_and_credentials(tmp_path: Path) -> None:
    with pytest.raises(JetyoloError, match=r"not a loopback address.*http_allow_remote: true"):
        plan_access("0.0.0.0:8080")
    with pytest.raises(JetyoloError, match="needs credentials"):
        plan_access("0.0.0.0:8080", allow_remote=True)
    token = secret_file(tmp_path, "token", "s3cret-token\n")
    with pytest.raises(JetyoloError, match="not a loopback"):  # the file alone is not enough
        plan_access("0.0.0.0:8080", token_file=token)
    plan = plan_access("0.0.0.0:8080", allow_remote=True, token_file=token)
    assert plan.credentials is not None and plan.credentials.token == "s3cret-token"


def test_secret_files_are_checked_and_never_echoed(tmp_path: Path) -> None:
    world = secret_file(tmp_path, "world", "topsecret", mode=0o644)
    with pytest.raises(JetyoloError, match="readable by every user") as caught:
        Credentials.from_files(world, None)
    assert "topsecret" not in str(caught.value)
    with pytest.raises(JetyoloError, match="is empty"):
        Credentials.from_files(secret_file(tmp_path, "empty", "\n"), None)
    with pytest.raises(JetyoloError, match="cannot read"):
        Credentials.from_files(tmp_path / "missing", None)
    with pytest.raises(JetyoloError, match="user:password") as caught:
        Credentials.from_files(None, secret_file(tmp_path, "nocolon", "topsecret"))
    assert "topsecret" not in str(caught.value)


def test_authorization_headers(tmp_path: Path) -> None:
    credentials = Credentials.from_files(secret_file(tmp_path, "t", "tok"),
                                         secret_file(tmp_path, "b", "admin:pw:with:colons"))
    assert credentials.allows("Bearer tok")
    assert credentials.allows(basic("admin:pw:with:colons"))
    for wrong in (None, "", "Bearer tok2", "Bearer", "bearer  TOK", basic("admin:pw"),
                  "Basic !!!notbase64", basic("admin:pw:with:colonsx"), "Digest tok"):
        assert not credentials.allows(wrong), wrong
    assert credentials.challenge().startswith("Basic")
    token_only = Credentials(token="tok")
    assert not token_only.allows(basic("admin:pw:with:colons"))
    assert token_only.challenge().startswith("Bearer")
