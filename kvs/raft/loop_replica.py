"""LoopReplica: a Replica that a LoopPoller runs on the node's event loop (EXPERIMENTAL, KVS_RAFT_ON_LOOP=on).

What differs from a Replica on its tick thread (`kvs.raft.loop_poller` says how the loop drives it):
- Waking it is a loop callback (`LoopPoller.wake`), not a pipe.
- A commit-only AppendEntries leaves one loop iteration later, after the requests that the commit
  resolved have written their responses.
- It binds at its first tick, on the loop: SyncObj's constructor would otherwise spin until it binds.
- A catch-up send is cut into slices of `SEND_BUDGET`, one per loop iteration.
- Two steps that take seconds at 300,000 keys never run on the loop, since they would stop the
  node's HTTP and every other group's heartbeats for as long (longer than an election timeout):
  - the snapshot on disk is loaded in the constructor, on the constructing thread, instead of at
    the first tick;
  - a snapshot the leader sent is installed on a worker thread (`LoopPoller.run_off_loop`): the
    message whose chunk completes it is handled there, whole, while the loop holds every message
    read meanwhile; they are handled in order, on the loop, once the install is done.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable

from pysyncobj import SyncObj
from pysyncobj.monotonic import monotonic as pysyncobj_clock

from kvs.raft.replica import Replica

# How long one call of PySyncObj's __sendAppendEntries may send for, on the loop. PySyncObj allows
# `appendEntriesPeriod` (50 ms) per call, spent on one follower far behind (catch-up, a snapshot's
# chunks); on the loop that would stop HTTP and every group for as long. The rest is sent at the
# loop's next iteration instead, after whatever else is waiting.
SEND_BUDGET = 0.002


def completes_snapshot(message: Any) -> bool:
    """An AppendEntries carrying the last chunk of a snapshot: handling it installs the snapshot.

    (PySyncObj's `serialized` is `(data, is_first, is_last)`; regular entries carry `prevLogIdx`.)"""
    if not isinstance(message, dict) or message.get("type") != "append_entries" or "prevLogIdx" in message:
        return False
    serialized = message.get("serialized")
    return isinstance(serialized, (tuple, list)) and len(serialized) == 3 and serialized[2] is True


class LoopReplica(Replica):
    def __init__(self, *args: Any, **kwargs: Any):
        self._installing = False
        self._held: collections.deque[tuple[Any, dict]] = collections.deque()
        self._commit_send_deferred = False
        self.sends_continued = 0        # sends the budget cut short, continued at the next iteration
        super().__init__(*args, **kwargs)
        self._SyncObj__transport.constructing = False      # binds at its first tick, on the loop
        # The first tick would load the snapshot on the loop; load it here instead. PySyncObj does it
        # after binding, but nothing of the load depends on the socket.
        if self._SyncObj__needLoadDumpFile:
            path = self.conf.fullDumpFile
            if path is not None and os.path.isfile(path):
                self._SyncObj__loadDumpFile(clearJournal=False)
            self._SyncObj__needLoadDumpFile = False

    def _wake(self) -> None:
        self._poller.wake()         # (the PipeNotifier that Replica made stays unused)

    # -- the deferred commit-only send ----------------------------------------------------

    def _replicate_now(self) -> None:
        # When only the commit index moved, the AppendEntries that tells the followers (a pickle and an
        # encryption per follower) waits one loop iteration: the requests this commit resolved run
        # first and write their responses. New entries still leave at once.
        if self._isLeader() and self._replication.only_commit_moved():
            if not self._commit_send_deferred:
                self._commit_send_deferred = True
                self._poller.call_soon(self._send_deferred_commit)
            return
        super()._replicate_now()

    def _send_deferred_commit(self) -> None:
        self._commit_send_deferred = False
        if self.journal_failure is None:
            Replica._replicate_now(self)

    # -- catch-up sends in slices ----------------------------------------------------------

    def _SyncObj__sendAppendEntries(self) -> None:
        conf = self.conf
        period = conf.appendEntriesPeriod
        started = pysyncobj_clock()     # the clock PySyncObj reads newAppendEntriesTime on
        cut_short = False
        conf.appendEntriesPeriod = SEND_BUDGET
        try:
            SyncObj._SyncObj__sendAppendEntries(self)
            # PySyncObj stops sending once a call took longer than the budget. Only then is there a
            # rest to send at once; a follower behind for another reason (a snapshot file that cannot
            # be read, a connection that dropped) waits for the heartbeat, as before.
            cut_short = pysyncobj_clock() - started > SEND_BUDGET and self._behind()
        finally:
            conf.appendEntriesPeriod = period
            # The next send: at the loop's next iteration for the rest, else after the heartbeat period.
            # (Up-to-date followers get an empty AppendEntries at each continuation too.)
            self._SyncObj__newAppendEntriesTime = 0.0 if cut_short else started + period
        if cut_short:
            self.sends_continued += 1
            self._poller.wake()

    def _behind(self) -> bool:
        """A connected follower (or learner) has not been sent the whole log."""
        end = self._SyncObj__getCurrentLogIndex()
        connected = self._SyncObj__connectedNodes
        next_index = self._SyncObj__raftNextIndex
        return any(node in connected and next_index.get(node, end + 1) <= end
                   for node in self._SyncObj__otherNodes | self._SyncObj__readonlyNodes)

    # -- the fault policy for handlers ----------------------------------------------------

    def run_handlers(self, dispatch: Callable[[], None]) -> bool:
        """PySyncObj's message handlers, under the disk fault policy that `Replica._onTick` applies to
        them on a tick thread. False once halted (nothing ran): its sockets go unread. Messages held
        during an install go first."""
        def held_then_dispatch() -> None:
            self._handle_held()
            dispatch()
        return self._under_fault_policy(held_then_dispatch)

    def _under_fault_policy(self, handlers: Callable[[], None]) -> bool:
        if self.journal_failure is not None:
            return False
        try:
            handlers()
        except Exception:
            if self.journal_failure is None:
                raise
        return self.journal_failure is None

    # -- a snapshot from the leader is installed off the loop ------------------------------

    def _SyncObj__onMessageReceived(self, node: Any, message: dict) -> None:
        if self._installing or self._held:
            self._held.append((node, message))     # after the install and what was held before it
        else:
            self._handle(node, message)

    def _handle(self, node: Any, message: dict) -> None:
        if completes_snapshot(message) and self._poller.on_loop_thread():
            self._installing = True
            self._poller.run_off_loop(lambda: self._install(node, message), self._after_install)
        else:
            super()._SyncObj__onMessageReceived(node, message)

    def _install(self, node: Any, message: dict) -> None:
        """On the worker: the whole handler, as on a tick thread (read, fsync, restore, acknowledge)."""
        self._under_fault_policy(lambda: Replica._SyncObj__onMessageReceived(self, node, message))

    def _after_install(self) -> None:
        """Back on the loop, under the fault policy: then the messages held meanwhile."""
        self._installing = False
        self._commit_send_deferred = False          # a deferred send was dropped while the worker had it
        self._handle_held()

    def _handle_held(self) -> None:
        """On the loop: the messages held during an install, in order, until one of them starts
        another install (the rest stay held for after that one). A handler that raises leaves the
        rest held for the next dispatch, still ahead of anything read later."""
        while self._held and not self._installing and self.journal_failure is None:
            node, message = self._held.popleft()
            self._handle(node, message)
