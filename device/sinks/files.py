"""Sinks that write envelope lines ``{"topic": ..., "payload": ...}`` to a file or to stdout."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO, List, Optional

from device.errors import JetyoloError
from device.sinks.base import Outgoing, Sink, SinkOptions
from device.sinks.urls import SinkUrl

logger = logging.getLogger(__name__)


class JsonlSink(Sink):
    """Appends to PATH (created with its parent directories); flushed after every batch."""

    def __init__(self, url: SinkUrl, options: SinkOptions) -> None:
        super().__init__(url.name, options.queue_size)
        if url.path is None:
            raise JetyoloError(f"--sink {url.name}: a file path is required")
        self.path = url.path
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[bytes] = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        except OSError as err:
            raise JetyoloError(
                f"--sink {url.name}: cannot open {self.path} for appending ({err.strerror}); "
                "choose a writable path"
            ) from err
        self._last_error: Optional[str] = None

    def write(self, messages: List[Outgoing]) -> None:
        try:
            self._file.write(b"".join(message.envelope_line() for message in messages))
            self._file.flush()
        except OSError as err:  # disk full, file system gone read-only
            self.failed += len(messages)
            why = err.strerror or str(err)
            if why != self._last_error:
                self._last_error = why
                logger.error("%s: cannot write %s (%s); messages are dropped", self.name,
                             self.path, why)

    def close(self) -> None:
        self._file.close()


class StdoutSink(Sink):
    """Prints envelope lines; logs go to stderr, so stdout stays machine-readable."""

    @classmethod
    def from_url(cls, url: SinkUrl, options: SinkOptions, spool_path: Path) -> Sink:
        return cls(url.name, options.queue_size)

    def write(self, messages: List[Outgoing]) -> None:
        text = b"".join(message.envelope_line() for message in messages).decode("utf-8")
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # reader went away, or stdout was closed
            self.failed += len(messages)
