"""Crash-safe Raft storage for PySyncObj: our journal and our snapshot files.

Why this module exists. PySyncObj 0.3.17 loses acknowledged writes when every
replica of a group is killed and restarted (../shared/notes/pysyncobj.md):

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
* Snapshots are taken off the tick thread. PySyncObj asks for one on its tick
  thread, the thread that also appends, commits, applies and sends
  heartbeats; pickling and writing a 300,000-key shard there stopped the whole
  group for the length of the dump. Like hashicorp/raft's FSM.Snapshot, only
  the capture happens there now: `SnapshotCodec.start` calls the state
  machine's `snapshot()` (C-level copies of objects `apply` never mutates
  afterwards; other states are pickled right there, see `SnapshotCodec`), and
  a worker thread pickles it in slices into a temporary file beside the
  snapshot, then flushes and fsyncs it. On a later tick the codec's
  `serializeChecker` (`SnapshotCodec.check`) renames the file onto the
  snapshot path; the worker fsyncs the directory; only then does the checker
  report SUCCESS, and only then does PySyncObj compact the journal to the
  snapshot's boundary. So the snapshot is renamed into place before the
  journal is compacted, as before, and a kill at any instant leaves either the old snapshot (and
  an unfinished temporary file, removed on the next open) or the new one
  beside a journal that has not been compacted yet, which the journal's
  alignment on open handles. A failed write reports FAILED, leaves the old
  snapshot and the journal untouched, and is retried after
  `SNAPSHOT_RETRY_DELAY`. There is no fork: no orphan writer can rename a
  dump after a kill, and a writer of a closed group never renames at all.
* `BackgroundSerializer` replaces PySyncObj's Serializer (installed by
  `install()`, which sets `pysyncobj.syncobj.Serializer`): the stock one
  renames `<dump>.tmp` onto the dump as soon as a custom serializer returns,
  which leaves no room for a background write (details in its docstring).

Durability is against process death (SIGKILL, OOM): journal writes reach the
page cache, not the disk platter (snapshot files are fsynced, the journal is
not). Power loss can still lose the newest entries of a
replica; a majority of replicas on separate machines bounds that in practice.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import pickle
import struct
import tempfile
import threading
import time
import zlib
from typing import Any

import pysyncobj.syncobj
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.journal import Journal, MemoryJournal
from pysyncobj.serializer import Serializer

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal"
SNAPSHOT_NAME = "snapshot"
META_SUFFIX = ".meta"
SNAPSHOT_FORMAT_WHOLE = 1          # header pickle, then the state machine's snapshot as one pickle
SNAPSHOT_FORMAT_SLICED = 2         # header pickle, then the snapshot in slices (see SnapshotCodec)
SNAPSHOT_SLICE_ITEMS = 2000        # keys (or list items) per slice: ~0.6 MB of 256-byte values
TEMP_SUFFIX = ".writing"           # <snapshot>.<random>.writing: a snapshot being written
SNAPSHOT_RETRY_DELAY = 5.0         # after a failed snapshot, the next one starts no sooner (seconds)
RENAME_WAIT = 60.0                 # a written file the tick thread has not renamed by then is dropped
CLOSE_TIMEOUT = 10.0               # how long close() waits for a writer to stop

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


class _Cancelled(Exception):
    """The codec was closed while its worker was writing."""


class _Job:
    """One snapshot on its way to disk; `phase` changes only under the codec's lock."""

    __slots__ = ("phase", "tmp", "thread", "wake", "cancel", "superseded", "report_at", "started")

    def __init__(self, phase: str, report_at: float = 0.0):
        self.phase = phase
        self.tmp: str | None = None
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()       # set by the tick thread's rename, a discard, or close()
        self.cancel = threading.Event()     # set by close(): stop writing between slices
        self.superseded = False             # a snapshot from the leader was installed meanwhile
        self.report_at = report_at          # a deferred failure is reported no earlier than this
        self.started = time.monotonic()


_WRITING, _WRITTEN, _RENAMED, _DONE, _FAILED = "writing", "written", "renamed", "done", "failed"


class SnapshotCodec:
    """Our snapshot files for one state machine, written off PySyncObj's tick thread.

    PySyncObj drives it through `BackgroundSerializer` (see `install`):
    `start(boundary)` on the tick thread, then `check()` on every tick until it
    reports SUCCESS or FAILED; `deserialize(path)` loads a file.

    A file starts with a small header pickle (format, boundary entries,
    cluster) that the journal reads on open. Format 1: the state machine's
    snapshot follows as one pickle. Format 2: a dict snapshot follows in
    slices, records `(kind, name, payload)`: ("value", name, object),
    ("dict", name, [(key, value), ...]), ("list", name, [item, ...]) and a
    final ("end", None, None); slices of one name are concatenated.

    `detached` says that the objects `state.snapshot()` returns are never
    mutated afterwards by `apply` (ShardState: C-level copies of its dicts and
    lists, immutable values, rings that are replaced, never edited). Only
    then is the capture itself handed to the worker, which pickles it in
    slices (format 2). Any other state is pickled on the tick thread at
    capture time (format 1): MetadataState keeps its view-change dict and
    updates it in place, and it is small.
    """

    def __init__(self, state: Any, path: str, detached: bool = False, slice_items: int = SNAPSHOT_SLICE_ITEMS):
        self._state = state
        self._path = path
        self._detached = detached
        self._slice_items = slice_items
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._closed = False
        self._retry_at = 0.0
        self.snapshots_written = 0      # snapshots durably in place and reported to PySyncObj
        self.snapshots_failed = 0
        _remove_stale_temporary_files(path)

    # -- on PySyncObj's tick thread ---------------------------------------------------

    def serialize(self, path: str, data: tuple) -> None:
        """The custom serializer named in SyncObjConf; never called once `install()` ran.

        PySyncObj's stock Serializer would call this with `path` = <snapshot>.tmp
        and rename that file onto the snapshot the moment this returns, which
        leaves no room for a background write. `BackgroundSerializer` calls
        `start` instead."""
        raise RuntimeError("SnapshotCodec needs storage.install() (BackgroundSerializer); see kvs.raft.storage")

    def start(self, boundary: tuple) -> None:
        """Capture the state for the snapshot ending at `boundary` = (last, prev, cluster); write it in the background.

        Runs on the tick thread right after the entry `last` was applied, so the
        capture is exactly the state at that entry. Never raises: a failure is
        reported by `check` as FAILED."""
        with self._lock:
            if self._job is not None or self._closed:
                log.error("snapshot %s: asked to start while %s", self._path,
                          "closed" if self._closed else "another snapshot is in progress")
                self._job = self._job or _Job(_FAILED)
                return
            if time.monotonic() < self._retry_at:
                # The last write failed moments ago: do not capture (and fail) again on every tick.
                self._job = _Job(_FAILED, report_at=self._retry_at)
                return
            job = self._job = _Job(_WRITING)
        try:
            last, prev, cluster = boundary
            header = {"format": SNAPSHOT_FORMAT_SLICED if self._detached else SNAPSHOT_FORMAT_WHOLE,
                      "last": last, "prev": prev, "cluster": cluster}
            capture = self._state.snapshot()
            if self._detached and type(capture) is dict:
                body: Any = capture
            else:
                header["format"] = SNAPSHOT_FORMAT_WHOLE
                body = pickle.dumps(capture, protocol=pickle.HIGHEST_PROTOCOL)
            job.thread = threading.Thread(target=self._write, args=(job, header, body), daemon=True,
                                          name=f"snapshot-writer:{self._path}")
            job.thread.start()
        except Exception:
            log.exception("snapshot %s: capture failed", self._path)
            with self._lock:
                job.phase = _FAILED

    def check(self) -> int:
        """PySyncObj's serializeChecker: where the snapshot is (a SERIALIZER_STATE); SUCCESS and FAILED once.

        The rename onto the snapshot path happens here, on the tick thread,
        so it is ordered with everything PySyncObj itself does to that file on
        this thread: installing a snapshot sent by the leader renames onto it
        too, and a worker renaming on its own could put an older snapshot back
        over the installed one. A job whose group was closed never renames."""
        with self._lock:
            job = self._job
            if job is None:
                return SERIALIZER_STATE.NOT_SERIALIZING
            if job.phase == _WRITTEN:
                if job.superseded or self._closed:
                    job.phase = _FAILED             # the worker removes its file
                else:
                    try:
                        os.replace(job.tmp, self._path)
                        job.phase = _RENAMED        # the worker fsyncs the directory next
                    except OSError:
                        log.exception("snapshot %s: rename failed", self._path)
                        job.phase = _FAILED
                job.wake.set()
            if job.phase in (_WRITING, _WRITTEN, _RENAMED):
                return SERIALIZER_STATE.SERIALIZING
            if job.phase == _FAILED and time.monotonic() < job.report_at:
                return SERIALIZER_STATE.SERIALIZING
            self._job = None
            if job.phase == _DONE and not job.superseded:
                self.snapshots_written += 1
                log.debug("snapshot %s: in place after %.3f s", self._path, time.monotonic() - job.started)
                return SERIALIZER_STATE.SUCCESS
            self.snapshots_failed += 1
            if job.report_at == 0.0:
                self._retry_at = time.monotonic() + SNAPSHOT_RETRY_DELAY
            return SERIALIZER_STATE.FAILED

    def deserialize(self, path: str) -> tuple:
        """Load the snapshot at `path` into the state; (last, prev, cluster) for PySyncObj."""
        with self._lock:
            if self._job is not None:
                # PySyncObj is loading a snapshot the leader sent (on this, the tick thread, right after
                # renaming it into place): the one being written is older; never rename it over this one.
                self._job.superseded = True
                self._job.cancel.set()
        with open(path, "rb") as f:
            header = pickle.load(f)
            fmt = header.get("format", SNAPSHOT_FORMAT_WHOLE)
            if fmt == SNAPSHOT_FORMAT_WHOLE:
                snapshot = pickle.load(f)
            elif fmt == SNAPSHOT_FORMAT_SLICED:
                snapshot = _read_slices(f)
            else:
                raise ValueError(f"snapshot {path}: unknown format {fmt!r}")
        self._state.restore(snapshot)
        return header["last"], header["prev"], header["cluster"]

    # -- on the worker thread ------------------------------------------------------------

    def _write(self, job: _Job, header: dict, body: Any) -> None:
        directory, name = os.path.split(self._path)
        try:
            fd, job.tmp = tempfile.mkstemp(prefix=name + ".", suffix=TEMP_SUFFIX, dir=directory or ".")
            with os.fdopen(fd, "wb") as f:
                pickle.dump(header, f, protocol=pickle.HIGHEST_PROTOCOL)
                if isinstance(body, bytes):
                    f.write(body)
                else:
                    self._write_slices(job, f, body)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as exc:
            self._discard(job)
            if not isinstance(exc, _Cancelled):
                log.error("snapshot %s: background write failed: %r", self._path, exc)
            with self._lock:
                job.phase = _FAILED
            return
        with self._lock:
            job.phase = _WRITTEN
        # Wait for the tick thread to rename the file (check runs every tick) or to discard it.
        job.wake.wait(RENAME_WAIT)
        with self._lock:
            if job.phase == _WRITTEN:               # never renamed: the tick thread stopped calling check
                job.phase = _FAILED
            renamed = job.phase == _RENAMED
        if not renamed:
            self._discard(job)
            return
        try:
            _fsync_directory(directory or ".")
        except OSError as exc:
            # Renamed but maybe not durable: no compaction; the journal still holds every entry.
            log.error("snapshot %s: directory fsync failed: %r", self._path, exc)
            with self._lock:
                job.phase = _FAILED
            return
        with self._lock:
            job.phase = _DONE

    def _write_slices(self, job: _Job, f: Any, snapshot: dict) -> None:
        """Format 2: each dict or list in slices, with the GIL released between slices."""
        n = self._slice_items
        for name, value in snapshot.items():
            if type(value) is dict:
                items = iter(value.items())
                records = iter(lambda: list(itertools.islice(items, n)), [])
                kind = "dict"
            elif type(value) is list:
                records = (value[i:i + n] for i in range(0, len(value), n))
                kind = "list"
            else:
                pickle.dump(("value", name, value), f, protocol=pickle.HIGHEST_PROTOCOL)
                continue
            pickle.dump((kind, name, []), f, protocol=pickle.HIGHEST_PROTOCOL)   # an empty one exists too
            for chunk in records:
                if job.cancel.is_set():
                    raise _Cancelled()
                pickle.dump((kind, name, chunk), f, protocol=pickle.HIGHEST_PROTOCOL)
                time.sleep(0)       # let the tick thread and request threads take the GIL
        pickle.dump(("end", None, None), f, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def _discard(job: _Job) -> None:
        if job.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(job.tmp)

    # -- closing ----------------------------------------------------------------------

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop a write in progress; call after the SyncObj is destroyed (no more `check`).

        The worker stops at its next slice and removes its file; it is a daemon,
        so a worker stuck in an fsync longer than `timeout` is left behind:
        it can no longer rename anything, and the next open removes its file."""
        with self._lock:
            self._closed = True
            job = self._job
            if job is not None:
                job.cancel.set()
                job.wake.set()
        thread = job.thread if job is not None else None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("snapshot %s: writer still running %.1f s after close", self._path, timeout)


def _read_slices(f: Any) -> dict:
    snapshot: dict = {}
    while True:                     # ends at the "end" record; a truncated file raises EOFError
        kind, name, payload = pickle.load(f)
        if kind == "end":
            return snapshot
        if kind == "value":
            snapshot[name] = payload
        elif kind == "dict":
            snapshot.setdefault(name, {}).update(payload)
        elif kind == "list":
            snapshot.setdefault(name, []).extend(payload)
        else:
            raise ValueError(f"unknown snapshot record {kind!r}")


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporary_files(path: str) -> None:
    """Remove what a writer killed (or closed) mid-write left beside the snapshot at `path`."""
    directory, name = os.path.split(path)
    for stale in glob.glob(os.path.join(glob.escape(directory or "."), glob.escape(name) + ".*" + TEMP_SUFFIX)):
        log.info("removing unfinished snapshot %s", stale)
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)


class BackgroundSerializer(Serializer):
    """PySyncObj's Serializer, except that a SnapshotCodec writes its snapshot itself, in the background.

    PySyncObj 0.3.17 `Serializer.serialize`, with a custom serializer and no
    fork, calls `serializer(<dump>.tmp, data)` and then at once
    `atomicReplace(<dump>.tmp, <dump>)`, i.e. it assumes the file is complete
    when the serializer returns. A serializer that only starts a write would
    either get a half-written file renamed into place or, if it wrote
    elsewhere, a rename of a missing file that PySyncObj swallows with a bare
    `except Exception` (marking the dump failed). SyncObjConf cannot name a
    Serializer class, but SyncObj builds one through the module global
    `pysyncobj.syncobj.Serializer`, which `install()` points here.

    For a SnapshotCodec, `serialize` only starts it (capture on the tick
    thread, write in the background) and remembers the id of the boundary
    entry; `checkSerializing` asks the SyncObjConf's `serializeChecker`
    (SnapshotCodec.check) through PySyncObj's own method and pairs the answer
    with that id, which PySyncObj compacts the journal to on SUCCESS (and
    on FAILED only logs a warning and tries again later). PySyncObj's own
    rename is never reached, and its private state (`__pid`) stays 0, so
    lagging followers are still sent the snapshot file in place while a new
    one is written: a transmission reads the file it opened, even after our
    rename. Every other serializer (stock SyncObjs, tests) gets PySyncObj's
    behaviour unchanged.
    """

    def __init__(self, fileName, transmissionBatchSize, tryUseFork, serializer, deserializer, serializeChecker):
        super().__init__(fileName, transmissionBatchSize, tryUseFork, serializer, deserializer, serializeChecker)
        owner = getattr(serializer, "__self__", None)
        self._codec = owner if isinstance(owner, SnapshotCodec) else None
        if self._codec is not None and serializeChecker != self._codec.check:
            raise ValueError("a SnapshotCodec needs SyncObjConf(serializeChecker=codec.check)")
        self._serializing_id = None

    def serialize(self, data, id):
        if self._codec is None:
            return super().serialize(data, id)
        self._serializing_id = id
        self._codec.start(data[1:])         # data = (None, last, prev, cluster)

    def checkSerializing(self):
        status, stock_id = super().checkSerializing()
        return status, (stock_id if self._codec is None else self._serializing_id)


def read_snapshot_boundary(path: str) -> tuple[Entry, Entry] | None:
    """The (prev, last) boundary entries of the snapshot at `path`, if there is one."""
    try:
        with open(path, "rb") as f:
            header = pickle.load(f)
    except FileNotFoundError:
        return None
    return tuple(header["prev"]), tuple(header["last"])


def group_files(directory: str) -> tuple[str, str]:
    """(journal path, snapshot path) of the group stored in `directory`."""
    return os.path.join(directory, JOURNAL_NAME), os.path.join(directory, SNAPSHOT_NAME)


def create_journal(journal_path: str | None = None) -> Journal:
    """The journal factory PySyncObj calls; see `install`."""
    if journal_path is None:
        return MemoryJournal()
    snapshot_path = os.path.join(os.path.dirname(journal_path), SNAPSHOT_NAME)
    return DurableJournal(journal_path, read_snapshot_boundary(snapshot_path))


def install() -> None:
    """Make every SyncObj of this process use DurableJournal and BackgroundSerializer (idempotent).

    Both are module globals that SyncObj.__init__ looks up; a SyncObj without
    a journal file or without a SnapshotCodec behaves exactly as before."""
    pysyncobj.syncobj.createJournal = create_journal
    pysyncobj.syncobj.Serializer = BackgroundSerializer
