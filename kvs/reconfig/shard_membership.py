"""ShardMembership: each shard group's Raft members follow the decided epochs, in place.

A view change that keeps a shard but changes its replicas (add-member,
remove-member, repl-factor up or down on the same shard count, a node moved
or replaced; see `kvs.reconfig.planner`) changes the Raft membership of the
shard's group: no new group, no key moves. Who should be a member is a pure
function of what the metadata group decided:

    the pending epoch's replicas of the shard while a change that has it is in
    progress, else the active epoch's.

The leader of each shard group compares that target with its group's Raft
configuration every PERIOD and takes one step at a time (PySyncObj's rule),
as the metadata group does for its own members (`kvs.reconfig.membership`):

* add first: propose the new member (its node opened its replica when it
  learned the plan; that replica waits for the leader before it campaigns,
  `kvs.raft.replica` change 5) and wait for the commit; it catches up from the
  leader's log or snapshot;
* then remove one member that is not the leader; a leader that must leave
  first hands leadership to a caught-up follower, which continues.

Adds before removes: the group never has fewer members than either replica
set. The coordinator waits until the members match and the new ones caught up
before it commits the epoch (`settle.wait_for_members`); a rollback clears the
pending epoch, so the same loop moves the members back. The state of the
reconciliation is nothing but the decided epochs and the group's own
configuration: a leader or coordinator that dies midway leaves nothing to
repair. Each node's knowledge of the epochs is a hint that may lag (pushes and
pulls arrive late), so a step is taken only after the target is confirmed by a
linearizable read of the metadata group's decisions.

The same thread deletes the directories of replicas this node no longer runs
once the decided epochs, read the same way, give this node no replica of them
(retired groups, replicas removed from a group): until then they stay, so a
rolled-back change loses nothing.
"""

from __future__ import annotations

import logging
import threading
import time

from kvs.config.epoch import ConfigEpoch
from kvs.errors import KvsError, Unavailable
from kvs.node import Node
from kvs.reconfig.remote import Remote

log = logging.getLogger(__name__)

PERIOD = 0.5              # seconds between two comparisons
STEP_SECONDS = 15.0       # one membership change must commit within this
READ_SECONDS = 3.0        # the linearizable read of the decided epochs
JANITOR_EVERY = 20        # rounds between two looks for directories to delete


class ShardMembership:
    def __init__(self, node: Node, remote: Remote):
        self._node = node
        self._remote = remote
        self._rounds = 0

    def run(self, stopping: threading.Event) -> None:
        """The thread body: one round per PERIOD until `stopping` is set."""
        while not stopping.wait(PERIOD):
            self._rounds += 1
            try:
                self.step()
                if self._rounds % JANITOR_EVERY == 0:
                    self.delete_retired_directories()
            except KvsError as exc:
                log.warning("shard membership: %s", exc.message)

    # -- the target -----------------------------------------------------------------------------

    def target(self, shard_id: str, active: ConfigEpoch | None, pending: ConfigEpoch | None) -> list[str] | None:
        """Raft addresses the group of `shard_id` should have (None: no epoch has the shard)."""
        epoch = pending if pending is not None and shard_id in pending.shards else active
        if epoch is None or shard_id not in epoch.shards:
            return None
        s = self._node.settings
        return sorted(s.raft_address(a, epoch.slot(shard_id, a)) for a in epoch.replicas(shard_id))

    def decided(self) -> tuple[ConfigEpoch | None, ConfigEpoch | None]:
        """(active, pending) as the metadata group has decided them, read linearizably; Unavailable
        if no metadata member can say."""
        deadline = time.monotonic() + READ_SECONDS
        meta = self._node.metadata_group
        if meta is not None:
            _, active, pending = meta.read(lambda state: state.decisions(), deadline)
        else:
            epoch = self._node.epoch
            members = epoch.metadata_members if epoch is not None else ()
            known = next((k for k in map(self._remote.decided_epochs, members) if k is not None), None)
            if known is None:
                raise Unavailable("no metadata member answered with the decided epochs")
            active, pending = known.active, known.pending
        return (ConfigEpoch.from_dict(active) if active else None,
                ConfigEpoch.from_dict(pending) if pending else None)

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
        active, pending = self.decided()
        steps = 0
        for sid, group in differing.items():
            target = self.target(sid, active, pending)
            if target is not None and self._step(sid, group, target):
                steps += 1
        return steps

    def _step(self, shard_id: str, group, target: list[str]) -> bool:
        members = group.members()
        to_add = [m for m in target if m not in members]
        to_remove = [m for m in members if m not in target]
        deadline = time.monotonic() + STEP_SECONDS
        if to_add:
            log.info("shard %s: adding %s to the group", shard_id, to_add[0])
            group.change_members("add", to_add[0], deadline, on_appended=lambda: None)
            return True
        if to_remove:
            leaving = [m for m in to_remove if m != group.self_address]
            if not leaving:
                log.info("shard %s: %s must leave the group; handing leadership over", shard_id, group.self_address)
                group.transfer_leadership()
                return True
            log.info("shard %s: removing %s from the group", shard_id, leaving[0])
            group.change_members("remove", leaving[0], deadline, on_appended=lambda: None)
            return True
        return False

    # -- directories of replicas this node no longer runs ------------------------------------------

    def delete_retired_directories(self) -> list[str]:
        """Delete the directories of replicas that neither decided epoch gives this node; returns
        the shard ids deleted."""
        hosted = set(self._node.shard_groups())
        candidates = [sid for sid in self._node.replica_directories() if sid not in hosted]
        if not candidates:
            return []
        active, pending = self.decided()
        if active is None:
            return []
        me = self._node.settings.address
        mine = {sid for e in (active, pending) if e is not None for sid, r in e.shards.items() if me in r}
        deleted = [sid for sid in candidates if sid not in mine and self._node.delete_replica_directory(sid)]
        for sid in deleted:
            log.info("%s deleted its directory of shard %s: no decided epoch gives it a replica",
                     me, sid)
        return deleted
