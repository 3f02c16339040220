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

import json
import os
import subprocess
import sys
import textwrap

from kvs.raft import records
from kvs.raft.journal import DurableJournal

COMMAND = b"c" * 100
RECORD = len(records.encode(COMMAND, 1, 1))


def indexes(journal: DurableJournal) -> list[int]:
    return [journal[i][1] for i in range(len(journal))]


def test_after_the_timer_a_batch_and_its_fsync_do_not_grow_the_file(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    journal.add(COMMAND, 1, 1)
    journal.sync()
    journal.onOneSecondTimer()
    size = os.path.getsize(path)
    for i in range(2, 52):
        journal.add(COMMAND, i, 1)
    assert journal.sync()
    assert os.path.getsize(path) == size, "a write's fdatasync had to commit a new file size"
    assert size > 51 * RECORD
    journal._destroy()
    assert indexes(DurableJournal(path)) == list(range(1, 52))


def test_the_preallocated_zeros_are_kept_on_reopening_and_appends_continue_at_the_logs_end(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    for i in range(1, 4):
        journal.add(COMMAND, i, 1)
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
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    for i in range(1, 11):
        journal.add(COMMAND, i, 1)
    journal.deleteEntriesFrom(6)                # a conflict: indexes 7..10 go
    assert os.path.getsize(path) == 6 * RECORD
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
