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
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import zlib
from typing import Any

from pysyncobj.journal import Journal

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal"
META_SUFFIX = ".meta"

# record = header + command; header = command length, crc32, index, term
_HEADER = struct.Struct("<IIQQ")

Entry = tuple  # (command: bytes, index: int, term: int), as PySyncObj uses them


def _checksum(command: bytes, index: int, term: int) -> int:
    return zlib.crc32(command, zlib.crc32(struct.pack("<QQ", index, term)))


def _encode(command: bytes, index: int, term: int) -> bytes:
    return _HEADER.pack(len(command), _checksum(command, index, term), index, term) + command


def _write_atomically(path: str, payload: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


class DurableJournal(Journal):
    """An append-only, checksummed Raft log file with atomic compaction."""

    def __init__(self, path: str, snapshot_boundary: tuple[Entry, Entry] | None = None):
        self._path = path
        self._meta_path = path + META_SUFFIX
        self._entries: list[Entry] = []
        self._offsets: list[int] = []       # file offset of each entry's record
        self._meta = self._load_meta()
        self._meta_dirty = False
        self._load()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._end = os.fstat(self._fd).st_size
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
        self._entries.append((command, idx, term))
        self._offsets.append(self._end)
        self._end += len(record)

    def clear(self) -> None:
        os.ftruncate(self._fd, 0)
        self._entries = []
        self._offsets = []
        self._end = 0

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom >= len(self._entries):
            return
        self._end = self._offsets[entryFrom]
        os.ftruncate(self._fd, self._end)
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]

    def deleteEntriesTo(self, entryTo: int) -> None:
        kept = self._entries[entryTo:]
        records = [_encode(*entry) for entry in kept]
        _write_atomically(self._path, b"".join(records))
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
        self._store_meta()
        os.close(self._fd)

    def flush(self) -> None:
        pass

    # -- persistent Raft state: term, vote, commit index ------------------------

    def _load_meta(self) -> dict:
        try:
            with open(self._meta_path, "rb") as f:
                return pickle.loads(f.read())
        except FileNotFoundError:
            return {}

    def _store_meta(self) -> None:
        _write_atomically(self._meta_path, pickle.dumps(self._meta))
        self._meta_dirty = False

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        # Stored lazily: a lower commit index after a restart is safe, the leader re-sends it.
        if self._meta.get("commit_index") != raftCommitIndex:
            self._meta["commit_index"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return self._meta.get("commit_index", 1)

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        # Raft needs term and vote on disk before any message that reflects them.
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
