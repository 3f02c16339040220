"""ChangePhases: the steps of one two-phase configuration change, as `kvs.reconfig.coordinator` runs them.

Each step is recorded in the metadata group (`kvs.fsm.meta`) before or after it acts:

1. prepare: commit the plan as pending; every node of both views learns it and
   starts the replicas of the new groups it belongs to, and of the kept groups
   it joins; kept shards' leaders move their Raft members to the plan's
   replicas (`kvs.reconfig.shard_membership`) and the coordinator waits until
   they have, new members caught up.
2. copy: every moving range is exported from its source group page by page
   (each page after a read index, 128 KiB) and each page installed into
   its destination through the destination's own log before the next is read,
   with its slice of the deduplication table, while the source serves
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
epoch is aborted, nodes forget it. Every step is idempotent (commands are keyed
by the epoch number), so steps may be retried, by this node or by the one that
takes the change over. Nothing here holds a lock: the coordinator runs one
change at a time per node.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from kvs.config.epoch import ConfigEpoch
from kvs.errors import KvsError, Unavailable
from kvs.fsm.base import Invalid
from kvs.fsm.batch import key_order
from kvs.fsm.commands import Drop, DropKeys, Freeze, Own, Thaw, Track
from kvs.fsm.meta import UNWINDING
from kvs.reconfig import settle
from kvs.reconfig.copy import RangeCopy
from kvs.reconfig.planner import Plan
from kvs.reconfig.protocol import Epochs
from kvs.reconfig.remote import STEP_SECONDS, Remote
from kvs.settings import NodeSettings

log = logging.getLogger(__name__)

DROP_KEYS = 2000          # keys per drop-keys command after the commit
CATCH_UP_ROUNDS = 3       # at most this many catch-up copies while the sources still serve
FREEZE_BELOW_KEYS = 500   # freeze once a catch-up round moved fewer keys than this


@runtime_checkable
class CoordinatedNode(Protocol):
    """What the coordinator needs of its node (`kvs.node.Node` implements it; tests use fakes)."""

    settings: NodeSettings

    @property
    def epoch(self) -> ConfigEpoch | None: ...

    def committed_configuration(self, deadline: float) -> tuple[dict | None, dict | None, int]: ...

    def meta_epoch(self, number: int) -> ConfigEpoch | None: ...

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


class ChangePhases:
    def __init__(self, node: CoordinatedNode, remote: Remote, progress: Progress):
        self._node = node
        self._remote = remote
        self.progress = progress
        self.copy = RangeCopy(remote, progress)

    def start(self, number: int, phase: str, moves: int, members: int = 0) -> None:
        self.copy.copied_keys.clear()
        fresh = Progress(epoch=number, phase=phase, moves_total=moves, members_total=members)
        for name, value in vars(fresh).items():     # in place: the copier counts into the same object
            setattr(self.progress, name, value)

    def prepare_and_copy(self, plan: Plan, current: ConfigEpoch) -> None:
        n = plan.epoch.number
        self.push_decisions(current, plan)
        for shard_id in plan.new_groups:
            settle.wait_for_leader(self._remote, plan.epoch, shard_id)
        # Kept shards whose replicas change: their leaders move the Raft members (kvs.reconfig.shard_membership)
        if plan.members:
            self.progress.phase = "changing members"
        for change in plan.members:
            settle.wait_for_members(self._remote, self._node.settings, plan.epoch, change)
            self.progress.members_done += 1
        self.advance(n, "copying")
        current = _members_moved(current, plan)     # sources are reached at their replicas of now
        new_ring = plan.epoch.ring.to_dict()
        sources = sorted({m.source for m in plan.moves})
        for source in sources:
            self._remote.command(current, source, Track(n, new_ring))
        copied = []                             # per move: the change number its copy was read at
        for move in plan.moves:
            copied.append(self.copy.copy(move, plan, current, since=None))
            self.progress.moves_done += 1
        # Catch up while the sources still serve, so the final catch-up (the write pause of the
        # moving keys) has only the writes of one short round to move.
        for _ in range(CATCH_UP_ROUNDS):
            before = self.progress.keys_moved
            copied = [self.copy.copy(move, plan, current, since) for move, since in zip(plan.moves, copied)]
            if self.progress.keys_moved - before < FREEZE_BELOW_KEYS:
                break
        self.advance(n, "frozen")
        for source in sources:
            self._remote.command(current, source, Freeze(n, new_ring))
        for move, since in zip(plan.moves, copied):
            self.copy.copy(move, plan, current, since)
        self.advance(n, "caught-up")

    def commit(self, plan: Plan) -> None:
        n = plan.epoch.number
        self.progress.phase = "committing"
        result = self.meta(("commit", n))
        if isinstance(result, Invalid):
            raise Unavailable(f"commit of epoch {n} refused: {result.reason}")

    def clean_up(self, plan: Plan, current: ConfigEpoch) -> None:
        n = plan.epoch.number
        self.progress.phase = "cleaning up"
        self.push_decisions(current, plan)
        new_ring = plan.epoch.ring.to_dict()
        kept = [sid for sid in plan.epoch.shards if sid in current.shards]
        # With the ring unchanged (replicas changed in place, or nothing) every kept group owns what
        # it owned: no command enters its log, so a shard the change did not touch does no work.
        for shard_id in kept if plan.moves or plan.epoch.ring != current.ring else ():
            self._remote.command(plan.epoch, shard_id, Own(n, shard_id, new_ring))
        for shard_id in sorted({m.source for m in plan.moves} & set(kept)):
            copied = self.copy.copied_keys.get((n, shard_id))
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
        self.meta(("finish", n))
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
            result = self.meta(("advance", n, UNWINDING, self._node.settings.address))
            if isinstance(result, Invalid):
                raise Unavailable(f"cannot roll back epoch {n}: {result.reason}")
            self.push_decisions(current, plan)
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
        self.meta(("abort", n))
        self.push_decisions(current, plan)
        self.progress.phase = "rolled back"

    def advance(self, number: int, phase: str) -> None:
        self.progress.phase = phase
        result = self.meta(("advance", number, phase, self._node.settings.address))
        if isinstance(result, Invalid):
            raise Unavailable(f"cannot record phase {phase}: {result.reason}")

    def push_decisions(self, current: ConfigEpoch, plan: Plan) -> None:
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

    def meta(self, command: tuple) -> object:
        return self._node.propose_meta(command, time.monotonic() + STEP_SECONDS)


def _members_moved(current: ConfigEpoch, plan: Plan) -> ConfigEpoch:
    """`current` with each kept shard's replicas as the plan has them: once members have moved (before
    any copy), a source's commands and exports go to its replicas of now, not to removed ones."""
    shards = {sid: plan.epoch.shards.get(sid, replicas) for sid, replicas in current.shards.items()}
    slots = {sid: plan.epoch.slots.get(sid, s) for sid, s in current.slots.items()}
    return replace(current, shards=shards, slots=slots, _shard_by_node={})


def _all_nodes(*epochs: ConfigEpoch) -> list[str]:
    seen: dict[str, None] = {}
    for epoch in epochs:
        for address in epoch.view:
            seen[address] = None
    return list(seen)
