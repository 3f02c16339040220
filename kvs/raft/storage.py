"""Crash-safe Raft storage for PySyncObj: our journal and our snapshot files.

Why this module exists. PySyncObj 0.3.17 loses acknowledged writes when every
replica of a group is killed and restarted (reproduced by tests/test_storage.py):

1. On start it loads the full dump and, if the dump's two boundary entries are
   not exactly the first two journal entries, clears the whole journal
   (`SyncObj.__loadDumpFile`). The dump is renamed into place *before* the
   journal is compacted, so a kill between the two (or a forked dump writer
   that outlives its parent) leaves a newer dump beside an uncompacted
   journal, and every entry after the dump is thrown away.
2. `FileJournal.deleteEntriesTo` compacts by rewriting the journal in place;
   a kill in the middle leaves only part of the kept entries.

Our fix, by design rather than by patching PySyncObj's private methods:

* `DurableJournal` replaces `FileJournal` (installed by `install()`, which sets
  the journal factory `pysyncobj.syncobj.createJournal`). It is an append-only
  file of checksummed records; truncating the tail is one `ftruncate`;
  compaction writes the kept entries to a new file and renames it over the old
  one, so a kill at any instant leaves either the old or the new journal.
  A torn last record is detected by its checksum and dropped.
* On open, the journal aligns itself with the snapshot beside it: entries the
  snapshot already covers are dropped so the journal starts exactly at the
  snapshot's boundary entries, which is what PySyncObj checks for. Entries
  after the snapshot are kept.
* Snapshots are taken off the tick thread (`kvs.raft.snapshots`): the tick
  thread only captures the state machine's `snapshot()`, a worker pickles and
  fsyncs it, and the journal is compacted only after the new snapshot is
  renamed into place, so a kill at any instant leaves a pair the journal's
  alignment on open makes consistent.
* `BackgroundSerializer` replaces PySyncObj's Serializer (installed by
  `install()`, which sets `pysyncobj.syncobj.Serializer`): the stock one
  renames `<dump>.tmp` onto the dump as soon as a custom serializer returns,
  which leaves no room for a background write (details in its docstring).

Durability: with KVS_FSYNC on (the default) the journal is fsynced before an
entry is acknowledged, one fsync per batch (group commit, `kvs.raft.journal`),
and snapshot files are fsynced before their rename, so an acknowledged write
survives power loss as well as process death. With KVS_FSYNC off (tests only)
journal writes reach the page cache: SIGKILL and OOM lose nothing, power loss
can lose the newest entries of a replica.
"""

from __future__ import annotations

import os

import pysyncobj.syncobj
from pysyncobj.journal import Journal, MemoryJournal

from kvs.raft import codec
from kvs.raft.disk import fsync_enabled, fsync_file_and_directory
from kvs.raft.journal import JOURNAL_NAME, DurableJournal
from kvs.raft.snapshots import (SNAPSHOT_FORMAT_SLICED, SNAPSHOT_NAME, TEMP_SUFFIX, BackgroundSerializer,
                                SnapshotCodec, read_snapshot_boundary)

__all__ = ["DurableJournal", "SnapshotCodec", "BackgroundSerializer", "read_snapshot_boundary", "group_files",
           "create_journal", "install", "SNAPSHOT_FORMAT_SLICED", "TEMP_SUFFIX"]


def group_files(directory: str) -> tuple[str, str]:
    """(journal path, snapshot path) of the group stored in `directory`."""
    return os.path.join(directory, JOURNAL_NAME), os.path.join(directory, SNAPSHOT_NAME)


def create_journal(journal_path: str | None = None) -> Journal:
    """The journal factory PySyncObj calls; see `install`."""
    if journal_path is None:
        return MemoryJournal()
    snapshot_path = os.path.join(os.path.dirname(journal_path), SNAPSHOT_NAME)
    boundary = read_snapshot_boundary(snapshot_path)
    if boundary is not None and fsync_enabled(journal_path):
        # The journal is about to be cut to this snapshot's boundary, durably: the snapshot's rename
        # must be durable first. A process that died between renaming it and syncing its directory
        # leaves it only in the page cache, and a power loss then would pair the old snapshot with
        # a journal cut for the new one.
        fsync_file_and_directory(snapshot_path)
    return DurableJournal(journal_path, boundary)


def install() -> None:
    """Make every SyncObj of this process use DurableJournal and BackgroundSerializer (idempotent).

    Both are module globals that SyncObj.__init__ looks up; a SyncObj without
    a journal file or without a SnapshotCodec behaves exactly as before."""
    codec.install()
    pysyncobj.syncobj.createJournal = create_journal
    pysyncobj.syncobj.Serializer = BackgroundSerializer
