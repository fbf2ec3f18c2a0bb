"""A real mosquitto for tests and demos: own config, free loopback port, stopped by its PID.

    with MosquittoBroker(tmp_path) as broker:              # anonymous, 127.0.0.1:<free port>
        ...broker.port...
    MosquittoBroker(tmp_path, users={"cam": "secret"})     # password file via mosquitto_passwd
    MosquittoBroker(tmp_path, tls=make_tls_files(dir))      # TLS listener with a throwaway CA
    broker.stop(); broker.start()                          # same port; persistence=True keeps
                                                           # sessions and queued messages
Also runnable: ``python tests/mqtt_broker.py`` starts one and prints its port until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mosquitto_available() -> bool:
    return Path(MOSQUITTO).is_file() and shutil.which("mosquitto_passwd") is not None


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the broker's certificate (CN/SAN localhost, 127.0.0.1), signed by ca
    key: Path
    other_ca: Path  # a CA that did not sign anything here: "wrong CA"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN=jetyolo test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, a broker certificate it signed, and an unrelated second CA (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    (directory / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    )
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=directory)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
             cwd=directory)
    return TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                    directory / "other-ca.crt")


class MosquittoBroker:
    """One mosquitto process with its own directory, config and port."""

    def __init__(
        self,
        directory: Path,
        port: Optional[int] = None,
        users: Optional[Dict[str, str]] = None,
        tls: Optional[TlsFiles] = None,
        persistence: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.users = users
        self.tls = tls
        self.persistence = persistence
        self.config = self.directory / "mosquitto.conf"
        self.log = self.directory / "mosquitto.log"
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._write_config()

    def _write_config(self) -> None:
        # As root, mosquitto switches to user "mosquitto", which cannot read a private temp dir:
        # "user <us>" keeps the current user (and is ignored when not root).
        lines = [f"user {getpass.getuser()}",
                 f"listener {self.port} 127.0.0.1", f"log_dest file {self.log}",
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "connection_messages true", "max_queued_messages 100000"]
        if self.users is not None:
            passwords = self.directory / "passwords"
            passwords.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password],
                               check=True, capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}",
                      f"keyfile {self.tls.key}", "require_certificate false"]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.directory}/",
                      "autosave_interval 1"]
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    def start(self) -> MosquittoBroker:
        if self.process is not None:
            raise RuntimeError("broker already running")
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                self.process = None
                raise RuntimeError(f"mosquitto exited at start: {err} {self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # in case a test paused it
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is acknowledged."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class Subscriber:
    """An independent paho client collecting every message on ``topic`` (QoS 1).

    ``session=True`` keeps a persistent session (clean_session off), so messages published
    while it is disconnected (broker restart) are queued for it by the broker.
    """

    def __init__(self, port: int, topic: str = "jetyolo/#", client_id: str = "test-subscriber",
                 session: bool = False, username: Optional[str] = None,
                 password: Optional[str] = None, ca: Optional[Path] = None) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list = []  # (topic, payload bytes)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=not session, protocol=mqtt.MQTTv311)
        self.client.reconnect_delay_set(1, 1)
        if username:
            self.client.username_pw_set(username, password)
        if ca:
            self.client.tls_set(ca_certs=str(ca))
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"subscriber could not subscribe on port {port}")

    def _on_message(self, _client: object, _userdata: object, message: object) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))  # type: ignore[attr-defined]

    def payloads(self, suffix: str = "/detections") -> list:
        """Decoded JSON payloads of the topics ending in ``suffix``, in arrival order."""
        with self._lock:
            return [json.loads(payload) for topic, payload in self.messages
                    if topic.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


if __name__ == "__main__":
    import tempfile

    port = int(sys.argv[1]) if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory(prefix="jetyolo-mosquitto-") as tmp, \
            MosquittoBroker(Path(tmp), port=port) as running:
        print(f"mosquitto pid {running.pid} listening on 127.0.0.1:{running.port}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            running.process.wait()  # type: ignore[union-attr]
