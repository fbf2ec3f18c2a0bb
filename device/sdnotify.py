"""systemd's notify protocol in a few lines: ``READY=1``, ``WATCHDOG=1``, ``STATUS=`` over
``$NOTIFY_SOCKET`` (an AF_UNIX datagram socket; a leading ``@`` means the abstract namespace).

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op, so the runtime calls it
unconditionally. The loop uses one ``Notifier``::

    from device.sdnotify import Notifier

    notifier = Notifier.from_env()
    notifier.status("loading engine")
    ...                                  # engine loaded, first frame processed
    notifier.ready("running")            # Type=notify: systemd now considers the unit started
    for result in pipeline:
        notifier.frame_done()            # WATCHDOG=1 (+ STATUS= with FPS) while frames progress
    notifier.stopping()

``frame_done()`` never pings on its own schedule: it pings at most every half ``WatchdogSec=``
and only when called, i.e. only while frames progress. A loop stuck on a stalled camera sends
nothing, and systemd kills and restarts the service after ``WatchdogSec=``. Module-level
``notify``, ``ready``, ``watchdog``, ``status`` and ``watchdog_interval`` act on a notifier built
from the environment on first use.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Dict, Mapping, Optional

LOG = logging.getLogger(__name__)
STATUS_EVERY_S = 5.0  # STATUS= refresh when no watchdog is configured


def socket_address(value: str) -> str:
    """``$NOTIFY_SOCKET`` -> the address ``sendto`` takes (``@name`` -> ``\\0name``)."""
    return "\0" + value[1:] if value.startswith("@") else value


def watchdog_seconds(env: Mapping[str, str]) -> Optional[float]:
    """``$WATCHDOG_USEC`` in seconds, or None when the watchdog is off or meant for another
    process (``$WATCHDOG_PID`` names a different pid), as ``sd_watchdog_enabled`` decides."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6


class Watchdog:
    """Decides when the loop's progress earns a ``WATCHDOG=1`` ping.

    ``frame_done()`` counts frames; when ``interval`` seconds have passed since the last ping,
    it sends ``WATCHDOG=1`` and ``STATUS=<fps>`` in one datagram. With no watchdog configured it
    still refreshes ``STATUS=`` every ``STATUS_EVERY_S``. No frames, no ping: with several
    sources a frame of any one counts, so the watchdog fires only when none makes progress, and
    ``STATUS=`` adds each source's FPS (``; door 14.9 fps, yard 0.0 fps``).
    """

    def __init__(
        self,
        send: Callable[[str], bool],
        timeout_s: Optional[float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send = send
        self.enabled = timeout_s is not None
        # Half the timeout, as sd_watchdog_enabled(3) recommends: one late frame is not fatal.
        self.interval = timeout_s / 2 if timeout_s is not None else STATUS_EVERY_S
        self.clock = clock
        self.frames = 0
        self.pings = 0
        self._last_time = clock()
        self._last_frames = 0
        self._source_frames: Dict[str, int] = {}  # per source name, since the start
        self._source_last: Dict[str, int] = {}  # at the last datagram
        self.note = ""  # appended to STATUS= (the model and its last update, device.reload)

    def frame_done(self, count: int = 1, source: Optional[str] = None) -> bool:
        """Record ``count`` processed frames (of ``source``); returns True when a datagram was
        sent."""
        self.frames += count
        if source is not None:
            self._source_frames[source] = self._source_frames.get(source, 0) + count
        now = self.clock()
        elapsed = now - self._last_time
        if elapsed < self.interval:
            return False
        fps = (self.frames - self._last_frames) / elapsed if elapsed > 0 else 0.0
        per_source = self._per_source_fps(elapsed)
        self._last_time, self._last_frames = now, self.frames
        state = f"STATUS=running: {fps:.1f} fps, {self.frames} frames{per_source}{self.note}"
        if self.enabled:
            state = "WATCHDOG=1\n" + state
            self.pings += 1
        return self.send(state)


    def _per_source_fps(self, elapsed: float) -> str:
        """``; door 14.9 fps, yard 0.0 fps`` with two or more sources, else empty."""
        if len(self._source_frames) < 2:
            return ""
        parts = []
        for name, frames in self._source_frames.items():
            fps = (frames - self._source_last.get(name, 0)) / elapsed if elapsed > 0 else 0.0
            parts.append(f"{name} {fps:.1f} fps")
        self._source_last = dict(self._source_frames)
        return "; " + ", ".join(parts)


class Notifier:
    """One connection to systemd's notify socket (or a no-op without one)."""

    def __init__(
        self,
        address: Optional[str],
        watchdog_s: Optional[float] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = socket_address(address) if address else None
        self._socket: Optional[socket.socket] = None
        self.watchdog_s = watchdog_s
        self.progress = Watchdog(self.notify, watchdog_s, clock)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_seconds(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, state: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when off or when sending failed.

        A failed send is logged, never raised: the detector must not die because systemd
        went away.
        """
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto(state.encode(), self.address)
        except OSError as exc:
            LOG.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, text: Optional[str] = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={text}" if text else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """An unconditional ping; the loop should prefer ``frame_done()``."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start-up (or stop) time, e.g. while a slow camera opens."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def stopping(self, text: Optional[str] = None) -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={text}" if text else ""))

    def watchdog_interval(self) -> Optional[float]:
        """``WatchdogSec=`` in seconds, or None when no watchdog is armed for this process."""
        return self.watchdog_s

    def frame_done(self, count: int = 1, source: Optional[str] = None) -> bool:
        return self.progress.frame_done(count, source)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


_DEFAULT: Optional[Notifier] = None


def default() -> Notifier:
    """The process-wide notifier, built from the environment on first use."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Notifier.from_env()
    return _DEFAULT


def notify(state: str) -> bool:
    return default().notify(state)


def ready(text: Optional[str] = None) -> bool:
    return default().ready(text)


def status(text: str) -> bool:
    return default().status(text)


def watchdog() -> bool:
    return default().watchdog()


def watchdog_interval() -> Optional[float]:
    return default().watchdog_interval()
