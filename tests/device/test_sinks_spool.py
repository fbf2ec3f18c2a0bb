"""The SQLite outbox and the seq counter on their own (no broker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from device.errors import JetyoloError
from device.sinks.base import Outgoing
from device.sinks.spool import SeqCounter, Spool, SpoolLock, prepare_spool_dir


def _messages(first_seq: int, count: int) -> list:
    seqs = range(first_seq, first_seq + count)
    return [Outgoing(f"t/{seq}", b'{"seq":%d}' % seq, seq) for seq in seqs]


def test_append_pending_remove_in_order(tmp_path: Path) -> None:
    spool = Spool(prepare_spool_dir(tmp_path), "mqtt://a:1883", max_messages=100)
    spool.append(_messages(1, 5))
    rows = spool.pending(after_id=0, limit=10)
    assert [row.seq for row in rows] == [1, 2, 3, 4, 5]
    assert [row.seq for row in spool.pending(after_id=rows[1].row_id, limit=2)] == [3, 4]
    spool.remove([rows[0].row_id, rows[2].row_id])
    assert [row.seq for row in spool.pending(0, 10)] == [2, 4, 5]
    assert spool.depth == 3
    spool.remove([rows[0].row_id])  # acknowledged twice: nothing changes
    assert spool.depth == 3


def test_rows_survive_reopening_and_sinks_are_separate(tmp_path: Path) -> None:
    path = prepare_spool_dir(tmp_path)
    first = Spool(path, "mqtt://a:1883", 100)
    first.append(_messages(1, 3))
    other = Spool(path, "mqtt://b:1883", 100)
    other.append(_messages(10, 1))
    first.close()
    reopened = Spool(path, "mqtt://a:1883", 100)
    assert reopened.depth == 3
    assert [row.seq for row in reopened.pending(0, 10)] == [1, 2, 3]
    assert [row.seq for row in other.pending(0, 10)] == [10]


def test_full_spool_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    spool = Spool(prepare_spool_dir(tmp_path), "mqtt://a:1883", max_messages=4)
    assert spool.append(_messages(1, 3)) == 0
    assert spool.append(_messages(4, 3)) == 2
    assert [row.seq for row in spool.pending(0, 10)] == [3, 4, 5, 6]
    assert (spool.depth, spool.dropped) == (4, 2)
    assert spool.append(_messages(7, 10)) == 10  # a batch larger than the spool keeps its tail
    assert [row.seq for row in spool.pending(0, 10)] == [13, 14, 15, 16]
    assert spool.dropped == 12


def test_seq_grows_across_restarts_even_without_a_clean_close(tmp_path: Path) -> None:
    path = prepare_spool_dir(tmp_path)
    counter = SeqCounter(path, block=10)
    first_run = [counter.next() for _ in range(15)]
    assert first_run == list(range(1, 16))
    # no close(): as after SIGKILL. The next run starts after the last reserved block (20).
    second = SeqCounter(path, block=10)
    assert second.next() == 21
    assert second.next() == 22
    second.close()  # a clean stop: the next run continues right after 22
    assert SeqCounter(path, block=10).next() == 23


def test_spool_dir_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(JetyoloError, match=r"not writable.*--spool-dir"):
        prepare_spool_dir(blocker / "spool")


def test_two_processes_cannot_share_a_spool_dir(tmp_path: Path) -> None:
    first = SpoolLock(tmp_path)
    first.acquire()
    with pytest.raises(JetyoloError, match="in use by another jetyolo process"):
        SpoolLock(tmp_path).acquire()  # a second open file description conflicts like a process
    first.release()
    SpoolLock(tmp_path).acquire()


def test_a_lock_file_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "spool.lock").mkdir()  # not openable as a file, whoever runs the test
    with pytest.raises(JetyoloError, match=r"cannot open the spool lock .*--spool-dir"):
        SpoolLock(tmp_path).acquire()


def test_spool_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        path = prepare_spool_dir(tmp_path / "spool")
        spool = Spool(path, "mqtt://a:1883", max_messages=10)
        lock = SpoolLock(path.parent)
        lock.acquire()
        spool.append([Outgoing("t", b"x", 1)])
        modes = {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir()}
        lock.release()
        spool.close()
    finally:
        os.umask(old_umask)
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert modes == {"spool.sqlite": 0o600, "spool.sqlite-wal": 0o600, "spool.sqlite-shm": 0o600,
                     "spool.lock": 0o600}
