"""GroupFactory: how a node builds its replica of a group from its settings, for a start or a reopening.

`kvs.node` decides which groups run (from the epochs it follows) and when
(its supervisor thread, which must create every replica); this module only
knows how one is built: its Raft addresses and slots, its directory in
DATA_DIR, its state machine. A replica reopened after a disk fault
(`kvs.raft.recovery`) is built by the same call as at its start, so it
replays its log from the same state as its peers.
"""

from __future__ import annotations

import os
from typing import Callable

from kvs.config.epoch import ConfigEpoch
from kvs.fsm.meta import MetadataState
from kvs.fsm.shard import ShardState
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.settings import METADATA_SLOT, NodeSettings

METADATA_GROUP = "meta"


class GroupFactory:
    def __init__(self, settings: NodeSettings, timing: RaftTiming, on_metadata_applied: Callable[[], None]):
        self._settings = settings
        self._timing = timing
        self._on_metadata_applied = on_metadata_applied

    def metadata_group(self, peers: list[str] | None) -> RaftGroup:
        """This node's metadata replica; `peers` (Raft addresses) as last seen, else the VIEW's."""
        s = self._settings
        peers = peers or [s.raft_address(a, METADATA_SLOT) for a in s.view]
        return RaftGroup(METADATA_GROUP, s.raft_address(s.address, METADATA_SLOT), peers, MetadataState(),
                         os.path.join(s.data_dir, "meta"), s.secret, self._timing,
                         on_applied=self._on_metadata_applied, bind_host=s.bind_host)

    def shard_group(self, epoch: ConfigEpoch, shard_id: str) -> RaftGroup:
        """This node's replica of `shard_id`, as `epoch` (any epoch that has the group) places it."""
        s = self._settings
        peers = [s.raft_address(a, epoch.slot(shard_id, a)) for a in epoch.replicas(shard_id)]
        # The group's starting ownership is its creation epoch's, not the one this node happens to know
        # now: a replica re-created later replays the same log from the same state as its peers.
        origin_number, origin_ring = epoch.origin(shard_id)
        ownership = (origin_number, shard_id, origin_ring)
        return RaftGroup(f"shard-{shard_id}", s.raft_address(s.address, epoch.slot(shard_id, s.address)), peers,
                         ShardState(ownership), os.path.join(s.data_dir, f"shard-{shard_id}"), s.secret,
                         self._timing, bind_host=s.bind_host)
