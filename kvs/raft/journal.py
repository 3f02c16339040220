"""DurableJournal: PySyncObj's Raft log as an append-only file of checksummed records.

Replaces PySyncObj's `FileJournal` (see `kvs.raft.storage` for why and how it
is installed). Truncating the tail is one `ftruncate`; compaction writes the
kept entries to a new file and renames it over the old one, so a kill at any
instant leaves either the old or the new journal. A torn last record is
detected by its checksum and dropped. On open, the journal aligns itself with
the snapshot beside it: entries the snapshot already covers are dropped so the
journal starts exactly at the snapshot's boundary entries, which is what
PySyncObj checks for; entries after the snapshot are kept.

Term, vote and commit index live beside it in `<journal>.meta`: term and vote
are written (atomically) before any message reflects them, as Raft requires.

Durability against power loss (group commit). Appends and truncations only
mark the journal dirty; `sync()` makes everything written so far durable with
one `fdatasync`, however many entries that covers. `kvs.raft.replica` calls it
before any acknowledgement leaves a follower and before the leader counts
itself toward a commit, so one fsync covers a whole batch of entries. Every
file replaced by rename (compaction, `.meta`) is fsynced before the rename and
its directory after, and a newly created journal's directory is fsynced once.
The switch is per journal path (`kvs.raft.disk.set_fsync`, filled by
`RaftGroup` from `KVS_FSYNC` before PySyncObj calls the journal factory,
which takes only a path); a journal whose path was never registered fsyncs.

Preallocation. The file is grown ahead of the log in zero-filled chunks
(`kvs.raft.disk.Room`), and that growth is fsynced from the one-second timer,
so the fdatasync before an acknowledgement commits data only, not the file's
new size (on ext4 about a third cheaper, and it is on every write's path). The
log's end is therefore where the checksum scan stops (`kvs.raft.records`), not
the file's size: an all-zero header never checks. Truncations stay physical
`ftruncate`s, synced at once, so no stale record can lie behind the log's end
and come back on the next open.

Disk faults (a full disk, a size limit, EIO). Every change is all or nothing:
an append loops over short writes and, if one fails, cuts the file back to the
last whole record, so no later append can land behind a torn one; a failed
compaction or `.meta` write leaves the old file (and no `.tmp`). Any failure
then fails the journal for good (`failure`, sticky like a failed fsync): every
later change and sync raises, so its replica acknowledges, votes and sends
nothing (`kvs.raft.replica`), and its node closes the group and reopens it
from disk once the disk takes writes again (`kvs.raft.recovery`). What no
successful sync covered is cut off first (`JournalFailure.trusted_end`): it
was never acknowledged, and after a failed fsync the page cache may show
data the disk never got. The reopened replica catches up from its leader.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from typing import Any

from pysyncobj.journal import Journal

from kvs.metrics import FSYNC_SECONDS
from kvs.raft import codec, records
from kvs.raft.disk import (FailStop, JournalError, JournalFailure, JournalSyncError, JournalWriteError, Room,
                           cut_file, fsync_directory, fsync_enabled, pwrite_all, replace_file, set_fsync)

__all__ = ["DurableJournal", "JournalError", "JournalFailure", "JournalSyncError", "JournalWriteError", "set_fsync",
           "fsync_enabled"]

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal"
META_SUFFIX = ".meta"

_fdatasync = getattr(os, "fdatasync", os.fsync)     # macOS has no fdatasync
_pwrite = os.pwrite                                 # a seam for tests that make writes fail

Entry = records.Entry

class DurableJournal(FailStop, Journal):
    """An append-only, checksummed Raft log file with atomic compaction and group-commit fsync.

    `fsync` None means "as registered for this path" (`set_fsync`; on if never registered)."""

    def __init__(self, path: str, snapshot_boundary: tuple[Entry, Entry] | None = None,
                 fsync: bool | None = None):
        self._path = path
        self._meta_path = path + META_SUFFIX
        self._fsync = fsync_enabled(path) if fsync is None else bool(fsync)
        self._entries: list[Entry] = []
        self._offsets: list[int] = []       # file offset of each entry's record
        self._meta = self._load_meta()
        self._meta_dirty = False
        self.synced_index = 0               # index of the last entry the last sync covered (0: none)
        self.sync_count = 0                 # fdatasync calls made by sync()
        self._fd: int | None = None
        created = not os.path.exists(path)
        self._end = self._load()            # the log's end; the file may be longer (zeros: preallocated)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            self._room = Room(path, os.fstat(self._fd).st_size)
            # What is on disk at open is trusted, as after any restart; but it may still sit unsynced in
            # the page cache (the previous process died, or its group was closed, before its next sync):
            # the journal starts dirty, so the first acknowledgement is preceded by one fdatasync.
            self._synced_end = self._end
            self._dirty = True
            if created and self._fsync:
                fsync_directory(os.path.dirname(path))
            if snapshot_boundary is not None:
                self._align_to_snapshot(*snapshot_boundary)
        except BaseException:
            self._close_fd()
            raise

    # -- opening -------------------------------------------------------------

    def _load(self) -> int:
        """Read the records up to the first that does not check; the offset where the log ends."""
        try:
            with open(self._path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return 0
        self._entries, self._offsets, offset = records.scan(blob)
        if not records.only_zeros_after(blob, offset):
            log.warning("journal %s: dropping %d bytes of a torn tail", self._path, len(blob) - offset)
            cut_file(self._path, offset, self._fsync)      # durable before anything is written over it
        return offset                       # what follows is preallocated zeros, kept for later appends

    def _align_to_snapshot(self, prev: Entry, last: Entry) -> None:
        """Make the journal start at the snapshot's boundary entries (prev, last)."""
        if not self._entries or self._entries[-1][1] < last[1]:
            # The snapshot covers the whole journal: PySyncObj restarts the log from it.
            self.clear()
            return
        first_index = self._entries[0][1]
        pos = prev[1] - first_index
        if pos < 0:
            log.critical("journal %s starts at %d, after snapshot boundary %d", self._path, first_index, prev[1])
            return
        if self._entries[pos] != tuple(prev) or self._entries[pos + 1] != tuple(last):
            log.critical("journal %s disagrees with its snapshot at index %d", self._path, prev[1])
            return
        if pos:
            log.info("journal %s: dropping %d entries already in the snapshot", self._path, pos)
            self.deleteEntriesTo(pos)

    def _trusted_end(self) -> int:
        """For FailStop: the file offset up to which a successful sync (or the open) covered the file."""
        return self._synced_end if self._fsync else self._end

    # -- the Journal interface ------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        self._check()
        command = bytes(command)
        record = records.encode(command, idx, term)
        try:
            pwrite_all(self._fd, record, self._end, _pwrite)
        except OSError as exc:
            # All or nothing: cut the prefix that did reach the file, so that no later append lands behind
            # a torn record (on reload the checksum scan would stop there and drop everything after it).
            # Best effort: if the cut fails too, the torn bytes are past `trusted_end` and cut on reopen.
            try:
                os.ftruncate(self._fd, self._end)
                self._room.cut(self._end)
            except OSError:
                pass
            raise self._fail("append", exc, JournalWriteError) from exc
        self._dirty = True
        self._entries.append((command, idx, term))
        self._offsets.append(self._end)
        self._end += len(record)
        self._room.wrote(self._end)

    def _truncate(self, end: int) -> None:
        self._check()
        try:
            os.ftruncate(self._fd, end)
        except OSError as exc:
            raise self._fail("truncate", exc, JournalWriteError) from exc
        self._dirty = True
        self._end = end
        self._room.cut(end)
        self._synced_end = min(self._synced_end, end)

    # Both cuts are synced at once (they are rare): records are later written over the cut range, in
    # place, and a crash that kept such a record but not the cut would bring back the old ones behind it.

    def clear(self) -> None:
        self._truncate(0)
        self.synced_index = 0
        self._entries = []
        self._offsets = []
        self.sync()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom >= len(self._entries):
            return
        self._truncate(self._offsets[entryFrom])
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]
        self.synced_index = min(self.synced_index, self._entries[-1][1] if self._entries else 0)
        self.sync()

    def deleteEntriesTo(self, entryTo: int) -> None:
        self._check()
        kept = self._entries[entryTo:]
        encoded = [records.encode(*entry) for entry in kept]
        # With fsync on, the new file is fsynced before the rename and the directory after: every
        # kept entry is then durable, whatever the old file's unsynced tail held. A failure before
        # the rename leaves the old file whole (and no .tmp).
        try:
            replace_file(self._path, b"".join(encoded), self._fsync)
        except OSError as exc:
            raise self._fail("compaction", exc, JournalWriteError) from exc
        # The new file is in place: from here on every offset refers to it, also if what follows fails.
        self._entries = kept
        self._offsets = []
        offset = 0
        for record in encoded:
            self._offsets.append(offset)
            offset += len(record)
        self._end = offset
        if self._fsync:
            self._dirty = False
            self._synced_end = offset
            self.synced_index = kept[-1][1] if kept else 0
        else:
            self._synced_end = min(self._synced_end, offset)
        self._room.cut(offset)
        try:
            self._close_fd()
            self._fd = os.open(self._path, os.O_WRONLY)
            if self._fsync:
                fsync_directory(os.path.dirname(self._path))
        except OSError as exc:
            raise self._fail("compaction", exc, JournalSyncError) from exc

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        if self._failure is None:
            try:
                self.sync()
                self._store_meta()
            except JournalError:
                pass                        # logged by _fail; the group reports the failure
        failure = self._failure
        if failure is not None:
            # Leave no untrusted tail for whoever opens this file next (this process's recovery, which
            # cuts again if this fails, or the next process after a restart).
            try:
                cut_file(self._path, failure.trusted_end, self._fsync)
            except OSError as exc:
                log.error("journal %s: cannot cut its unsynced tail yet: %r", self._path, exc)
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # A journal whose opening failed half-way (PySyncObj's first append, on a full disk) is dropped
        # without _destroy: do not leak its descriptor.
        try:
            self._close_fd()
        except (OSError, AttributeError):
            pass

    def flush(self) -> None:
        pass

    # -- durability (group commit) --------------------------------------------------

    @property
    def fsync(self) -> bool:
        """Whether this journal fsyncs (KVS_FSYNC)."""
        return self._fsync

    @property
    def dirty(self) -> bool:
        """Whether something was written since the last sync (or since opening: see __init__)."""
        return self._dirty

    def sync(self) -> bool:
        """Make every entry written so far durable with one fdatasync, if anything changed; True if it did.

        Group commit: appends and truncations only mark the journal dirty; the
        caller syncs once per batch, before it acknowledges any of its entries.
        Any failure of the journal is sticky (`failure`): from then on this
        raises the same error class, so the node acknowledges nothing again
        until the group is reopened from disk.

        With fsync disabled (`KVS_FSYNC=off`) this does nothing. Entries then
        reach only the page cache: they survive the death of the process
        (SIGKILL, OOM) but not a power failure or kernel crash, which can lose
        acknowledged entries on every replica that failed at once, and, since
        `.meta` is not fsynced either, the term and vote, so a restarted node
        may vote twice in one term. Use it for tests and benchmarks only."""
        self._check()
        if not self._dirty or not self._fsync:
            return False
        started = time.monotonic()
        try:
            _fdatasync(self._fd)
        except OSError as exc:
            raise self._fail("fsync", exc, JournalSyncError) from exc
        FSYNC_SECONDS.observe(time.monotonic() - started)
        self._dirty = False
        self._synced_end = self._end
        self.synced_index = self._entries[-1][1] if self._entries else 0
        self.sync_count += 1
        return True

    # -- persistent Raft state: term, vote, commit index ------------------------

    def _load_meta(self) -> dict:
        try:
            with open(self._meta_path, "rb") as f:
                return codec.loads(f.read())
        except FileNotFoundError:
            return {}

    def _store_meta(self) -> None:
        # Fsynced (file, then directory) whenever fsync is on, also for the lazy commit-index writes:
        # a rename of an unsynced file could leave an empty .meta, losing the term and vote with it.
        # A failure fails the journal: a term or vote that may not be on disk must not be acted on.
        self._check()
        try:
            replace_file(self._meta_path, pickle.dumps(self._meta), self._fsync)
            if self._fsync:
                fsync_directory(os.path.dirname(self._meta_path))
        except OSError as exc:
            raise self._fail("store of term, vote and commit index", exc, JournalWriteError) from exc
        self._meta_dirty = False

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        # Stored lazily: a lower commit index after a restart is safe, the leader re-sends it.
        if self._meta.get("commit_index") != raftCommitIndex:
            self._meta["commit_index"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return self._meta.get("commit_index", 1)

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        # Raft needs term and vote on disk before any message that reflects them: written and fsynced
        # here, on the tick thread, before PySyncObj sends the vote request or the vote; if that fails,
        # this raises and PySyncObj sends neither.
        self._check()
        self._meta["term"] = term
        self._meta["voted_for"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:
        return self._meta.get("term", 0)

    def getVotedForNodeId(self) -> Any:
        return self._meta.get("voted_for")

    def onOneSecondTimer(self) -> None:
        if self._failure is not None:
            return
        # Keep room ahead of the log, and sync the growth here, off the write path.
        now = time.monotonic()
        if self._room.wanted(self._end, now) and self._room.grow(self._fd, self._end, now, _pwrite):
            self._dirty = True
            self.sync()
        if self._meta_dirty:
            self._store_meta()
