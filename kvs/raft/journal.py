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
The switch is per journal path (`set_fsync`, filled by `RaftGroup` from the
`KVS_FSYNC` setting before PySyncObj calls the journal factory, which takes
only a path); a journal whose path was never registered fsyncs.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import zlib
from typing import Any

from pysyncobj.journal import Journal

from kvs.raft import codec

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal"
META_SUFFIX = ".meta"

# record = header + command; header = command length, crc32, index, term
_HEADER = struct.Struct("<IIQQ")

_fdatasync = getattr(os, "fdatasync", os.fsync)     # macOS has no fdatasync

# journal path (absolute) -> fsync on or off; see `set_fsync`.
_FSYNC_BY_PATH: dict[str, bool] = {}

Entry = tuple  # (command: bytes, index: int, term: int), as PySyncObj uses them


def _checksum(command: bytes, index: int, term: int) -> int:
    return zlib.crc32(command, zlib.crc32(struct.pack("<QQ", index, term)))


def _encode(command: bytes, index: int, term: int) -> bytes:
    return _HEADER.pack(len(command), _checksum(command, index, term), index, term) + command


def set_fsync(journal_path: str, enabled: bool) -> None:
    """Choose whether the journal at `journal_path` fsyncs (the default for an unregistered path is on).

    PySyncObj builds its journal through `kvs.raft.storage.create_journal(path)`,
    a factory that receives nothing but the path, so the choice travels in this
    registry: `RaftGroup` registers its journal path here before it creates its
    SyncObj, and `DurableJournal` looks its path up when it opens. Registering
    again (a group re-created in the same directory) replaces the old choice."""
    _FSYNC_BY_PATH[os.path.abspath(journal_path)] = bool(enabled)


def fsync_enabled(journal_path: str) -> bool:
    return _FSYNC_BY_PATH.get(os.path.abspath(journal_path), True)


def fsync_directory(directory: str) -> None:
    """Make the names in `directory` (a rename, a new file) durable."""
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file_and_directory(path: str) -> None:
    """Make the file at `path`, and its name, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(os.path.dirname(path))


def _write_atomically(path: str, payload: bytes, fsync: bool) -> None:
    """Replace `path` by `payload`: a crash leaves the old or the new file, durably so when `fsync`."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
        if fsync:
            f.flush()
            os.fsync(f.fileno())    # the data before the name: never a renamed empty file
    os.replace(tmp, path)
    if fsync:
        fsync_directory(os.path.dirname(path))


class JournalSyncError(OSError):
    """An fsync of the journal failed: nothing written since the last good sync can be trusted."""


class DurableJournal(Journal):
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
        self._dirty = False                 # written (appended, truncated) since the last sync
        self._sync_error: OSError | None = None
        self.synced_index = 0               # index of the last entry the last sync covered (0: none)
        self.sync_count = 0                 # fdatasync calls made by sync()
        created = not os.path.exists(path)
        self._load()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._end = os.fstat(self._fd).st_size
        if created and self._fsync:
            fsync_directory(os.path.dirname(path))
        if snapshot_boundary is not None:
            self._align_to_snapshot(*snapshot_boundary)

    # -- opening -------------------------------------------------------------

    def _load(self) -> None:
        try:
            with open(self._path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return
        offset = 0
        while offset + _HEADER.size <= len(blob):
            length, crc, index, term = _HEADER.unpack_from(blob, offset)
            start = offset + _HEADER.size
            command = blob[start:start + length]
            if len(command) != length or _checksum(command, index, term) != crc:
                break
            self._entries.append((command, index, term))
            self._offsets.append(offset)
            offset = start + length
        if offset != len(blob):
            log.warning("journal %s: dropping %d bytes of a torn tail", self._path, len(blob) - offset)
            os.truncate(self._path, offset)
            self._dirty = True

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

    # -- the Journal interface ------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        command = bytes(command)
        record = _encode(command, idx, term)
        os.write(self._fd, record)
        self._dirty = True
        self._entries.append((command, idx, term))
        self._offsets.append(self._end)
        self._end += len(record)

    def clear(self) -> None:
        os.ftruncate(self._fd, 0)
        self._dirty = True
        self.synced_index = 0
        self._entries = []
        self._offsets = []
        self._end = 0

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom >= len(self._entries):
            return
        self._end = self._offsets[entryFrom]
        os.ftruncate(self._fd, self._end)
        self._dirty = True
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]
        self.synced_index = min(self.synced_index, self._entries[-1][1] if self._entries else 0)

    def deleteEntriesTo(self, entryTo: int) -> None:
        kept = self._entries[entryTo:]
        records = [_encode(*entry) for entry in kept]
        # With fsync on, the new file is fsynced before the rename and the directory after: every
        # kept entry is then durable, whatever the old file's unsynced tail held.
        _write_atomically(self._path, b"".join(records), self._fsync)
        if self._fsync:
            self._dirty = False
            self.synced_index = kept[-1][1] if kept else 0
        os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        self._entries = kept
        self._offsets = []
        offset = 0
        for record in records:
            self._offsets.append(offset)
            offset += len(record)
        self._end = offset

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        try:
            self.sync()
        except OSError:
            log.exception("journal %s: final sync failed", self._path)
        self._store_meta()
        os.close(self._fd)

    def flush(self) -> None:
        pass

    # -- durability (group commit) --------------------------------------------------

    @property
    def fsync(self) -> bool:
        """Whether this journal fsyncs (KVS_FSYNC)."""
        return self._fsync

    @property
    def dirty(self) -> bool:
        """Whether something was written since the last sync."""
        return self._dirty

    def sync(self) -> bool:
        """Make every entry written so far durable with one fdatasync, if anything changed; True if it did.

        Group commit: appends and truncations only mark the journal dirty; the
        caller syncs once per batch, before it acknowledges any of its entries.
        A failed fdatasync is sticky (`JournalSyncError` from then on): after a
        failure the kernel may have dropped the dirty pages and a retry would
        report success for data that never reached the disk, so the node must
        not acknowledge anything again; it stops until restarted.

        With fsync disabled (`KVS_FSYNC=off`) this does nothing. Entries then
        reach only the page cache: they survive the death of the process
        (SIGKILL, OOM) but not a power failure or kernel crash, which can lose
        acknowledged entries on every replica that failed at once, and, since
        `.meta` is not fsynced either, the term and vote, so a restarted node
        may vote twice in one term. Use it for tests and benchmarks only."""
        if self._sync_error is not None:
            raise JournalSyncError(f"journal {self._path}: an earlier fsync failed") from self._sync_error
        if not self._dirty or not self._fsync:
            return False
        try:
            _fdatasync(self._fd)
        except OSError as exc:
            self._sync_error = exc
            log.critical("journal %s: fsync failed (%r); this replica acknowledges nothing more", self._path, exc)
            raise JournalSyncError(f"journal {self._path}: fsync failed") from exc
        self._dirty = False
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
        _write_atomically(self._meta_path, pickle.dumps(self._meta), self._fsync)
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
        # here, on the tick thread, before PySyncObj sends the vote request or the vote.
        self._meta["term"] = term
        self._meta["voted_for"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:
        return self._meta.get("term", 0)

    def getVotedForNodeId(self) -> Any:
        return self._meta.get("voted_for")

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty:
            self._store_meta()
