"""RaftGroup: this node's replica of one group, as the rest of kvs sees it.

It turns PySyncObj's callbacks and failure codes into two blocking calls with a
deadline, `execute(command)` and `read(fn)`, and the kvs exception tree:

* Failure codes are translated here and nowhere else. QUEUE_FULL,
  MISSING_LEADER, NOT_LEADER and DISCARDED mean "not applied"; LEADER_CHANGED,
  UNKNOWN_OUTCOME and a timeout mean "maybe applied". Both are retried with
  the *same* command until the deadline: every write carries its request id,
  so the state machine's deduplication makes a retry of an applied write
  return the first outcome. When the deadline passes, `Unavailable`.
* PySyncObj has no linearizable local read (a deposed leader serves stale data
  for `leaderFallbackTimeout`). `read` asks for a read index
  (`kvs.raft.read_index`: the leader confirms with a majority that it still
  leads, shared by every read that arrived meanwhile; a follower asks the
  leader) and runs `fn` on the local state once that index is applied here:
  no log entry per read, and followers serve reads too.
* A replica whose journal failed (a full disk, EIO) has halted: `failure`
  says why and since when, `status()` says "failed", and it is never the
  leader (`kvs.raft.replica`, "Disk faults"); its node closes it and reopens
  it from disk later (`kvs.raft.recovery`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pysyncobj import SyncObjConf
from pysyncobj.config import FAIL_REASON

from kvs.metrics import PROPOSALS_FAILED
from kvs.errors import Unavailable
from kvs.raft import storage
from kvs.raft.journal import JournalFailure, set_fsync
from kvs.raft.loop_poller import LoopPoller, install as install_loop_poller
from kvs.raft.loop_replica import LoopReplica
from kvs.raft.resolver import install as install_resolver
from kvs.raft.replica import Replica

log = logging.getLogger(__name__)

storage.install()
install_loop_poller()

_ROLES = {0: "follower", 1: "candidate", 2: "leader"}
_RETRY_BACKOFF = (0.005, 0.2)    # first and largest pause between retries, seconds


@dataclass(frozen=True)
class RaftTiming:
    """Raft timers (seconds). Commits do not wait for them (see `Replica`)."""

    tick: float = 0.02                 # longest poll; bounds timer accuracy
    heartbeat: float = 0.05
    election_min: float = 0.5
    election_max: float = 1.0
    leader_fallback: float = 1.5       # a leader cut off from a majority steps down after this
    connection_retry: float = 0.25
    connection_timeout: float = 3.5
    compaction_entries: int = 20_000
    compaction_seconds: float = 300.0
    fsync: bool = True                 # fsync the journal before acknowledging (KVS_FSYNC; see kvs.raft.journal)


class _Pending:
    """The outcome of one proposal, filled in by the tick thread."""

    __slots__ = ("event", "result", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: Any = None
        self.error: int | None = None

    def resolve(self, result: Any, error: int) -> None:
        self.result, self.error = result, error
        self.event.set()


class RaftGroup:
    """This node's replica of one Raft group (a shard group or the metadata group)."""

    def __init__(self, name: str, self_address: str, peers: list[str], state: Any, directory: str,
                 secret: str | None, timing: RaftTiming = RaftTiming(),
                 on_applied: Callable[[], None] | None = None, bind_host: str | None = None,
                 learner: bool = False, also_connect: tuple[str, ...] = (), hold_election: bool = False,
                 loop: Any = None):
        self.name = name
        self.self_address = self_address
        self.state = state
        self._directory = directory
        os.makedirs(directory, exist_ok=True)
        journal_path, snapshot_path = storage.group_files(directory)
        set_fsync(journal_path, timing.fsync)      # read by the journal PySyncObj opens below
        # Snapshots are written off the tick thread (see kvs.raft.storage). A state machine whose
        # snapshot() returns objects that apply never mutates afterwards (`detached_snapshot`, the shard
        # state) is pickled by the worker; any other (the metadata group's, small) on the tick thread.
        codec = self._codec = storage.SnapshotCodec(state, snapshot_path,
                                                  detached=getattr(state, "detached_snapshot", False))
        port = self_address.rsplit(":", 1)[1]
        conf = SyncObjConf(
            # PySyncObj binds 0.0.0.0 by default; bind where the node's HTTP server listens instead.
            bindAddress=f"{bind_host}:{port}" if bind_host else None,
            password=secret,
            autoTickPeriod=timing.tick,
            appendEntriesPeriod=timing.heartbeat,
            raftMinTimeout=timing.election_min,
            raftMaxTimeout=timing.election_max,
            leaderFallbackTimeout=timing.leader_fallback,
            connectionRetryTime=timing.connection_retry,
            connectionTimeout=timing.connection_timeout,
            dnsCacheTime=2.0,
            dnsFailCacheTime=1.0,
            journalFile=journal_path,
            fullDumpFile=snapshot_path,
            serializer=codec.serialize,
            deserializer=codec.deserialize,
            serializeChecker=codec.check,
            useFork=False,
            logCompactionMinEntries=timing.compaction_entries,
            logCompactionMinTime=timing.compaction_seconds,
            commandsWaitLeader=True,
            dynamicMembershipChange=True,
        )
        # On the event loop (EXPERIMENTAL, kvs.raft.loop_poller): no tick thread; the loop runs it.
        self._poller = LoopPoller(loop, timing.tick) if loop is not None else None
        peers = [p for p in peers if p != self_address]
        if self._poller is not None:
            conf.autoTick = False
            conf.pollerType = self._poller
            # Host names resolve off the loop; the peers' and its own here, on the constructing thread.
            install_resolver().prime(a.rsplit(":", 1)[0] for a in (*peers, *also_connect,
                                                                   conf.bindAddress or self_address))
        # learner: it only receives the log, without a vote, until the configuration names it; it also
        # connects to `also_connect`. hold_election: no campaign before a leader was heard (a promoted
        # learner). See kvs.raft.replica, change 5.
        kind = Replica if self._poller is None else LoopReplica
        self._replica = kind(self_address, peers, state, conf, on_applied, group=name, learner=learner,
                             also_connect=also_connect, hold_election=hold_election)
        self._transfer_wanted = False
        self._replica.addOnTickCallback(self._transfer_on_tick)
        if self._poller is not None:
            self._poller.attach(lambda: self._replica._onTick(0.0), self._replica.run_handlers)

    # -- commands and reads ------------------------------------------------------

    def execute(self, command: tuple, deadline: float) -> Any:
        """Apply `command` through the log and return the state machine's result.

        Raises Unavailable at the deadline; the command may still be applied later.
        """
        self._not_on_loop()
        backoff = _RETRY_BACKOFF[0]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"group {self.name}: no commit before the deadline")
            pending = _Pending()
            self._replica.submit(command, pending.resolve)
            if not pending.event.wait(remaining):
                PROPOSALS_FAILED.labels(self.name).inc()
                raise Unavailable(f"group {self.name}: no commit before the deadline")
            if pending.error == FAIL_REASON.SUCCESS:
                return pending.result
            log.debug("group %s: %r failed with code %s, retrying", self.name, command[0], pending.error)
            # A pause between retries, not a synchronisation: the next try re-checks everything.
            time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, _RETRY_BACKOFF[1])

    def _not_on_loop(self) -> None:
        # A replica that ticks on the loop would wait for itself there: a programming error.
        if self._poller is not None and self._poller.on_loop_thread():
            raise RuntimeError(f"group {self.name}: a blocking call on the event loop that runs it")

    def propose(self, command: tuple, callback: Callable[[Any, int], None]) -> None:
        """Propose without waiting; `callback(result, error)` runs on the tick thread and must not block."""
        self._replica.submit(command, callback)

    def read(self, fn: Callable[[Any], Any], deadline: float) -> Any:
        """Run `fn(state)` once a ReadIndex round says this replica holds every write acknowledged
        before the call (kvs.raft.read_index); retried until the deadline, then Unavailable."""
        self._not_on_loop()
        backoff = _RETRY_BACKOFF[0]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"group {self.name}: no read index before the deadline")
            ready = _Pending()
            self._replica.read_index(lambda ok: ready.resolve(ok, FAIL_REASON.SUCCESS))
            if not ready.event.wait(remaining):
                raise Unavailable(f"group {self.name}: no read index before the deadline")
            if ready.result:
                return fn(self.state)
            # A pause between retries, not a synchronisation: the next try asks again.
            time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, _RETRY_BACKOFF[1])

    def read_index(self, callback: Callable[[bool], None]) -> None:
        """The ReadIndex request itself, for callers that wait their own way (the event loop)."""
        self._replica.read_index(callback)

    def forward(self, commands: list, callback: Callable[[list | None], None]) -> None:
        """A follower's writes, proposed by its leader (kvs.raft.forwarding); `callback(results)` runs on
        the tick thread, with None if the leader did not take them (the caller proposes them itself)."""
        self._replica.forward(commands, callback)

    def hold_commit_send(self) -> None:
        """On the tick thread, from a commit callback: see `Replica.hold_commit_send`."""
        self._replica.hold_commit_send()

    def tick_now(self) -> None:
        """On the event loop, for a group that ticks there: append and send what was just proposed."""
        if self._poller is not None:
            self._poller.tick_now()

    @property
    def on_loop(self) -> bool:
        """Whether this replica ticks on the node's event loop (its callbacks then run there)."""
        return self._poller is not None

    # -- membership (the metadata group follows the view; see kvs.reconfig.membership) ------

    def change_members(self, op: str, raft_address: str, deadline: float, on_appended: Callable[[], None]) -> None:
        """Add ("add") or remove ("remove") one member through the log; returns once committed.

        PySyncObj applies a membership entry when it is appended; a new member counts toward the
        quorum once that entry has committed and it has acknowledged it (`kvs.raft.replica`, change
        6), so its node should start right after the proposal (`on_appended`). The leader refuses a
        second change while one is uncommitted (change 6 too), and a leader cannot remove itself
        (see `transfer_leadership`)."""
        self._not_on_loop()
        pending = _Pending()
        if op == "add":
            self._replica.addNodeToCluster(raft_address, pending.resolve)
        else:
            self._replica.removeNodeFromCluster(raft_address, pending.resolve)
        on_appended()
        if not pending.event.wait(max(0.0, deadline - time.monotonic())):
            raise Unavailable(f"group {self.name}: {op} {raft_address} not committed before the deadline")
        if pending.error != FAIL_REASON.SUCCESS:
            raise Unavailable(f"group {self.name}: {op} {raft_address} refused (code {pending.error})")

    def transfer_leadership(self) -> None:
        """Ask the most caught-up follower to take over (best effort; the caller checks `leader()`). Done
        on the tick thread: PySyncObj's transferLeadership walks the node sets and writes to the
        connections that thread owns."""
        self._transfer_wanted = True
        self._replica._wake()

    def _transfer_on_tick(self) -> None:
        if self._transfer_wanted:
            self._transfer_wanted = False
            self._replica.transferLeadership(None, None)

    def membership_change_pending(self) -> bool:
        """On the leader: a membership change it proposed is not applied yet, so another would be
        refused (`kvs.raft.replica`, change 6). A hint read off the tick thread."""
        pending = self._replica._SyncObj__changeClusterIDx
        return pending is not None and self._replica.raftLastApplied < pending

    def lagging_members(self, slack: int) -> list[str]:
        """On the leader: the members whose log is more than `slack` entries behind its commit index
        (a new member still catching up). A hint read off the tick thread's dicts."""
        commit = self._replica.raftCommitIndex
        match = dict(self._replica._SyncObj__raftMatchIndex)
        members = self._replica.otherNodes          # not its learners (read-only peers, kvs.raft.replica change 5)
        return sorted(node.id for node, index in match.items() if node in members and index < commit - slack)

    def members(self) -> list[str]:
        """Raft addresses of the members as this replica's configuration has them (a learner is none)."""
        others = [n.id for n in self._replica.otherNodes]
        if self._replica.learner:
            return sorted(others)
        return sorted([self.self_address] + others)

    @property
    def learner(self) -> bool:
        """A replica that receives the log without a vote (`kvs.raft.replica`, change 5); it serves nothing."""
        return self._replica.learner

    @property
    def promoted(self) -> bool:
        """A learner that the configuration names: its node reopens it as a voting replica."""
        return self._replica.promoted

    @property
    def commit_index(self) -> int:
        return self._replica.raftCommitIndex

    # -- hints (may be stale; never used for correctness) --------------------------

    def leader(self) -> str | None:
        node = self._replica._getLeader()
        return node.id if node is not None and self.failure is None else None

    def is_leader(self) -> bool:
        return self.failure is None and self._replica._isLeader()    # a halted leader's state is frozen

    @property
    def failure(self) -> JournalFailure | None:
        """Set once this replica's journal failed (a full disk, EIO): it has halted and acknowledges
        nothing more; its node closes it and reopens it from disk (kvs.raft.recovery)."""
        return self._replica.journal_failure

    @property
    def directory(self) -> str:
        return self._directory

    def status(self) -> dict:
        s = self._replica.getStatus()
        failure = self.failure
        if failure is not None:
            return {"role": "failed", "leader": None, "raft-address": self.self_address,
                    "members": self.members(), "failure": failure.describe()}
        return {
            "role": "learner" if self._replica.learner else _ROLES.get(s["state"], str(s["state"])),
            "leader": s["leader"].id if s["leader"] is not None else None,
            "term": s["raft_term"],
            "commit-index": s["commit_idx"],
            "last-applied": s["last_applied"],
            "log-length": s["log_len"],
            "raft-address": self.self_address,
            "members": self.members(),
        }

    def close(self) -> None:
        if self._poller is not None:
            self._poller.detach()               # the loop lets go of it; then it is this thread's
            self._replica.destroy()             # autoTick off: sockets and journal closed at once
            self._poller.close()
        else:
            self._replica.destroy_synchronous()
        self._replica.fail_waiting()
        self._codec.close()         # after the tick thread: no rename can follow this
