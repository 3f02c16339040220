"""GroupRecovery: groups whose journal failed are closed, and reopened from disk once it takes writes again.

A replica whose journal failed (a full disk, EIO: `DurableJournal.failure`)
has halted: it acknowledges, votes and sends nothing, and its group goes on
with the other replicas (`kvs.raft.replica`, "Disk faults"). Nothing in the
running replica is repaired in place: like a database after an I/O error it
is restarted from what its files hold, which is the one state Raft's rules
were written for (a replica that crashed and came back).

1. `take`: the node's supervisor hands over the halted group; it is closed at
   once (its sockets too, so the peers stop waiting for it).
2. `reopen_due`, every supervisor round: a group whose next attempt is due is
   built again by the node (the same constructor call as at its start, on the
   same directory; or not at all if the node no longer runs that group) if its
   directory takes a 1 MiB write, fsync and removal again
   (`kvs.raft.disk.probe_directory`) and its journal could be cut down to the
   part that successful syncs covered (`JournalFailure.trusted_end`: the rest
   was never acknowledged, and after a failed fsync the page cache may show
   data that never reached the disk). A failed attempt waits longer before the
   next (bounded: `BACKOFF`), and so does a group that halts again soon after
   it was reopened (a disk with room for the probe but not for the journal's
   next batches, a per-file size limit): it keeps its backoff instead
   of being closed and reopened every round. The reopened replica loads its
   snapshot and journal as after a restart and catches up from the leader.

Owned by the node's supervisor thread: `take` and `reopen_due` run on it only
(PySyncObj stops a replica's tick thread when the thread that created it
ends); `status`, `failures` and `holds` may be called from any thread. A
group is listed here before it is closed, so that /health always sees it
either running or down.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from kvs.raft.disk import JournalFailure, cut_file, fsync_enabled, probe_directory
from kvs.raft.group import RaftGroup

log = logging.getLogger(__name__)

BACKOFF = (0.5, 5.0)       # seconds before the second attempt, and the longest wait between attempts
STABLE_AFTER = 30.0        # a group that halts again sooner after its reopening keeps its backoff


@dataclass
class _Down:
    name: str
    directory: str
    failure: JournalFailure
    next_attempt: float                 # time.monotonic()
    wait: float = BACKOFF[0]
    attempts: int = 0
    last_error: str | None = None


class GroupRecovery:
    """The halted groups of one node, by the node's key for them ("meta", a shard id)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: dict[str, _Down] = {}
        self._reopened: dict[str, tuple[float, float]] = {}     # key -> (reopened at, its backoff then)

    def take(self, key: str, group: RaftGroup) -> None:
        """Close the halted `group` now; `reopen_due` has it built again once its disk takes writes."""
        failure = group.failure
        assert failure is not None, f"group {group.name} has not failed"
        log.error("group %s halted (%s failed: %s); closing it until %s takes writes again", group.name,
                  failure.operation, failure.error, group.directory)
        now = time.monotonic()
        with self._lock:
            # A new fault is tried again at once (one that has passed already costs one round); a group
            # that halts again soon after its reopening waits as long as its last attempt would have.
            reopened_at, wait = self._reopened.pop(key, (0.0, 0.0))
            wait = wait if now - reopened_at < STABLE_AFTER else 0.0
            self._down[key] = _Down(group.name, group.directory, failure, now + wait,
                                    wait=min(max(wait * 2, BACKOFF[0]), BACKOFF[1]))
        try:                            # listed first: /health never sees it neither running nor down
            group.close()
        except Exception:               # a close that half failed must not keep the others from recovering
            log.exception("group %s: closing the halted replica failed", group.name)

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._down

    def holds_any(self) -> bool:
        with self._lock:
            return bool(self._down)

    def failures(self) -> list[tuple[str, JournalFailure]]:
        """(group name, why it halted) of every group held here."""
        with self._lock:
            return [(d.name, d.failure) for d in self._down.values()]

    def reopen_due(self, reopen: Callable[[str], RaftGroup | None]) -> dict[str, RaftGroup]:
        """Try every group whose attempt is due; those reopened, by key (no longer held here).

        `reopen(key)` builds the group again, or returns None if the node no
        longer runs it (retired meanwhile, or no longer a member): it is then
        dropped. It is asked only after the probe succeeded (a retired group
        on a disk that is still full stays listed until then)."""
        with self._lock:
            due = [(key, down) for key, down in self._down.items() if down.next_attempt <= time.monotonic()]
        reopened: dict[str, RaftGroup] = {}
        for key, down in due:
            down.attempts += 1
            try:
                probe_directory(down.directory)
                path = down.failure.path
                cut_file(path, down.failure.trusted_end, fsync_enabled(path))
                group = reopen(key)
            except Exception as exc:    # the disk still refuses, or the reopened journal failed to open
                down.last_error = f"{type(exc).__name__}: {exc}"
                down.next_attempt = time.monotonic() + down.wait
                if down.attempts == 1:
                    log.warning("group %s stays closed: %s; retrying every %.1f s at most", down.name,
                                down.last_error, BACKOFF[1])
                down.wait = min(down.wait * 2, BACKOFF[1])
                continue
            with self._lock:
                self._down.pop(key, None)
                if group is not None:
                    self._reopened[key] = (time.monotonic(), down.wait)
            if group is None:
                log.info("group %s is no longer run here: not reopened", down.name)
                continue
            log.warning("group %s reopened from disk (attempt %d); it catches up from its leader", down.name,
                        down.attempts)
            reopened[key] = group
        return reopened

    def status(self) -> dict[str, dict]:
        """Each halted group's status entry, by group name (for /kvs/status and /health)."""
        now = time.monotonic()
        with self._lock:
            down = list(self._down.values())
        return {d.name: {"role": "down", "leader": None, "failure": d.failure.describe(),
                         "reopen-attempts": d.attempts, "last-attempt-error": d.last_error,
                         "next-attempt-in": round(max(0.0, d.next_attempt - now), 1)}
                for d in down}
