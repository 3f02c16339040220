"""The disk as the Raft storage sees it: all-or-nothing writes, fsyncs, the fsync switch, failures.

Shared by the journal (`kvs.raft.journal`), the snapshot writer
(`kvs.raft.snapshots`), the replica (an installed snapshot is fsynced) and the
recovery of a group whose journal failed (`kvs.raft.recovery`): file helpers,
the per-journal fsync switch (`set_fsync`), the journal's error classes and
the record of its failure (`JournalFailure`), and the probe that tells when a
disk takes writes again.

A full disk (ENOSPC), a file-size limit (EFBIG) or a failing device (EIO) make
`os.write` either write a prefix and return a short count or raise; a short
write is not an error to Python. Every helper here either completes or raises,
and cleans up what it started (a `.tmp` file) when it raises.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# journal path (absolute) -> fsync on or off; see `set_fsync`.
_FSYNC_BY_PATH: dict[str, bool] = {}

_PROBE_PREFIX = ".probe-"
# Room for many batches, not one page: closing a halted journal frees a few pages (its cut tail, a
# removed .tmp), and a probe that fit in them would reopen the group only to fail it again at once.
_PROBE_BYTES = 1 << 20

# Room (a journal's preallocation): a file's first chunk is small, as most groups write little; a
# chunk used up within _FAST_FILL seconds makes the next twice as big, up to what the recovery probe
# asks of a disk. A fill never leaves less than _KEEP_FREE free on the file system: the room of one
# group must not take the space another group's next record, vote or probe needs. The groups of a
# node fill one at a time (_FILL_LOCK: each ticks on its own thread), so two cannot both pass the check.
_FIRST_CHUNK = 64 << 10
_LAST_CHUNK = _PROBE_BYTES
_KEEP_FREE = 2 * _PROBE_BYTES
_FAST_FILL = 10.0
_RETRY_SECONDS = (1.0, 30.0)
_FILL_LOCK = threading.Lock()


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


class JournalError(OSError):
    """The journal could not write, truncate, rename or fsync; it refuses every change from then on."""


class JournalWriteError(JournalError):
    """A write, truncation or rename of the journal or its `.meta` failed (a full disk, EIO)."""


class JournalSyncError(JournalError):
    """An fsync of the journal failed: nothing written since the last good sync can be trusted."""


@dataclass(frozen=True)
class JournalFailure:
    """Why and when a journal failed, and how much of its file a reopened journal may trust."""

    path: str
    operation: str          # "append", "truncate", "compaction", "fsync", "store of term, vote and ...", ...
    error: str
    since: float            # wall clock (time.time()), for people
    trusted_end: int        # file offset: what lies beyond was never covered by a successful sync

    def describe(self) -> dict:
        return {"journal": self.path, "operation": self.operation, "error": self.error, "since": self._since()}

    def summary(self) -> str:
        return (f"its journal's {self.operation} failed at {self._since()} ({self.error}); it is reopened from "
                "disk once the disk takes writes again")

    def _since(self) -> str:
        return datetime.datetime.fromtimestamp(self.since, datetime.timezone.utc).isoformat(timespec="seconds")


class FailStop:
    """The fail-stop rule of a journal: its first failure is recorded, logged once (CRITICAL), and sticks.

    Sticky like a failed fsync ("fsyncgate": after one, the kernel may have
    dropped the dirty pages and marked them clean, so a retry would report
    success for data that never reached the disk), and for every other error
    too: its replica must not acknowledge or vote again before its group is
    closed and reopened from what is on disk (`kvs.raft.recovery`), which
    first cuts the file down to `JournalFailure.trusted_end`. A subclass has
    `_path` and `_trusted_end()`, calls `_check()` before every change and
    raises what `_fail` returns when a change fails."""

    _path: str
    _failure: JournalFailure | None = None
    _failure_class: type[JournalError] = JournalError

    @property
    def failure(self) -> JournalFailure | None:
        """Why and since when this journal refuses every change (None while it works)."""
        return self._failure

    def _trusted_end(self) -> int:
        raise NotImplementedError

    def _fail(self, operation: str, exc: OSError, kind: type[JournalError]) -> JournalError:
        """Record the first failure; the error to raise for this one (its cause: `exc`)."""
        if self._failure is None:
            self._failure = JournalFailure(self._path, operation, f"{type(exc).__name__}: {exc}", time.time(),
                                           self._trusted_end())
            self._failure_class = kind
            log.critical("journal %s: %s failed (%s); this replica acknowledges nothing more until its group is "
                         "reopened", self._path, operation, exc)
        error = kind(f"journal {self._path}: {operation} failed: {exc}")
        error.__cause__ = exc
        return error

    def _check(self) -> None:
        failure = self._failure
        if failure is not None:
            raise self._failure_class(f"journal {self._path}: {failure.operation} failed earlier ({failure.error}); "
                                      "it refuses every change until reopened")


def write_all(fd: int, data: bytes, write=os.write) -> None:
    """Write every byte of `data` to `fd`, looping over short writes; OSError if one write fails.

    The kernel answers a write that meets a full disk or a size limit with a
    short count first and the error only on the next call; the caller decides
    what to do with the prefix already written (the journal cuts it off)."""
    view = memoryview(data)
    while view:
        written = write(fd, view)
        if written <= 0:            # never for a regular file, but a loop must not spin on it
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def pwrite_all(fd: int, data: bytes, offset: int, pwrite=os.pwrite) -> None:
    """`write_all` at a file offset: every byte of `data` written at `offset`, or OSError."""
    view = memoryview(data)
    while view:
        written = pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]
        offset += written


def fill_with_zeros(fd: int, start: int, end: int, pwrite=os.pwrite) -> None:
    """Write zero bytes over [start, end) of the file, growing it to `end`; OSError if the disk refuses.

    Real zeros rather than `posix_fallocate`: an overwrite of a written block
    needs no extent conversion, so its fdatasync commits data only."""
    zeros = bytes(min(end - start, 1 << 16))
    while start < end:
        piece = min(len(zeros), end - start)
        pwrite_all(fd, memoryview(zeros)[:piece], start, pwrite)
        start += piece


class Room:
    """Zero-filled room kept past a file's logical end, so that its writes rarely change its size.

    An fdatasync after a write into a file's existing blocks commits the data
    only; one after a write that grows the file must also commit the new size,
    a file-system journal commit (on ext4 about a third more, and concurrent
    ones queue behind each other). The owner writes at its logical end,
    tells `wrote` and `cut` where that end is, and calls `grow` when `wanted`
    says, off its write path, then syncs the growth. `grow` never raises: a
    disk that refuses the room costs the saving, not the file."""

    def __init__(self, path: str, allocated: int):
        self.path = path
        self.allocated = allocated          # the file's size: the logical end, then zeros
        self.chunk = _FIRST_CHUNK
        self._filled_at: float | None = None    # when the last fill succeeded, and the log's end then
        self._filled_end = 0
        self._retry_at = 0.0
        self._backoff = _RETRY_SECONDS[0]
        self._refused = False

    def wanted(self, end: int, now: float) -> bool:
        """Whether less than half a chunk is left past `end` (and no refusal is being waited out)."""
        return self.allocated - end < self.chunk // 2 and now >= self._retry_at

    def grow(self, fd: int, end: int, now: float, pwrite=os.pwrite) -> bool:
        """Fill zeros from the current size to a chunk past `end`; True if the file grew."""
        chunk = self.chunk
        if (self._filled_at is not None and now - self._filled_at < _FAST_FILL
                and end - self._filled_end >= chunk // 2):
            chunk = min(chunk * 2, _LAST_CHUNK)     # the last chunk was really written, and quickly
        start, target = max(self.allocated, end), end + chunk
        try:
            with _FILL_LOCK:
                disk = os.fstatvfs(fd)
                if disk.f_bavail * disk.f_frsize - (target - start) < _KEEP_FREE:
                    raise OSError(errno.ENOSPC, f"it would leave less than {_KEEP_FREE} bytes free")
                fill_with_zeros(fd, start, target, pwrite)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)     # hand back what a partial fill took
            self.allocated = start
            self._retry_at, self._backoff = now + self._backoff, min(self._backoff * 2, _RETRY_SECONDS[1])
            if not self._refused:
                self._refused = True
                log.warning("%s: no room preallocated (%s); its writes grow it until there is", self.path, exc)
            return False
        if self._refused:
            self._refused = False
            log.info("%s: room preallocated again", self.path)
        self.allocated, self.chunk, self._backoff = target, chunk, _RETRY_SECONDS[0]
        self._filled_at, self._filled_end = now, end
        return True

    def wrote(self, end: int) -> None:
        self.allocated = max(self.allocated, end)

    def cut(self, end: int) -> None:
        self.allocated = end


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


def replace_file(path: str, payload: bytes, fsync: bool) -> None:
    """Put `payload` at `path` by writing `<path>.tmp` and renaming it; with `fsync` the data first.

    The directory is NOT fsynced here (the caller does it after recording that
    the new file is in place, see DurableJournal.deleteEntriesTo). If anything
    before the rename fails, `path` is untouched and the `.tmp` is removed: a
    full disk must not be filled further by half-written leftovers."""
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, payload)
            if fsync:
                os.fsync(fd)        # the data before the name: never a renamed empty file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def cut_file(path: str, length: int, fsync: bool) -> bool:
    """Cut the file at `path` down to `length` bytes if it is longer; True if it cut.

    Used to drop a journal's tail that no successful fsync covered (see
    `DurableJournal.failure`); a missing file has nothing to cut."""
    try:
        if os.path.getsize(path) <= length:
            return False
    except FileNotFoundError:
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, length)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return True


def probe_directory(directory: str) -> None:
    """Write, fsync and remove a 1 MiB file in `directory`; OSError if the disk refuses any of it.

    Asked before a group whose journal failed is opened again: a disk without
    that much room would fail the reopened journal again at once."""
    for stale in glob.glob(os.path.join(glob.escape(directory), _PROBE_PREFIX + "*")):
        with contextlib.suppress(OSError):
            os.remove(stale)            # a probe cut short by a kill
    path = os.path.join(directory, _PROBE_PREFIX + secrets.token_hex(4))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
