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
import shutil
from typing import Callable

from kvs.config.epoch import ConfigEpoch
from kvs.fsm.meta import MetadataState
from kvs.fsm.shard import ShardState
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.storage import group_files
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

    def shard_directories(self) -> list[str]:
        """Shard ids of the replica directories in DATA_DIR."""
        try:
            names = os.listdir(self._settings.data_dir)
        except OSError:
            return []
        return sorted(n[len("shard-"):] for n in names if n.startswith("shard-"))

    def delete_shard_directory(self, shard_id: str) -> None:
        shutil.rmtree(os.path.join(self._settings.data_dir, f"shard-{shard_id}"), ignore_errors=True)

    def shard_group(self, epoch: ConfigEpoch, shard_id: str, current: ConfigEpoch | None = None) -> RaftGroup:
        """This node's replica of `shard_id`, as `epoch` (any epoch that has the group) places it.

        A replica with nothing on disk of a group that `epoch` did not create joins a running group
        (added by a membership change, or its data was lost): it catches up from the leader and
        campaigns only once it has heard it (`kvs.raft.replica`, change 5). It starts with the
        members of `current` (the epoch the group runs at) and itself, so that it accepts the
        leader's connection; the leader's log or snapshot then gives it the group's configuration.
        A founding replica of a new group, or one with a journal, campaigns as usual (a whole group
        restarted must elect) and starts with `epoch`'s members, its log replaying the changes."""
        s = self._settings
        directory = os.path.join(s.data_dir, f"shard-{shard_id}")
        journal, _ = group_files(directory)
        joining = epoch.origin(shard_id)[0] < epoch.number and not os.path.exists(journal)
        base = current if joining and current is not None and shard_id in current.shards else epoch
        peers = [s.raft_address(a, base.slot(shard_id, a)) for a in base.replicas(shard_id)]
        peers.append(s.raft_address(s.address, epoch.slot(shard_id, s.address)))
        # The group's starting ownership is its creation epoch's, not the one this node happens to know
        # now: a replica re-created later replays the same log from the same state as its peers.
        origin_number, origin_ring = epoch.origin(shard_id)
        ownership = (origin_number, shard_id, origin_ring)
        return RaftGroup(f"shard-{shard_id}", s.raft_address(s.address, epoch.slot(shard_id, s.address)), peers,
                         ShardState(ownership), directory, s.secret,
                         self._timing, bind_host=s.bind_host, joining=joining)
