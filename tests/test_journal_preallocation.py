"""The journal grows its file ahead of the log (issue 10: the fdatasync before an acknowledgement).

An fdatasync that must also commit a file's new size costs about a third more
on ext4 than one that commits data only, and the follower's fsync is on every
write's path. So the journal keeps zero-filled room past its log, grown and
synced from the one-second timer. These tests pin what that must not break:
the log's end is where the records stop checking, not the file's size; the
zeros survive a reopen without being read as entries; truncation still cuts
the file, so no stale record can come back; and a disk that refuses the room
costs nothing but the saving, never the journal.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from kvs.raft import disk, records
from kvs.raft import journal as journal_module
from kvs.raft.disk import Room
from kvs.raft.journal import DurableJournal, JournalWriteError

COMMAND = b"c" * 100
RECORD = len(records.encode(COMMAND, 1, 1))


def indexes(journal: DurableJournal) -> list[int]:
    return [journal[i][1] for i in range(len(journal))]


def journal_with_room(tmp_path, count: int) -> tuple[str, DurableJournal]:
    """A fsyncing journal of `count` records (indexes 1..count, term 1) whose timer has grown room."""
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    for i in range(1, count + 1):
        journal.add(COMMAND, i, 1)
    journal.onOneSecondTimer()
    return path, journal


def test_the_timer_grows_the_file_and_syncs_it_so_a_batch_and_its_fsync_do_not(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    journal.add(COMMAND, 1, 1)
    journal.sync()
    assert os.path.getsize(path) == RECORD, "an append grew the file by more than its record"
    syncs = journal.sync_count
    journal.onOneSecondTimer()
    size = os.path.getsize(path)
    assert size > RECORD and journal.sync_count == syncs + 1 and not journal.dirty, "the growth was not synced"
    for i in range(2, 52):
        journal.add(COMMAND, i, 1)
    assert journal.sync()
    assert os.path.getsize(path) == size, "a write's fdatasync had to commit a new file size"
    assert size > 51 * RECORD
    journal._destroy()
    assert indexes(DurableJournal(path)) == list(range(1, 52))


def test_the_preallocated_zeros_are_kept_on_reopening_and_appends_continue_at_the_logs_end(tmp_path):
    path, journal = journal_with_room(tmp_path, 3)
    journal._destroy()
    size = os.path.getsize(path)
    assert size > 3 * RECORD
    reopened = DurableJournal(path, fsync=True)
    assert indexes(reopened) == [1, 2, 3]
    assert os.path.getsize(path) == size, "reopening cut the preallocated zeros"
    reopened.add(COMMAND, 4, 2)
    reopened._destroy()
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[4 * RECORD:].count(0) == len(blob) - 4 * RECORD, "the fourth record was not written at the end"
    assert indexes(DurableJournal(path)) == [1, 2, 3, 4]


def test_truncation_cuts_the_file_so_no_removed_record_comes_back(tmp_path):
    path, journal = journal_with_room(tmp_path, 10)
    syncs = journal.sync_count
    journal.deleteEntriesFrom(6)                # a conflict: indexes 7..10 go
    assert os.path.getsize(path) == 6 * RECORD
    # Synced before anything is written over the cut range: a crash that kept a new record there but
    # not the cut would otherwise bring back the old records behind it.
    assert journal.sync_count == syncs + 1 and not journal.dirty
    journal.add(COMMAND, 7, 2)
    journal._destroy()
    reopened = DurableJournal(path)
    assert [reopened[i][1:] for i in range(len(reopened))] == [(i, 1) for i in range(1, 7)] + [(7, 2)]


def test_a_record_that_does_not_follow_its_predecessor_ends_the_scan():
    blob = b"".join(records.encode(COMMAND, i, 1) for i in (1, 2)) + records.encode(COMMAND, 4, 1)
    entries, offsets, end = records.scan(blob)
    assert [e[1] for e in entries] == [1, 2] and offsets == [0, RECORD] and end == 2 * RECORD
    falling = records.encode(COMMAND, 1, 3) + records.encode(COMMAND, 2, 2)
    assert [e[1] for e in records.scan(falling)[0]] == [1]
    zeros = records.encode(COMMAND, 1, 1) + bytes(4096)
    assert records.scan(zeros)[2] == RECORD and records.only_zeros_after(zeros, RECORD)
    assert not records.only_zeros_after(blob, 2 * RECORD)


REFUSED_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    from kvs.raft.journal import DurableJournal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of death, as for Python by default
    path, record, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))    # far less than one preallocation chunk
    journal = DurableJournal(path, fsync=True)
    accepted, sizes = [], []
    for i in range(1, limit // record + 1):
        journal.add(b"c" * 100, i, 1)
        journal.sync()
        journal.onOneSecondTimer()
        accepted.append(i)
        sizes.append(os.path.getsize(path))
    failure = journal.failure
    try:
        journal.add(b"c" * 100, len(accepted) + 1, 1)     # past the limit: this one cannot be written
        error = None
    except OSError as exc:
        error = type(exc).__name__
    print(json.dumps({"accepted": accepted, "sizes": sizes, "failure": failure and failure.operation,
                      "error": error}))
""")


def test_a_disk_that_refuses_the_room_still_takes_every_record_that_fits(tmp_path):
    path = str(tmp_path / "journal")
    limit = 4096
    done = subprocess.run([sys.executable, "-c", REFUSED_CHILD, path, str(RECORD), str(limit)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    count = limit // RECORD
    assert result["accepted"] == list(range(1, count + 1)) and result["failure"] is None, \
        "a refused preallocation failed the journal"
    assert result["sizes"] == [i * RECORD for i in range(1, count + 1)], "a partial preallocation was kept"
    assert result["error"] == "JournalWriteError"
    assert indexes(DurableJournal(path)) == list(range(1, count + 1))


def test_a_chunk_grows_only_while_chunks_are_used_up_quickly(tmp_path):
    fd = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        room = Room(str(tmp_path / "file"), 0)
        sizes = []
        for now in (0.0, 20.0, 40.0):                  # a slow writer: one chunk every 20 s
            assert room.grow(fd, room.allocated, now)
            sizes.append(room.chunk)
        for now in (41.0, 42.0, 43.0, 44.0, 45.0, 46.0):   # a fast one: a chunk a second
            assert room.grow(fd, room.allocated, now)
            sizes.append(room.chunk)
        first = 64 << 10
        assert sizes == [first] * 3 + [2 * first, 4 * first, 8 * first, 16 * first, 16 * first, 16 * first]
        end = room.allocated - room.chunk // 2 + 1     # less than half a chunk left
        assert room.wanted(end, 50.0) and not room.wanted(end - 2, 50.0)
        assert os.fstat(fd).st_size == room.allocated
    finally:
        os.close(fd)


def test_neither_a_refused_fill_nor_a_fill_after_a_cut_makes_the_next_chunk_bigger(tmp_path, monkeypatch):
    fd = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        room = Room(str(tmp_path / "file"), 0)
        assert room.grow(fd, 0, 0.0) and room.chunk == 64 << 10
        real = disk.os.fstatvfs
        monkeypatch.setattr(disk.os, "fstatvfs", lambda fd: Free(0))
        for now in (1.0, 2.0, 3.0):                     # refused, quickly one after the other
            assert not room.grow(fd, room.allocated, now)
        assert room.chunk == 64 << 10
        monkeypatch.setattr(disk.os, "fstatvfs", real)
        room.cut(0)                                     # a compaction: nothing of the chunk was used
        assert room.grow(fd, 0, 4.0) and room.chunk == 64 << 10
    finally:
        os.close(fd)


class Free:
    """What os.fstatvfs says of a file system with `free` bytes available."""

    f_frsize = 4096

    def __init__(self, free: int):
        self.f_bavail = free // self.f_frsize


def test_a_cut_of_a_torn_tail_at_opening_is_synced(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    for i in range(1, 4):
        journal.add(COMMAND, i, 1)
    journal._destroy()
    with open(path, "ab") as f:
        f.write(records.encode(COMMAND, 4, 1)[:-3])     # torn
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    reopened = DurableJournal(path, fsync=True)
    assert indexes(reopened) == [1, 2, 3] and os.path.getsize(path) == 3 * RECORD
    assert path in synced, "the cut was not synced before records could be written over it"


def test_an_append_that_fails_in_the_preallocated_room_leaves_no_torn_record(tmp_path, monkeypatch):
    path, journal = journal_with_room(tmp_path, 3)
    assert os.path.getsize(path) > 4 * RECORD
    real = journal_module._pwrite

    def half_then_full(fd, data, offset):
        if len(data) > 1 and not half_then_full.cut:
            half_then_full.cut = True
            return real(fd, bytes(data[:len(data) // 2]), offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    half_then_full.cut = False
    monkeypatch.setattr(journal_module, "_pwrite", half_then_full)
    with pytest.raises(JournalWriteError):
        journal.add(COMMAND, 4, 1)
    monkeypatch.undo()
    assert os.path.getsize(path) == 3 * RECORD, "the torn half record (or the room past it) was left"
    journal._destroy()
    assert indexes(DurableJournal(path)) == [1, 2, 3]


def test_a_nearly_full_disk_gets_no_room_taken_and_the_refusal_is_logged_once(tmp_path, monkeypatch, caplog):
    # 2 MiB and 32 KiB free: more than the 2 MiB a fill must leave, but not once the 64 KiB fill counts.
    monkeypatch.setattr(disk.os, "fstatvfs", lambda fd: Free((2 << 20) + (32 << 10)))
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    journal.add(COMMAND, 1, 1)
    with caplog.at_level(logging.INFO):
        journal.onOneSecondTimer()
        assert os.path.getsize(path) == RECORD
        assert not journal._room.wanted(RECORD, time.monotonic()), "no backoff after a refusal"
        journal._room._retry_at = 0.0              # as if the backoff had passed
        journal.onOneSecondTimer()
    assert os.path.getsize(path) == RECORD and journal.failure is None
    assert len([r for r in caplog.records if "no room preallocated" in r.getMessage()]) == 1
    monkeypatch.undo()                              # space returns
    journal._room._retry_at = 0.0
    journal.onOneSecondTimer()
    assert os.path.getsize(path) > RECORD
