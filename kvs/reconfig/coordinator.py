"""ViewChange: the coordinator of a two-phase configuration change.

The node that receives `PUT /kvs/view-change` (or add-member, remove-member,
reshard) plans epoch N+1 (`kvs.reconfig.planner`) and drives it, recording
each phase in the metadata group (`kvs.fsm.meta`):

1. prepare: commit the plan as pending; every node of both views learns it and
   starts the replicas of the new groups it belongs to, and of the kept groups
   it joins; kept shards' leaders move their Raft members to the plan's
   replicas (`kvs.reconfig.shard_membership`) and the coordinator waits until
   they have, new members caught up.
2. copy: every moving range is exported from its source group (after a read
   index) and installed into its destination through the destination's own
   log, with its slice of the deduplication table, while the source serves
   (`kvs.reconfig.copy`).
3. catch up, freeze, catch up: sources number every write of a moving key
   from the start of the copy (`Track`); a few rounds copy only the keys
   written since the previous copy while the sources serve; then sources stop
   serving only the moving keys (`NotOwned`) and one last round copies what
   was written since, so destinations hold exactly what the sources held at
   freeze time. Clients of moving keys wait only for this last, small round.
4. commit: epoch N+1 becomes active; every node learns it; routers that still
   route by N meet a frozen source, wait for N+1 and route again.
5. clean up: kept groups take the new ownership, sources drop the keys they
   gave away, retired groups stop, and the change is finished.

A failure before commit rolls back: kept shards' members go back first
("unwinding", the plan's replicas still running), sources thaw, the pending
epoch is aborted, nodes forget it. Every step is idempotent (commands are keyed by the
epoch number), so steps may be retried. A change runs as a background job of
the node (`submit`): the HTTP request that asked for it only waits for it.
A coordinator that dies mid-change is replaced by `kvs.reconfig.takeover`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Callable, Protocol, TypeVar, runtime_checkable

from kvs.config.epoch import ConfigEpoch
from kvs.errors import BadRequest, Conflict, KvsError, Unavailable
from kvs.fsm.base import Invalid
from kvs.fsm.batch import key_order
from kvs.fsm.commands import Drop, DropKeys, Freeze, Own, Thaw, Track
from kvs.reconfig import settle
from kvs.reconfig.copy import RangeCopy
from kvs.fsm.meta import UNWINDING
from kvs.reconfig.planner import Plan, plan_add_member, plan_remove_member, plan_view_change
from kvs.reconfig.protocol import Epochs
from kvs.reconfig.remote import STEP_SECONDS, Remote
from kvs.settings import NodeSettings, normalize_address, parse_view

log = logging.getLogger(__name__)

DROP_KEYS = 2000          # keys per drop-keys command after the commit
CATCH_UP_ROUNDS = 3       # at most this many catch-up copies while the sources still serve
FREEZE_BELOW_KEYS = 500   # freeze once a catch-up round moved fewer keys than this
JOB_JOIN_SECONDS = 10.0   # a running change is given this long to end when the node stops
BUSY_WAIT_SECONDS = 10.0  # a new change waits this long for the node's previous one to let go

T = TypeVar("T")


@runtime_checkable
class CoordinatedNode(Protocol):
    """What the coordinator needs of its node (`kvs.node.Node` implements it; tests use fakes)."""

    settings: NodeSettings

    @property
    def epoch(self) -> ConfigEpoch | None: ...

    def change(self) -> dict | None: ...

    def meta_epoch(self, number: int) -> ConfigEpoch | None: ...

    def shard_id_floor(self) -> int: ...

    def propose_meta(self, command: tuple, deadline: float) -> object: ...

    def decisions(self) -> tuple[int, dict | None, dict | None] | None: ...


@dataclass
class Progress:
    epoch: int = 0
    phase: str = "idle"
    moves_total: int = 0
    moves_done: int = 0
    keys_moved: int = 0
    keys_total: int = 0        # keys in the bulk copies read so far: the total once moves-done = moves-total
    members_total: int = 0     # kept shards whose replicas change in place
    members_done: int = 0
    error: str | None = None

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "phase": self.phase, "moves-total": self.moves_total,
                "moves-done": self.moves_done, "keys-moved": self.keys_moved,
                "keys-total": self.keys_total, "member-changes-total": self.members_total,
                "member-changes-done": self.members_done, "error": self.error}


class ViewChange:
    def __init__(self, node: CoordinatedNode, remote: Remote):
        self._node = node
        self._remote = remote
        self._busy = threading.Lock()
        self._stopping = threading.Event()      # no new change starts once the node stops
        self.progress = Progress()
        self._copy = RangeCopy(remote, self.progress)
        self._jobs_lock = threading.Lock()
        self._jobs: list[threading.Thread] = []

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, job: Callable[[], T]) -> T:
        """Run `job` on a background thread of the node and wait for its outcome. The job goes on if
        the caller (an HTTP request thread) gives up; `stop` waits for it, bounded."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(job())
            except BaseException as exc:        # handed to the waiting caller, which raises it
                future.set_exception(exc)
            finally:
                with self._jobs_lock:
                    self._jobs.remove(threading.current_thread())

        thread = threading.Thread(target=run, name="kvs-view-change-job", daemon=True)
        with self._jobs_lock:
            self._jobs.append(thread)
        thread.start()
        return future.result()

    def stop(self) -> None:
        self._stopping.set()
        with self._jobs_lock:
            jobs = list(self._jobs)
        for thread in jobs:
            thread.join(JOB_JOIN_SECONDS)
            if thread.is_alive():
                log.warning("a view change was still running when the node stopped; "
                            "another metadata member takes it over")

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    # -- the requests --------------------------------------------------------------------------

    def run(self, view_text: object, repl_factor: object) -> list[dict]:
        """Change the view; returns the new shards with key counts. Blocks until done."""
        if not isinstance(view_text, str) or not parse_view(view_text):
            raise BadRequest("view must be a non-empty comma-separated list of addresses")
        if repl_factor is not None and (not isinstance(repl_factor, int) or isinstance(repl_factor, bool)):
            raise BadRequest("repl-factor must be an integer")
        current = self._settled_epoch()
        return self._carry_out(plan_view_change(current, parse_view(view_text), repl_factor), current)

    def reshard(self, shard_count: object) -> list[dict]:
        """Reshard: the same nodes in `shard_count` shards (the replication factor follows)."""
        current = self._node.epoch
        if current is None:
            raise Conflict("no configuration yet")
        if not isinstance(shard_count, int) or isinstance(shard_count, bool) or shard_count < 1:
            raise BadRequest("shard-count must be a positive integer")
        if len(current.view) % shard_count:
            raise BadRequest(f"{len(current.view)} nodes cannot form {shard_count} shards of equal size")
        return self.run(",".join(current.view), len(current.view) // shard_count)

    def add_member(self, address: object, shard_id: object) -> list[dict]:
        """An idle node joins shard `shard_id`'s Raft group (in place: no key moves)."""
        address = _address_field(address)
        if isinstance(shard_id, int) and not isinstance(shard_id, bool):
            shard_id = str(shard_id)            # shard ids are strings; a JSON number is clear enough
        if not isinstance(shard_id, str) or not shard_id:
            raise BadRequest('shard-id must be the id of a shard, such as "1"')
        current = self._settled_epoch()
        plan = plan_add_member(current, address, shard_id)
        settle.check_idle(self._remote, address)
        return self._carry_out(plan, current)

    def remove_member(self, address: object) -> list[dict]:
        """A node leaves the view; its shard's group shrinks by one in place, or the shard is retired if
        the node was its only replica. The node may be down (taking a dead replica out is what this is for)."""
        current = self._settled_epoch()
        return self._carry_out(plan_remove_member(current, _address_field(address)), current)

    def _settled_epoch(self) -> ConfigEpoch:
        """The active epoch, when no change is running (Conflict otherwise)."""
        current = self._node.epoch
        if current is None or self._node.change() is not None:
            raise Conflict("a view change is in progress" if current else "no configuration yet")
        # Plan new groups after every id any plan used, a rolled-back one's too (the metadata group
        # refuses a plan that reuses one).
        floor = self._node.shard_id_floor()
        return replace(current, max_shard_id=floor) if floor > current.max_shard_id else current

    # -- the change ----------------------------------------------------------------------------

    def _carry_out(self, plan: Plan, current: ConfigEpoch) -> list[dict]:
        """Prepare, copy, commit and clean up `plan` (or roll it back); the new shards with key counts.
        A plan that changes nothing (the current layout, sent again) is no change: no new epoch."""
        if not plan.moves and not plan.new_groups and not plan.retired_groups and not plan.members \
                and plan.epoch.shards == current.shards and plan.epoch.view == current.view:
            return settle.shard_report(self._remote, current)
        settle.check_reachable(self._remote, plan.epoch, current)
        self._acquire(current)
        try:
            self._change(plan, current)
        finally:
            self._copy.copied_keys.clear()
            self._busy.release()
        # Outside the lock: the change is over once it is done, and counting every shard's keys
        # can wait on slow replicas; a next change must not be refused meanwhile.
        return settle.shard_report(self._remote, plan.epoch)

    def _acquire(self, current: ConfigEpoch) -> None:
        """Hold the node's one change, planned on `current`. A change that settled in the metadata
        group can still hold the node briefly (a take-over's claim of a change that just ended, the
        last pushes of an epoch), and status shows it idle meanwhile: wait for it, bounded, rather
        than refuse a change the client was just told it may send."""
        deadline = time.monotonic() + BUSY_WAIT_SECONDS
        while not self._busy.acquire(timeout=0.1):
            if self._stopping.is_set():
                raise Unavailable("the node is stopping")
            if time.monotonic() >= deadline:
                raise Conflict("a view change is in progress on this node")
        try:
            if self._stopping.is_set():
                raise Unavailable("the node is stopping")
            latest = self._node.epoch
            if latest is None or latest.number != current.number or self._node.change() is not None:
                raise Conflict("the configuration changed while this change waited; plan it again")
        except BaseException:
            self._busy.release()
            raise

    def _change(self, plan: Plan, current: ConfigEpoch) -> None:
        self._start(plan.epoch.number, "preparing", len(plan.moves), len(plan.members))
        result = self._meta(("prepare", plan.to_dict(), self._node.settings.address))
        if isinstance(result, Invalid):
            self.progress.phase, self.progress.error = "refused", result.reason
            raise Conflict(result.reason)
        try:
            self._prepare_and_copy(plan, current)
        except Exception as exc:
            self.progress.error = str(exc)
            self.roll_back(plan, current)
            raise
        self._commit(plan)
        try:
            self.clean_up(plan, current)
        except KvsError as exc:
            # Committed: nothing rolls back now. The metadata group still records the change, so a
            # watcher takes it over and finishes the clean-up; the client learns it is committed.
            self.progress.phase, self.progress.error = "clean-up failed", exc.message
            raise Unavailable(f"epoch {plan.epoch.number} is committed, but its clean-up failed "
                              f"({exc.message}); another node finishes it") from exc
        self.progress.phase = "done"

    def take_over(self, change: dict) -> None:
        """Finish (committed) or roll back (not committed) a change whose coordinator is gone."""
        if not self._busy.acquire(blocking=False):
            return
        try:
            n, me = change["number"], self._node.settings.address
            # Busy from here on, and the status says so: the claim is a metadata round trip.
            before, self.progress.phase = self.progress.phase, "taking over"
            if self._meta(("claim", n, change["coordinator"], change["steps"], me)) is not True:
                self.progress.phase = before        # the change ended, or another node has it
                return
            log.warning("%s takes over the view change to epoch %d (phase %s) from %s",
                        me, n, change["phase"], change["coordinator"])
            plan = Plan.from_dict(change["plan"])
            self._start(n, change["phase"], len(plan.moves), len(plan.members))
            if change["phase"] == "committed":
                self.clean_up(plan, self._node.meta_epoch(n - 1) or plan.epoch)
                self.progress.phase = "done"
            else:
                self.roll_back(plan, self._node.epoch)
        finally:
            self._busy.release()

    def _start(self, number: int, phase: str, moves: int, members: int = 0) -> None:
        self._copy.copied_keys.clear()
        fresh = Progress(epoch=number, phase=phase, moves_total=moves, members_total=members)
        for name, value in vars(fresh).items():     # in place: the copier counts into the same object
            setattr(self.progress, name, value)

    def _prepare_and_copy(self, plan: Plan, current: ConfigEpoch) -> None:
        n = plan.epoch.number
        self._push_decisions(current, plan)
        for shard_id in plan.new_groups:
            settle.wait_for_leader(self._remote, plan.epoch, shard_id)
        # Kept shards whose replicas change: their leaders move the Raft members (kvs.reconfig.shard_membership)
        if plan.members:
            self.progress.phase = "changing members"
        for change in plan.members:
            settle.wait_for_members(self._remote, self._node.settings, plan.epoch, change)
            self.progress.members_done += 1
        self._advance(n, "copying")
        current = _members_moved(current, plan)     # sources are reached at their replicas of now
        new_ring = plan.epoch.ring.to_dict()
        sources = sorted({m.source for m in plan.moves})
        for source in sources:
            self._remote.command(current, source, Track(n, new_ring))
        copied = []                             # per move: the change number its copy was read at
        for move in plan.moves:
            copied.append(self._copy.copy(move, plan, current, since=None))
            self.progress.moves_done += 1
        # Catch up while the sources still serve, so the final catch-up (the write pause of the
        # moving keys) has only the writes of one short round to move.
        for _ in range(CATCH_UP_ROUNDS):
            before = self.progress.keys_moved
            copied = [self._copy.copy(move, plan, current, since) for move, since in zip(plan.moves, copied)]
            if self.progress.keys_moved - before < FREEZE_BELOW_KEYS:
                break
        self._advance(n, "frozen")
        for source in sources:
            self._remote.command(current, source, Freeze(n, new_ring))
        for move, since in zip(plan.moves, copied):
            self._copy.copy(move, plan, current, since)
        self._advance(n, "caught-up")

    def _commit(self, plan: Plan) -> None:
        n = plan.epoch.number
        self.progress.phase = "committing"
        result = self._meta(("commit", n))
        if isinstance(result, Invalid):
            raise Unavailable(f"commit of epoch {n} refused: {result.reason}")

    def clean_up(self, plan: Plan, current: ConfigEpoch) -> None:
        n = plan.epoch.number
        self.progress.phase = "cleaning up"
        self._push_decisions(current, plan)
        new_ring = plan.epoch.ring.to_dict()
        kept = [sid for sid in plan.epoch.shards if sid in current.shards]
        # With the ring unchanged (replicas changed in place, or nothing) every kept group owns what
        # it owned: no command enters its log, so a shard the change did not touch does no work.
        for shard_id in kept if plan.moves or plan.epoch.ring != current.ring else ():
            self._remote.command(plan.epoch, shard_id, Own(n, shard_id, new_ring))
        for shard_id in sorted({m.source for m in plan.moves} & set(kept)):
            copied = self._copy.copied_keys.get((n, shard_id))
            if copied is None:
                # taken over from another coordinator: which keys moved is not known here, so scan
                self._remote.command(plan.epoch, shard_id, Drop(n))
                continue
            # Every key that moved was in one of this coordinator's copies (moving keys cannot be
            # written after the freeze), so drop exactly those, in slices the tick thread applies
            # quickly, instead of one entry that scans the whole shard while clients wait.
            keys = sorted(copied, key=key_order)
            for start in range(0, len(keys), DROP_KEYS):
                self._remote.command(plan.epoch, shard_id, DropKeys(n, keys[start:start + DROP_KEYS]))
        self._meta(("finish", n))
        settle.wait_for_epoch(self._remote, plan.epoch)
        settle.wait_for_metadata_members(self._remote, self._node.settings, plan.epoch)

    def roll_back(self, plan: Plan, current: ConfigEpoch) -> None:
        n = plan.epoch.number
        log.warning("view change to epoch %d failed; rolling back: %s", n, self.progress.error)
        self.progress.phase = "rolling back"
        if plan.members:
            # The plan's replicas keep running until kept shards' leaders have taken them out of their
            # members (the abort closes them: they must not count toward a quorum then). Not out in
            # time: Unavailable, the change stays "unwinding", and a takeover tries again later.
            result = self._meta(("advance", n, UNWINDING, self._node.settings.address))
            if isinstance(result, Invalid):
                raise Unavailable(f"cannot roll back epoch {n}: {result.reason}")
            self._push_decisions(current, plan)
            for change in plan.members:
                settle.wait_for_departure(self._remote, self._node.settings, plan.epoch, current, change)
        for source in sorted({m.source for m in plan.moves}):
            try:
                self._remote.command(current, source, Thaw(n))
            except KvsError as exc:
                log.error("could not thaw shard %s: %s", source, exc.message)
        # kept destinations may hold part of a copy: keys they do not own at the current epoch (a group
        # whose ring did not change since an earlier epoch still owns at that one: Own first)
        for destination in sorted({m.destination for m in plan.moves} & set(current.shards)):
            try:
                self._remote.command(current, destination, Own(current.number, destination, current.ring.to_dict()))
                self._remote.command(current, destination, Drop(current.number))
            except KvsError as exc:
                log.error("could not clean shard %s: %s", destination, exc.message)
        self._meta(("abort", n))
        self._push_decisions(current, plan)
        self.progress.phase = "rolled back"

    def _advance(self, number: int, phase: str) -> None:
        self.progress.phase = phase
        result = self._meta(("advance", number, phase, self._node.settings.address))
        if isinstance(result, Invalid):
            raise Unavailable(f"cannot record phase {phase}: {result.reason}")

    def _push_decisions(self, current: ConfigEpoch, plan: Plan) -> None:
        """Tell every node of both views what the metadata group has decided, as this node's replica of
        it knows right after our last step (it applied that step before `_meta` returned): the epochs
        together with their revision, so that a node keeps only the newest news, whatever the order in
        which pushes and pulls reach it."""
        decisions = self._node.decisions()
        if decisions is None or decisions[1] is None:
            # it left the metadata group meanwhile: nodes outside the group pull from a member instead
            log.warning("no metadata replica here to push epochs from; nodes learn them by pulling")
            return
        revision, active, pending = decisions
        joining = frozenset(plan.epoch.view) - frozenset(current.view)
        self._remote.push_epochs(_all_nodes(current, plan.epoch), Epochs(active, pending, revision), joining)

    def _meta(self, command: tuple) -> object:
        return self._node.propose_meta(command, time.monotonic() + STEP_SECONDS)


def _members_moved(current: ConfigEpoch, plan: Plan) -> ConfigEpoch:
    """`current` with each kept shard's replicas as the plan has them: once members have moved (before
    any copy), a source's commands and exports go to its replicas of now, not to removed ones."""
    shards = {sid: plan.epoch.shards.get(sid, replicas) for sid, replicas in current.shards.items()}
    slots = {sid: plan.epoch.slots.get(sid, s) for sid, s in current.slots.items()}
    return replace(current, shards=shards, slots=slots, _shard_by_node={})


def _address_field(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("address must be a 'host:port' string")
    return normalize_address(value)


def _all_nodes(*epochs: ConfigEpoch) -> list[str]:
    seen: dict[str, None] = {}
    for epoch in epochs:
        for address in epoch.view:
            seen[address] = None
    return list(seen)
