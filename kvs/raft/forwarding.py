"""Forwarded writes: a follower's proposals go to its leader on the Raft connection, and their results
come back on it.

A write that reaches a follower must be proposed by the leader. Over HTTP (the `/internal/writes`
channel this replaced) that cost, at one client, about half a millisecond of a two-millisecond write:
the follower built, signed and sent a request and parsed the answer; the leader parsed and verified
it, handed the batch from its event loop to its tick thread, and the results back. PySyncObj's own
hand-over (a follower's `_applyCommand`) sends each command alone and answers only with the entry's
index; the follower then waits to apply that index itself, which needs the leader's next commit
notice. Here:

1. The follower's event loop hands the commands that arrived during one iteration to the tick thread
   (`Forwarding.request`), which sends them to the leader it follows as one message,
   `{"type": "kvs_forward", "id", "commands"}`, on the connection PySyncObj already keeps to it
   (authenticated and encrypted with the cluster secret, `kvs.raft.wire`).
2. The leader's tick thread proposes them as one `("batch", commands)` entry from the handler, so
   the tick that follows the handlers appends and sends it: no event loop, no thread hand-off and
   no wake-up on the leader (`Replica.submit(from_handler=True)`).
3. When the entry is applied, the leader answers `{"type": "kvs_forward_result", "id", "results"}`,
   one state-machine result per command, on the same connection. A leader that is not leading, or
   whose proposal failed (leadership lost, entry discarded), answers `results` None.
4. The follower gives the results to the caller. None (no leader known, this replica leads now, no
   connection to the leader, the leader changed or did not answer within FORWARD_SECONDS, or it
   answered None) means "not known to be applied": the caller proposes the same commands itself.
   Their request ids make a write that is applied twice return its first outcome
   (`kvs.fsm.shard`), so no write is lost or doubled.

A leader that lets a forward go unanswered for FORWARD_SECONDS without ever having answered one
(a node of an older version ignores message types it does not know, so a rolling upgrade meets one)
is marked silent: for PROBE_SECONDS its forwards are handed back at once, then one is sent again as
a probe (and the others handed back until it is answered or times out). A leader that has answered
before and then stays silent once (paused, overloaded) loses that standing, so a second silence
marks it too. Without this, each batch waited FORWARD_SECONDS.

On a cluster with a secret a node also says in its connection's handshake that it answers forwards
(`kvs.raft.wire.FORWARDS`). A leader that said so is forgiven its first silence even if it never
answered: it is paused or busy (a new leader catching up), not of a version that ignores forwards,
which the timing rule alone took it for. A second silence in a row still marks it, so a leader that
stays slow costs its followers two 2 s waits and then PySyncObj's hand-over, not 2 s and a
duplicate proposal per batch. What the leader said is read when the forward is sent: a connection
that drops meanwhile forgets it. Without a secret there is no handshake, and the timing rule decides.

Everything but `request` runs on the replica's tick thread (or on the loop that ticks it). Messages
come only from peers that hold the cluster secret, and are still checked for shape: a malformed one
is answered None and proposes nothing.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Any, Callable

from pysyncobj.config import FAIL_REASON

log = logging.getLogger(__name__)

Callback = Callable[["list | None"], None]      # the results, one per command, or None: not taken

FORWARD = "kvs_forward"
RESULT = "kvs_forward_result"
MESSAGE_TYPES = frozenset((FORWARD, RESULT))

FORWARD_SECONDS = 2.0       # a forward unanswered by then is handed back (its commands may be retried)
PROBE_SECONDS = 10.0        # how long a silent leader's forwards are handed back before it is asked again
MAX_COMMANDS = 512          # per message, as `kvs.raft.loop` batches them


class _Asked:
    __slots__ = ("leader", "callback", "sent", "announced")

    def __init__(self, leader: Any, callback: Callback, sent: float, announced: bool):
        self.leader, self.callback, self.sent = leader, callback, sent
        self.announced = announced          # the leader said it answers forwards (module docstring)


class Forwarding:
    """Forwarded writes of one replica. `raft` is the Replica (a SyncObj subclass)."""

    def __init__(self, raft: Any):
        self._raft = raft
        self._incoming: deque[tuple[list, Callback]] = deque()  # from any thread, taken by the tick thread
        self._ids = itertools.count(1)
        self._asked: dict[int, _Asked] = {}         # follower: message id -> who was asked, and the caller
        self._answered: set = set()                 # leaders that have answered a forward
        self._forgiven: set = set()                 # leaders forgiven a silence since they last answered
        self._silent: dict[Any, float] = {}         # leader -> until when its forwards are handed back at once

    # -- any thread -------------------------------------------------------------------------

    def request(self, commands: list, callback: Callback) -> None:
        """Have the leader propose `commands`; `callback` runs on the tick thread (module docstring)."""
        self._incoming.append((commands, callback))

    # -- tick thread ------------------------------------------------------------------------

    def on_tick(self) -> None:
        """Hand back what the leader will not answer; send what arrived to the leader."""
        raft = self._raft
        leader = None if raft._isLeader() else raft._getLeader()
        now = time.monotonic()
        if self._asked:
            silent_announced = None     # the leader left a forward unanswered: had it announced forwards?
            handed_back = []
            for rid, asked in list(self._asked.items()):
                if asked.leader != leader or now - asked.sent > FORWARD_SECONDS:
                    del self._asked[rid]
                    if asked.leader == leader:
                        silent_announced = bool(silent_announced) or asked.announced
                    handed_back.append(asked.callback)
            if silent_announced is not None:
                self._stayed_silent(leader, now, silent_announced)
            for callback in handed_back:        # after the leader's standing is updated: a caller may go on at once
                callback(None)
        while self._incoming:
            commands, callback = self._incoming.popleft()
            if leader is None or self._silent.get(leader, now) > now:
                callback(None)          # leading now, no leader known, or it does not answer: the caller proposes
                continue
            if leader in self._silent:
                # a probe: the forwards after it are handed back until it is answered or times out
                self._silent[leader] = now + FORWARD_SECONDS + 1
            rid = next(self._ids)
            announced = raft._SyncObj__transport.answers_forwards(leader)
            self._asked[rid] = _Asked(leader, callback, now, announced)
            if not self._send(leader, {"type": FORWARD, "id": rid, "commands": commands}):
                del self._asked[rid]
                callback(None)          # not connected to the leader (it is down, or not reached yet)

    def on_message(self, node: Any, message: dict) -> None:
        """A message of MESSAGE_TYPES from `node`."""
        rid = message.get("id")
        if message.get("type") == RESULT:
            asked = self._asked.get(rid)
            if asked is not None and asked.leader == node:
                del self._asked[rid]
                self._answered.add(node)
                self._forgiven.discard(node)
                self._silent.pop(node, None)
                results = message.get("results")
                asked.callback(results if isinstance(results, list) else None)
            return
        commands = message.get("commands")
        if not (type(rid) is int and isinstance(commands, list) and 0 < len(commands) <= MAX_COMMANDS
                and all(type(c) is tuple for c in commands) and self._raft._isLeader()):
            self._send(node, {"type": RESULT, "id": rid, "results": None})
            return
        self._raft.submit(("batch", commands),
                          lambda result, error: self._answer(node, rid, len(commands), result, error),
                          from_handler=True)

    def fail_all(self) -> None:
        """The replica is closing: every caller gets None now."""
        asked, self._asked = self._asked, {}
        for entry in asked.values():
            entry.callback(None)
        while self._incoming:
            self._incoming.popleft()[1](None)

    def _stayed_silent(self, node: Any, now: float, announced: bool) -> None:
        """`node`, still the leader, let a forward go unanswered for FORWARD_SECONDS (module docstring)."""
        if (node in self._answered or announced) and node not in self._forgiven:
            self._forgiven.add(node)    # it answered before, or said it answers: paused or busy, this once
            return
        if node not in self._silent:
            why = ("left forwarded writes unanswered twice in a row" if announced
                   else "does not answer forwarded writes (an older version?)")
            log.warning("leader %s %s; for %.0f s this replica proposes them itself", node, why, PROBE_SECONDS)
        self._silent[node] = now + PROBE_SECONDS

    # -- leader -----------------------------------------------------------------------------

    def _answer(self, node: Any, rid: int, count: int, result: Any, error: int) -> None:
        ok = error == FAIL_REASON.SUCCESS and isinstance(result, list) and len(result) == count
        if ok:
            # Nobody here waits for this commit index: it rides on the next AppendEntries (kvs.raft.replication).
            self._raft.hold_commit_send()
        self._send(node, {"type": RESULT, "id": rid, "results": result if ok else None})

    def _send(self, node: Any, message: dict) -> bool:
        """False if the message could not be queued on a connection to `node`."""
        return self._raft._SyncObj__transport.send(node, message) is not False
