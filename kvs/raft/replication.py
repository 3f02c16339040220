"""Change 2 of `kvs.raft.replica`: AppendEntries leave at the end of the tick that moved the log or the
commit index, not at PySyncObj's next heartbeat; and when a new commit index alone waits.

With batching on, PySyncObj sends AppendEntries every `appendEntriesPeriod` (50 ms). `Replica`
calls `send` from a tick callback: if the leader's log or commit index moved since it last sent, it
sends now, one message per follower for everything queued in that tick, and followers learn commit
indexes without waiting for a heartbeat.

Except a commit index whose requests the event loop answers (`hold`, from `kvs.raft.loop`'s commit
callback on the tick thread). A message for it alone costs, per follower, a pickle, an encryption,
a send and an answer to read back, all holding the GIL that the loop, woken to answer those requests,
is waiting for; a lone write's commit index then doubled the messages of its write. Instead it rides
on the next AppendEntries: the next write's entries (at one client, about a millisecond later), the
heartbeat after `appendEntriesPeriod` of quiet, or the one `send_held` sends before a follower is told
a read index (`kvs.raft.read_index`: the follower then waits to apply that index, and the commit
index reaches it first, on the same connection). Raft lets followers learn commits late; nothing
else waits for a follower's commit index (a write is acknowledged by the leader; every read, on any
replica, waits for its read index).

Everything here runs on the replica's tick thread (or its loop, `kvs.raft.loop_replica`).
"""

from __future__ import annotations

from typing import Any


class Replication:
    def __init__(self, raft: Any):
        self._raft = raft                   # the Replica (a SyncObj subclass)
        self.sent_log_index = 0             # what the last AppendEntries round carried
        self.sent_commit_index = 0
        self._held = False

    def hold(self) -> None:
        """The commit just applied answers requests on the event loop: no message for its index alone."""
        self._held = True

    def send_held(self) -> None:
        """A commit index held back leaves now (before a follower is told a read index)."""
        if self._held:
            self._held = False
            self.send()

    def only_commit_moved(self) -> bool:
        raft = self._raft
        return (raft._SyncObj__raftLog[-1][1] == self.sent_log_index
                and raft.raftCommitIndex != self.sent_commit_index)

    def send(self) -> None:
        """At the end of a tick: AppendEntries to every follower if the log or the commit index moved."""
        raft = self._raft
        if not raft._isLeader():
            self._held = False
            return
        last_index = raft._SyncObj__raftLog[-1][1]
        commit_index = raft.raftCommitIndex
        if self._held:
            if last_index == self.sent_log_index:
                return                      # only the commit index moved: it waits (see the module)
            self._held = False              # new entries leave now, and carry it
        if last_index != self.sent_log_index or commit_index != self.sent_commit_index:
            raft._SyncObj__sendAppendEntries()
            self.sent_log_index = last_index
            self.sent_commit_index = commit_index
