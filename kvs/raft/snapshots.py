"""Snapshots taken off the tick thread: SnapshotCodec and the BackgroundSerializer PySyncObj uses.

PySyncObj asks for a snapshot on its tick thread, the thread that also
appends, commits, applies and sends heartbeats; pickling and writing a
300,000-key shard there stopped the whole group for the length of the dump.
Like hashicorp/raft's FSM.Snapshot, only the capture happens there now:
`SnapshotCodec.start` calls the state machine's `snapshot()` (C-level copies of
objects `apply` never mutates afterwards; other states are pickled right
there), and a worker thread pickles it in slices into a temporary file beside
the snapshot, then flushes and fsyncs it. On a later tick the codec's
`serializeChecker` (`SnapshotCodec.check`) renames the file onto the snapshot
path; the worker fsyncs the directory; only then does the checker report
SUCCESS, and only then does PySyncObj compact the journal to the snapshot's
boundary. So the snapshot is renamed into place before the journal is
compacted, and a kill at any instant leaves either the old snapshot (and an
unfinished temporary file, removed on the next open) or the new one beside a
journal that has not been compacted yet, which the journal's alignment on
open handles. A failed write reports FAILED, leaves the old snapshot and the
journal untouched, and is retried after `SNAPSHOT_RETRY_DELAY`. There is no
fork: no orphan writer can rename a dump after a kill, and a writer of a
closed group never renames at all.

`BackgroundSerializer` replaces PySyncObj's Serializer (installed by
`kvs.raft.storage.install`): the stock one renames `<dump>.tmp` onto the dump
as soon as a custom serializer returns, which leaves no room for a background
write (details in its docstring).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import pickle
import tempfile
import threading
import time
from typing import Any

from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.serializer import Serializer

from kvs.metrics import SNAPSHOT_SECONDS
from kvs.raft import codec
from kvs.raft.disk import fsync_directory

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "snapshot"
SNAPSHOT_FORMAT_WHOLE = 1          # header pickle, then the state machine's snapshot as one pickle
SNAPSHOT_FORMAT_SLICED = 2         # header pickle, then the snapshot in slices (see SnapshotCodec)
SNAPSHOT_SLICE_ITEMS = 2000        # keys (or list items) per slice: ~0.6 MB of 256-byte values
TEMP_SUFFIX = ".writing"           # <snapshot>.<random>.writing: a snapshot being written
SNAPSHOT_RETRY_DELAY = 5.0         # after a failed snapshot, the next one starts no sooner (seconds)
RENAME_WAIT = 60.0                 # a written file the tick thread has not renamed by then is dropped
CLOSE_TIMEOUT = 10.0               # how long close() waits for a writer to stop

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
            # A learner (kvs.raft.replica, change 5) is a member of no configuration: PySyncObj counts its
            # missing address (None) into the cluster it records; its snapshot keeps only real members.
            cluster = type(cluster)(node for node in cluster if node is not None)
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
            header = codec.load(f)
            fmt = header.get("format", SNAPSHOT_FORMAT_WHOLE)
            if fmt == SNAPSHOT_FORMAT_WHOLE:
                snapshot = codec.load(f)
            elif fmt == SNAPSHOT_FORMAT_SLICED:
                snapshot = _read_slices(f)
            else:
                raise ValueError(f"snapshot {path}: unknown format {fmt!r}")
        self._state.restore(snapshot)
        return header["last"], header["prev"], header["cluster"]

    # -- on the worker thread ------------------------------------------------------------

    def _write(self, job: _Job, header: dict, body: Any) -> None:
        directory, name = os.path.split(self._path)
        started = time.monotonic()
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
            SNAPSHOT_SECONDS.observe(time.monotonic() - started)
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
            fsync_directory(directory or ".")
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
        kind, name, payload = codec.load(f)
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


def read_snapshot_boundary(path: str) -> tuple[tuple, tuple] | None:
    """The (prev, last) boundary entries of the snapshot at `path`, if there is one."""
    try:
        with open(path, "rb") as f:
            header = codec.load(f)
    except FileNotFoundError:
        return None
    return tuple(header["prev"]), tuple(header["last"])
