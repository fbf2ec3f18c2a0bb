"""Sinks for setups without a broker: a TCP server streaming JSON lines, and a UDP sender.

Both send envelopes ``{"topic": ..., "payload": ...}`` + newline, so a consumer reads the same
topics as over MQTT. Neither keeps anything for clients that are not there: use MQTT for that.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import selectors
import socket
from typing import Any, Dict, List, Optional, Tuple

from device.errors import JetyoloError
from device.sinks.base import Outgoing, Sink, SinkOptions
from device.sinks.urls import SinkUrl

logger = logging.getLogger(__name__)

MAX_CLIENT_BACKLOG = 4 << 20  # bytes buffered for one TCP client before it is cut off as too slow
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class TcpServerSink(Sink):
    """Listens on host:port (127.0.0.1 by default) and sends every message to every client."""

    idle_wait_s = 0.02  # also how quickly new clients are accepted

    def __init__(self, url: SinkUrl, options: SinkOptions) -> None:
        super().__init__(url.name, options.queue_size)
        self._server = self._listen(url)
        self.address: Tuple[str, int] = self._server.getsockname()[:2]
        self.name = f"tcp://{self.address[0]}:{self.address[1]}"
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._backlogs: Dict[socket.socket, bytearray] = {}
        # the last retained message per topic (availability, zone counts), sent to new clients
        self._retained: Dict[str, bytes] = {}
        if not _is_loopback(self.address[0]):
            logger.warning("%s: streaming detections to anyone who can reach this address "
                           "(no authentication); bind 127.0.0.1 unless that is intended", self.name)

    @staticmethod
    def _listen(url: SinkUrl) -> socket.socket:
        try:
            infos = socket.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
            family, _, _, _, address = infos[0]
            server = socket.socket(family, socket.SOCK_STREAM)
        except OSError as err:
            raise JetyoloError(f"--sink {url.name}: cannot use host {url.host!r} ({err})") from err
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(address)
            server.listen(16)
            server.setblocking(False)
        except OSError as err:
            server.close()
            hint = (
                "another program uses that port: pick another port or stop it"
                if err.errno == errno.EADDRINUSE
                else "check the address belongs to this machine"
            )
            raise JetyoloError(
                f"--sink {url.name}: cannot listen ({err.strerror}); {hint}"
            ) from err
        return server

    @property
    def client_count(self) -> int:
        return len(self._backlogs)

    def depth(self) -> Dict[str, Any]:
        depth = super().depth()
        depth["clients"] = self.client_count
        return depth

    def write(self, messages: List[Outgoing]) -> None:
        data = b"".join(message.envelope_line() for message in messages)
        for message in messages:
            if message.retain:
                self._retained[message.topic] = message.envelope_line()
        for client, backlog in list(self._backlogs.items()):
            backlog += data
            if len(backlog) > MAX_CLIENT_BACKLOG:
                self._drop(client, f"too slow ({len(backlog)} bytes waiting)")
        self._service()

    def idle(self) -> None:
        self._service()

    def _service(self) -> None:
        for key, _ in self._selector.select(timeout=0):
            sock: Any = key.fileobj
            if sock is self._server:
                self._accept()
            else:
                self._read(sock)
        for client, backlog in list(self._backlogs.items()):
            if backlog:
                self._send(client, backlog)

    def _accept(self) -> None:
        try:
            client, peer = self._server.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        self._selector.register(client, selectors.EVENT_READ)
        self._backlogs[client] = bytearray(b"".join(self._retained.values()))
        logger.info("%s: client %s:%s connected", self.name, peer[0], peer[1])

    def _read(self, client: socket.socket) -> None:
        """Clients do not talk; a read only tells us they left."""
        try:
            data = client.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(client, err.strerror or str(err))
            return
        if not data:
            self._drop(client, "disconnected")

    def _send(self, client: socket.socket, backlog: bytearray) -> None:
        try:
            sent = client.send(backlog)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(client, err.strerror or str(err))
            return
        del backlog[:sent]

    def _drop(self, client: socket.socket, why: str) -> None:
        self._backlogs.pop(client, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client)
        logger.info("%s: client dropped: %s", self.name, why)
        client.close()

    def close(self) -> None:
        for client, backlog in list(self._backlogs.items()):
            if backlog:
                self._send(client, backlog)  # best effort, without waiting
            self._drop(client, "sink closed")
        self._selector.close()
        self._server.close()


class UdpSink(Sink):
    """One datagram per message to host:port; oversized messages are counted as dropped."""

    def __init__(self, url: SinkUrl, options: SinkOptions) -> None:
        super().__init__(url.name, options.queue_size)
        try:
            infos = socket.getaddrinfo(url.host, url.port, type=socket.SOCK_DGRAM)
            family, _, _, _, address = infos[0]
        except OSError as err:
            raise JetyoloError(f"--sink {url.name}: cannot resolve {url.host!r} ({err})") from err
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        # Connected: the kernel then drops datagrams from anyone but host:port, and the
        # socket is bound to the one local address that routes there, not to 0.0.0.0.
        try:
            self._sock.connect(address)
        except OSError as err:
            self._sock.close()
            raise JetyoloError(
                f"--sink {url.name}: cannot reach {url.host!r} ({err.strerror or err})"
            ) from err
        self._last_error: Optional[str] = None

    def write(self, messages: List[Outgoing]) -> None:
        for message in messages:
            line = message.envelope_line()
            if len(line) > MAX_DATAGRAM:
                self._fail(f"a {len(line)}-byte message does not fit in one datagram")
                continue
            try:
                self._sock.send(line)
            except OSError as err:
                self._fail(err.strerror or str(err))

    def _fail(self, why: str) -> None:
        self.failed += 1
        if why != self._last_error:
            self._last_error = why
            logger.warning("%s: message dropped: %s", self.name, why)

    def close(self) -> None:
        self._sock.close()
