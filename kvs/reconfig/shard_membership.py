"""ShardMembership: each shard group's Raft members follow the decided epochs, in place.

A view change that keeps a shard but changes its replicas (add-member,
remove-member, repl-factor up or down on the same shard count, a node moved
or replaced; see `kvs.reconfig.planner`) changes the Raft membership of the
shard's group: no new group, no key moves. Who should be a member is a pure
function of what the metadata group decided:

    the pending epoch's replicas of the shard while a change that has it is in
    progress, else the active epoch's (also while a change is being rolled
    back: its plan is then published with status "unwinding").

The leader of each shard group compares that target with its group's Raft
configuration every PERIOD and takes one step at a time (PySyncObj's rule),
as the metadata group does for its own members (`kvs.reconfig.membership`):

* add first: the new member's node opened a learner when it learned the plan
  (`kvs.raft.replica` change 5: it receives the leader's snapshot and log
  without a vote); once its node reports it within CAUGHT_UP_SLACK entries of
  this leader's commit index, propose the member and wait for the commit. The
  old members alone make the new configuration's quorum meanwhile (one more
  member needs one more acknowledgement, which a caught-up member gives at
  once), so a member still receiving a snapshot never holds up commits; its
  node then reopens the learner as a voter;
* then, once every member that stays has caught up, remove one member that
  is not the leader; a leader that must leave first hands leadership to a
  caught-up follower, which continues.

Adds before removes: the group never has fewer members than either replica
set. The coordinator waits until the members match and the new ones caught up
before it commits the epoch (`settle.wait_for_members`). A rollback first
records "unwinding" (the plan's replicas keep running, the target is the
active epoch's replicas again): leaders take the members the plan added out
first, the coordinator waits for that, and only then aborts the plan, so no
replica that still counts toward a quorum closes. A member the plan removed is
added back when its node can take it (before or after the abort): it may be
the dead replica the change was taking out. The state of the
reconciliation is nothing but the decided epochs and the group's own
configuration: a leader or coordinator that dies midway leaves nothing to
repair. Each node's knowledge of the epochs is a hint that may lag (pushes and
pulls arrive late), so a step is taken only after the target is confirmed by a
linearizable read of the metadata group's decisions.

The directories of replicas a node no longer runs are deleted by
`kvs.reconfig.retired_replicas`, with the same linearizable read.
"""

from __future__ import annotations

import logging
import threading
import time

from kvs.config.epoch import ConfigEpoch
from kvs.errors import KvsError, Unavailable
from kvs.fsm.meta import UNWINDING
from kvs.node import Node
from kvs.reconfig.membership import Step, next_step
from kvs.reconfig.remote import Remote
from kvs.routing.peers import PeerUnreachable

log = logging.getLogger(__name__)

PERIOD = 0.5              # seconds between two comparisons
CAUGHT_UP_SLACK = 64      # a member this close to the leader's commit index has caught up
STEP_SECONDS = 15.0       # one membership change must commit within this
READ_SECONDS = 3.0        # the linearizable read of the decided epochs


class ShardMembership:
    def __init__(self, node: Node, remote: Remote):
        self._node = node
        self._remote = remote

    def run(self, stopping: threading.Event) -> None:
        """The thread body: one round per PERIOD until `stopping` is set."""
        while not stopping.wait(PERIOD):
            try:
                self.step()
            except KvsError as exc:
                log.warning("shard membership: %s", exc.message)

    # -- the target -----------------------------------------------------------------------------

    def target(self, shard_id: str, active: ConfigEpoch | None, pending: ConfigEpoch | None) -> list[str] | None:
        """Raft addresses the group of `shard_id` should have (None: no epoch has the shard). A change
        being rolled back (status "unwinding") has its members go back to the active epoch's."""
        addresses = self._addresses(shard_id, active, pending)
        return None if addresses is None else sorted(addresses)

    def _addresses(self, shard_id: str, active: ConfigEpoch | None,
                   pending: ConfigEpoch | None) -> dict[str, str] | None:
        """The target's members: Raft address -> HTTP address of its node."""
        moving = pending is not None and pending.status != UNWINDING and shard_id in pending.shards
        epoch = pending if moving else active
        if epoch is None or shard_id not in epoch.shards:
            return None
        s = self._node.settings
        return {s.raft_address(a, epoch.slot(shard_id, a)): a for a in epoch.replicas(shard_id)}

    # -- the leader's steps ---------------------------------------------------------------------

    def step(self) -> int:
        """At most one step in every group this node leads whose members differ from the target;
        returns the number of steps taken."""
        hint_active, hint_pending = self._node.epoch, self._node.pending_epoch
        led = {sid: g for sid, g in self._node.shard_groups().items() if g.is_leader()}
        differing = {sid: g for sid, g in led.items()
                     if self.target(sid, hint_active, hint_pending) not in (None, g.members())}
        if not differing:
            return 0
        active, pending = decided_epochs(self._node, self._remote)
        steps = 0
        for sid, group in differing.items():
            target = self._addresses(sid, active, pending)
            joiners = set(target or ()) - set(self._addresses(sid, active, None) or ())
            unwinding = pending is not None and pending.status == UNWINDING and sid in pending.shards
            try:
                steps += target is not None and self._step(sid, group, target, joiners, unwinding)
            except KvsError as exc:             # one stuck group does not hold the others up
                log.warning("shard %s membership: %s", sid, exc.message)
        return steps

    def _step(self, shard_id: str, group, target: dict[str, str], joiners: set[str], unwinding: bool = False) -> bool:
        members, lagging = group.members(), group.lagging_members(CAUGHT_UP_SLACK)
        step = next_step(members, sorted(target), group.self_address, lagging)
        if step is not None and step.op == "add":
            ready = [] if joiners.intersection(lagging) else \
                [m for m in sorted(target) if m not in members and self._ready_to_join(shard_id, group, target[m])]
            # one joining member at a time, each caught up before it counts
            step = Step("add", ready[0]) if ready else None
        if step is None and unwinding:
            step = rollback_removal(members, sorted(target), group.self_address, lagging)
        if step is None:
            return False
        if step.op == "hand over":
            log.info("shard %s: %s must leave the group; handing leadership over", shard_id, group.self_address)
            group.transfer_leadership()
            return True
        log.info("shard %s: %s %s", shard_id, "adding" if step.op == "add" else "removing", step.member)
        group.change_members(step.op, step.member, time.monotonic() + STEP_SECONDS, on_appended=lambda: None)
        return True

    def _ready_to_join(self, shard_id: str, group, address: str) -> bool:
        """Whether the node at `address` runs a learner of the shard's group that has applied up to this
        leader's commit index but CAUGHT_UP_SLACK entries (asked of its node: the leader knows learners
        only as anonymous read-only peers, by connection), or a voting replica outside the configuration
        (one removed and now wanted back, as a rollback does; or promoted on a membership entry that a
        new leader never had): that one receives nothing until it is a member again, and has its log."""
        commit = group.commit_index
        try:
            status = self._remote.status(address, time.monotonic() + READ_SECONDS)
        except PeerUnreachable:
            return False
        replica = status.groups.get(f"shard-{shard_id}")
        if replica is None or replica.role == "failed":
            return False
        return replica.role != "learner" or replica.last_applied >= commit - CAUGHT_UP_SLACK


def rollback_removal(members: list[str], target: list[str], leader: str, lagging: list[str]) -> Step | None:
    """A rollback whose next add cannot be taken (the removed replica it would put back is dead, say)
    takes out a member the plan added instead, so that the abort can follow; the removed replica is
    added back when its node returns. Only while the target's members still in the group are a
    majority of the target, and the group left has a majority that is not catching up: a rollback
    never leaves a shard on fewer replicas than a quorum of the set it goes back to."""
    extra = [m for m in members if m not in target]
    if not extra or 2 * len([m for m in members if m in target]) <= len(target):
        return None
    member = next((m for m in extra if m != leader), None)
    rest = [m for m in members if m != (member or leader)]
    if 2 * len([m for m in rest if m not in lagging]) <= len(rest):
        return None
    return Step("remove", member) if member is not None else Step("hand over")


def decided_epochs(node: Node, remote: Remote) -> tuple[ConfigEpoch | None, ConfigEpoch | None]:
    """(active, pending) as the metadata group has decided them, read linearizably (this node's
    metadata replica's ReadIndex, or a member's); Unavailable if no metadata member can say."""
    deadline = time.monotonic() + READ_SECONDS
    meta = node.metadata_group
    if meta is not None:
        _, active, pending = meta.read(lambda state: state.decisions(), deadline)
    else:
        epoch = node.epoch
        members = epoch.metadata_members if epoch is not None else ()
        known = next((k for k in map(remote.decided_epochs, members) if k is not None), None)
        if known is None:
            raise Unavailable("no metadata member answered with the decided epochs")
        active, pending = known.active, known.pending
    return (ConfigEpoch.from_dict(active) if active else None,
            ConfigEpoch.from_dict(pending) if pending else None)
