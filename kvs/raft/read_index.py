"""ReadIndex: linearizable reads without a log entry, on the leader and on followers (Raft §6.4).

PySyncObj has no ReadIndex and no lease: a deposed leader keeps believing it
leads for `leaderFallbackTimeout`, so reading its local state is not safe.
This module adds the ReadIndex protocol on PySyncObj's own transport:

1. A read asks its replica for a read index (`ReadIndex.request`, any thread).
2. On the leader, every request that arrived since the last round joins the
   next round: the leader records its commit index as the round's read index
   and sends a probe `{"type": "kvs_read_probe", "term", "seq"}` to every
   follower. A follower answers `kvs_read_ack` with the same term and seq if
   it is in that term (one term has one leader, so a probe of its term comes
   from the leader it follows). When a majority (the leader counting itself)
   has acknowledged this round, or a later one, the leader was still the
   leader after every read of the round arrived: no other leader can have
   committed anything it lacks.
3. A leader that has not yet committed an entry of its own term (its no-op)
   does not know the latest commit index; its rounds wait until it has.
4. A follower sends `{"type": "kvs_read_index_req", "id"}` to its leader,
   which runs the same round and answers `{"type": "kvs_read_index", "id",
   "index"}` (index None: not leader).
5. Either way the request's callback runs once this replica has applied the
   read index: its local state then holds every write acknowledged before the
   read arrived, and the caller reads it.

A leader that is isolated, or deposed by a higher term, gets no majority of
acks and never confirms a round: its reads fail (the callers answer 503 at
their deadline) instead of returning stale values. No clock is trusted.

Everything but `request` runs on the replica's tick thread. Callbacks run on
the tick thread and must not block: `callback(True)` means "read now",
`callback(False)` means "not now" (no leader, leadership lost, timed out;
the caller may retry).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Callable

Callback = Callable[[bool], None]              # a read: True = read now, False = not now
IndexConsumer = Callable[["int | None"], None]  # a round's taker: the confirmed read index, or None

PROBE = "kvs_read_probe"
ACK = "kvs_read_ack"
INDEX_REQUEST = "kvs_read_index_req"
INDEX_REPLY = "kvs_read_index"
MESSAGE_TYPES = frozenset((PROBE, ACK, INDEX_REQUEST, INDEX_REPLY))

ROUND_SECONDS = 1.0        # a round not confirmed by then fails (its reads may retry)
FOLLOWER_WAIT_SECONDS = 1.0


class _Round:
    __slots__ = ("seq", "term", "index", "takers", "started")

    def __init__(self, seq: int, term: int, index: int, takers: list, started: float):
        self.seq, self.term, self.index, self.takers, self.started = seq, term, index, takers, started


class ReadIndex:
    """The ReadIndex protocol of one replica. `raft` is the Replica (a SyncObj subclass)."""

    def __init__(self, raft: Any):
        self._raft = raft
        self._incoming: deque[Callback] = deque()       # reads from any thread, taken by the tick thread
        self._seq = itertools.count(1)
        self._rounds: list[_Round] = []                  # leader: rounds sent, oldest first
        self._acked: dict[Any, tuple[int, int]] = {}     # leader: follower node -> (term, highest seq acked)
        self._ids = itertools.count(1)
        self._asked: dict[int, tuple[list[Callback], float]] = {}   # follower: request id -> (reads, sent at)
        self._applied_waiters: list[tuple[int, Callback]] = []     # (index, read) until applied here

    # -- any thread -------------------------------------------------------------------------

    def request(self, callback: Callback) -> None:
        """Ask for a read index; `callback` runs on the tick thread (see the module docstring)."""
        self._incoming.append(callback)

    # -- tick thread ------------------------------------------------------------------------

    def on_tick(self) -> None:
        """Start a round for the reads that arrived, fail what timed out, release applied reads."""
        now = time.monotonic()
        raft = self._raft
        if self._rounds and (not raft._isLeader() or self._rounds[0].term != raft.raftCurrentTerm):
            self._fail_rounds()
        while self._rounds and now - self._rounds[0].started > ROUND_SECONDS:
            self._hand_out(self._rounds.pop(0).takers, None)
        for rid, (reads, sent) in list(self._asked.items()):
            if now - sent > FOLLOWER_WAIT_SECONDS:
                del self._asked[rid]
                for read in reads:
                    read(False)
        if self._incoming:
            reads = []
            while self._incoming:
                reads.append(self._incoming.popleft())
            self._serve_local(reads, now)
        self._release_applied()

    def on_message(self, node: Any, message: dict) -> None:
        """A ReadIndex message from `node` (the caller passes only MESSAGE_TYPES here)."""
        kind = message.get("type")
        raft = self._raft
        if kind == PROBE:
            if message.get("term") == raft.raftCurrentTerm and not raft._isLeader():
                self._send(node, {"type": ACK, "term": message["term"], "seq": message.get("seq")})
        elif kind == ACK:
            seq = message.get("seq")
            if raft._isLeader() and message.get("term") == raft.raftCurrentTerm and isinstance(seq, int):
                term, best = self._acked.get(node, (None, 0))
                if term != message["term"] or best < seq:
                    self._acked[node] = (message["term"], seq)
                self._confirm()
        elif kind == INDEX_REQUEST:
            rid = message.get("id")
            answer = lambda index, node=node, rid=rid: self._answer(node, rid, index)
            if raft._isLeader():
                self._start_round([answer], time.monotonic())
            else:
                answer(None)
        elif kind == INDEX_REPLY:
            asked = self._asked.pop(message.get("id"), None)
            if asked is not None:
                index = message.get("index")
                for read in asked[0]:
                    if isinstance(index, int):
                        self._when_applied(index, read)
                    else:
                        read(False)

    def fail_all(self) -> None:
        """The replica is closing: nothing waits forever."""
        self._fail_rounds()
        asked, self._asked = self._asked, {}
        for reads, _ in asked.values():
            for read in reads:
                read(False)
        waiters, self._applied_waiters = self._applied_waiters, []
        for _, read in waiters:
            read(False)
        while self._incoming:
            self._incoming.popleft()(False)

    # -- rounds -----------------------------------------------------------------------------

    def _serve_local(self, reads: list[Callback], now: float) -> None:
        raft = self._raft
        if raft._isLeader():
            self._start_round([lambda index, read=read: self._take(index, read) for read in reads], now)
            return
        leader = raft._getLeader()
        if leader is None:
            for read in reads:
                read(False)
            return
        rid = next(self._ids)                   # one request for every read that arrived this tick
        self._asked[rid] = (reads, now)
        self._send(leader, {"type": INDEX_REQUEST, "id": rid})

    def _take(self, index: int | None, read: Callback) -> None:
        if index is None:
            read(False)
        else:
            self._when_applied(index, read)

    def _start_round(self, takers: list[IndexConsumer], now: float) -> None:
        raft = self._raft
        if raft.raftCommitIndex < (raft._SyncObj__noopIDx or 0):
            # This leader has not committed an entry of its own term yet: the commit index it knows may
            # lag the cluster's. Not now; the reader retries (a new leader commits its no-op at once).
            self._hand_out(takers, None)
            return
        round_ = _Round(next(self._seq), raft.raftCurrentTerm, raft.raftCommitIndex, takers, now)
        self._rounds.append(round_)
        probe = {"type": PROBE, "term": round_.term, "seq": round_.seq}
        for node in raft._SyncObj__otherNodes:
            self._send(node, probe)
        self._confirm()

    def _confirm(self) -> None:
        """Confirm every round that a majority (this leader included) has acknowledged, or a later one."""
        if not self._rounds:
            return
        raft = self._raft
        others = raft.counted_members()            # not a member still joining (kvs.raft.joiner)
        needed = (len(others) + 1) // 2            # acks needed from others, beside the leader's own
        if needed == 0:
            confirmed = self._rounds[-1].seq
        else:
            term = raft.raftCurrentTerm
            acked = sorted((seq for node, (t, seq) in self._acked.items() if t == term and node in others),
                           reverse=True)
            if len(acked) < needed:
                return
            confirmed = acked[needed - 1]
        while self._rounds and self._rounds[0].seq <= confirmed:
            round_ = self._rounds.pop(0)
            self._hand_out(round_.takers, round_.index)

    def _fail_rounds(self) -> None:
        rounds, self._rounds = self._rounds, []
        self._acked.clear()
        for round_ in rounds:
            self._hand_out(round_.takers, None)

    @staticmethod
    def _hand_out(takers: list[IndexConsumer], index: int | None) -> None:
        for take in takers:
            take(index)

    def _answer(self, node: Any, rid: Any, index: int | None) -> None:
        if index is not None:
            # the follower waits to apply `index`: a commit index the leader held back leaves first
            # (on the same connection, so it arrives before the answer)
            self._raft.send_held_commit()
        self._send(node, {"type": INDEX_REPLY, "id": rid, "index": index})

    def _send(self, node: Any, message: dict) -> None:
        self._raft._SyncObj__transport.send(node, message)

    # -- applied index ----------------------------------------------------------------------

    def _when_applied(self, index: int, read: Callback) -> None:
        if self._raft.raftLastApplied >= index:
            read(True)
        else:
            self._applied_waiters.append((index, read))

    def _release_applied(self) -> None:
        if not self._applied_waiters:
            return
        applied = self._raft.raftLastApplied
        if all(index > applied for index, _ in self._applied_waiters):
            return
        ready = [read for index, read in self._applied_waiters if index <= applied]
        self._applied_waiters = [(i, read) for i, read in self._applied_waiters if i > applied]
        for read in ready:
            read(True)
