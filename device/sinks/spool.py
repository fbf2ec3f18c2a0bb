"""The on-disk side of "nothing lost": a bounded SQLite outbox and the persistent ``seq`` counter.

One database, ``<spool_dir>/spool.sqlite`` in WAL mode, holds

- ``outbox``: every MQTT message, written before it is handed to paho and deleted only when the
  broker acknowledged it (PUBACK). Rows keep their insertion order (AUTOINCREMENT ids are never
  reused), so a replay after a reconnect or a restart sends them in the order they were made.
  When a sink's rows exceed ``max_messages`` the oldest are deleted and counted (drop oldest).
- ``meta``: the sequence counter. Blocks of ``SEQ_BLOCK`` numbers are reserved with a durable
  (``synchronous=FULL``) write; a restart continues after the last reserved block, so ``seq``
  only ever grows, even after SIGKILL or a power cut, at one fsync per block. A clean close
  records the last number used, so a clean restart continues without a gap.

Outbox writes use ``synchronous=NORMAL``: a committed row survives a killed process; after a
power cut the last few commits may be gone. A lock file keeps two processes off one spool.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, List, Optional, Sequence

from device.errors import JetyoloError
from device.files import PRIVATE_DIR, PRIVATE_FILE, make_writable_dir
from device.message import message_time
from device.sinks.base import Outgoing

SPOOL_FILE = "spool.sqlite"
LOCK_FILE = "spool.lock"
SEQ_BLOCK = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    seq INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_sink_id ON outbox (sink, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """A connection in autocommit mode (we BEGIN ourselves), WAL, usable from one other thread."""
    try:
        _make_private(path)
        db = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(_SCHEMA)
    except (sqlite3.Error, OSError) as err:
        raise JetyoloError(
            f"cannot use the spool database {path}: {err}; "
            "choose a writable spool directory on a local disk (--spool-dir)"
        ) from err
    return db


def _make_private(path: Path) -> None:
    """The database (and its -wal/-shm, which SQLite creates with the database's mode) 0600
    whatever the umask: spooled messages are detections nobody else on the device should read."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
    for suffix in ("", "-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            os.chmod(companion, PRIVATE_FILE)


class SpoolLock:
    """An exclusive ``flock`` on ``<spool_dir>/spool.lock``, released when the process dies."""

    def __init__(self, spool_dir: Path) -> None:
        self.path = spool_dir / LOCK_FILE
        self._handle: Optional[IO[str]] = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
            handle = os.fdopen(fd, "a+")  # held open for the life of the lock
        except OSError as err:  # e.g. left behind by a run as another user
            raise JetyoloError(
                f"cannot open the spool lock {self.path} ({err.strerror or err}); remove it or "
                "point --spool-dir at a directory this user owns"
            ) from err
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise JetyoloError(
                f"spool directory {self.path.parent} is in use by another jetyolo process "
                f"(pid {holder}); give each process its own --spool-dir"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None


def prepare_spool_dir(spool_dir: Path) -> Path:
    """Create ``spool_dir`` and check it is writable; the path of the database in it."""
    try:
        make_writable_dir(spool_dir, PRIVATE_DIR)
    except OSError as err:
        raise JetyoloError(
            f"spool directory {spool_dir} is not writable ({err.strerror or err}); "
            "point --spool-dir at a writable local directory"
        ) from err
    return spool_dir / SPOOL_FILE


@dataclass(frozen=True)
class SpooledMessage:
    row_id: int
    topic: str
    payload: bytes
    seq: int
    retain: bool


class Spool:
    """One sink's bounded outbox in the shared database (used from the sink's thread only)."""

    def __init__(self, path: Path, sink: str, max_messages: int) -> None:
        self.path = path
        self.sink = sink
        self.max_messages = max_messages
        self.dropped = 0
        self._db = _connect(path, "NORMAL")
        self.depth = self._count()

    def _count(self) -> int:
        query = "SELECT COUNT(*) FROM outbox WHERE sink = ?"
        row = self._db.execute(query, (self.sink,)).fetchone()
        return int(row[0])

    def append(self, messages: Sequence[Outgoing]) -> int:
        """Store ``messages`` in one transaction; drop the oldest beyond the bound; # dropped."""
        rows = [(self.sink, m.topic, m.payload, m.seq, int(m.retain)) for m in messages]
        excess = max(0, self.depth + len(rows) - self.max_messages)
        with _transaction(self._db):
            self._db.executemany(
                "INSERT INTO outbox (sink, topic, payload, seq, retain) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            if excess:
                self._db.execute(
                    "DELETE FROM outbox WHERE id IN "
                    "(SELECT id FROM outbox WHERE sink = ? ORDER BY id LIMIT ?)",
                    (self.sink, excess),
                )
        self.depth += len(rows) - excess
        self.dropped += excess
        return excess

    def pending(self, after_id: int, limit: int) -> List[SpooledMessage]:
        """The oldest ``limit`` messages with an id above ``after_id``, oldest first."""
        cursor = self._db.execute(
            "SELECT id, topic, payload, seq, retain FROM outbox "
            "WHERE sink = ? AND id > ? ORDER BY id LIMIT ?",
            (self.sink, after_id, limit),
        )
        return [SpooledMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in cursor]

    def oldest_timestamp(self) -> Optional[float]:
        """The capture/creation time (seconds since the epoch) of the oldest spooled message."""
        row = self._db.execute(
            "SELECT payload FROM outbox WHERE sink = ? ORDER BY id LIMIT 1", (self.sink,)
        ).fetchone()
        return message_time(bytes(row[0])) if row is not None else None

    def remove(self, row_ids: Sequence[int]) -> None:
        """Delete acknowledged messages (ids already dropped by the bound are ignored)."""
        if not row_ids:
            return
        with _transaction(self._db):
            cursor = self._db.executemany(
                "DELETE FROM outbox WHERE id = ?", [(row_id,) for row_id in row_ids]
            )
        self.depth = max(0, self.depth - max(cursor.rowcount, 0))

    def close(self) -> None:
        self._db.close()


class SeqCounter:
    """``seq`` numbers that grow across restarts; one durable write per ``block`` numbers."""

    def __init__(self, path: Path, block: int = SEQ_BLOCK) -> None:
        self._db = _connect(path, "FULL")
        self._block = block
        row = self._db.execute("SELECT value FROM meta WHERE key = 'seq_reserved'").fetchone()
        self._reserved = int(row[0]) if row else 0
        self._next = self._reserved + 1  # numbers of the last run's unfinished block are skipped

    def next(self) -> int:
        if self._next > self._reserved:
            self._reserve(self._next + self._block - 1)
        value = self._next
        self._next += 1
        return value

    def _reserve(self, upto: int) -> None:
        with _transaction(self._db):
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('seq_reserved', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (upto,),
            )
        self._reserved = upto

    def close(self) -> None:
        """Record the last number used, so a clean restart continues without a gap."""
        if self._next - 1 < self._reserved:
            self._reserve(self._next - 1)
        self._db.close()


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
