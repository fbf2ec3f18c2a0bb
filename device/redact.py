"""Credentials out of everything jetyolo prints: errors, logs, ``STATUS=``, stats names.

A URL's password (``mqtt://user:pw@broker``, ``rtsp://admin:pw@cam/live``) becomes ``***``
wherever it appears in a text, so an error that echoes a malformed URL (or a config value) does
not put the secret in the journal. One rule, used by the CLI's error line and log handler, the
sink URL parser and the sources.
"""

from __future__ import annotations

import logging
import re

# scheme://user:PASSWORD@host: the password runs to the last "@" before the path.
_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s'\"]*:)[^/\s'\"]*@")


def redact_url(text: str) -> str:
    """``text`` with every URL password replaced by ``***`` (``rtsp://user:***@cam/live``)."""
    return _CREDENTIALS.sub(r"\g<head>***@", text)


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output never holds a URL password (library messages included)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_url(super().format(record))
