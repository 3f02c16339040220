"""GroupFactory: how a node builds its replica of a group from its settings, for a start or a reopening.

`kvs.node` decides which groups run (from the epochs it follows) and when
(its supervisor thread, which must create every replica); this module only
knows how one is built: its Raft addresses and slots, its directory in
DATA_DIR, its state machine. A replica reopened after a disk fault
(`kvs.raft.recovery`) is built by the same call as at its start, so it
replays its log from the same state as its peers.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable

from kvs.config.epoch import ConfigEpoch
from kvs.fsm.meta import MetadataState
from kvs.fsm.shard import ShardState
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.settings import METADATA_SLOT, NodeSettings

METADATA_GROUP = "meta"
RETIRED_MARK = "retired"      # in a replica's directory: closed because no epoch gave it to its node

log = logging.getLogger(__name__)


class GroupFactory:
    def __init__(self, settings: NodeSettings, timing: RaftTiming, on_metadata_applied: Callable[[], None],
                 loop: Any = None):
        self._settings = settings
        self._timing = timing
        self._on_metadata_applied = on_metadata_applied
        self._loop = loop           # the node's event loop: shard groups tick on it with KVS_RAFT_ON_LOOP=on

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

    def mark_retired(self, shard_id: str) -> None:
        """Note in the directory of a replica just closed for good that it is no member any more."""
        directory = os.path.join(self._settings.data_dir, f"shard-{shard_id}")
        if os.path.isdir(directory):
            with open(os.path.join(directory, RETIRED_MARK), "w"):
                pass

    def delete_shard_directory(self, shard_id: str) -> None:
        shutil.rmtree(os.path.join(self._settings.data_dir, f"shard-{shard_id}"), ignore_errors=True)

    def shard_group(self, epoch: ConfigEpoch, shard_id: str, current: ConfigEpoch | None = None,
                    promoted_members: list[str] | None = None) -> RaftGroup:
        """This node's replica of `shard_id`, as `epoch` (any epoch that has the group) places it.

        A replica of a group that runs in `current` (the active epoch this node knows) without this
        node joins it as a learner (`kvs.raft.replica`, change 5): it receives the log and snapshots
        without a vote until the shard's leader, seeing it caught up, adds it to the configuration
        (`kvs.reconfig.shard_membership`); also after a restart before the change committed, when
        its log then names it a member again within moments. Its configuration starts as
        `current`'s members (what the log's changes replay onto); it also connects to `epoch`'s
        other replicas, among which the leader may be midway through a series of changes. A
        promoted learner reopens as a voting replica on the same directory, with the members its
        log has (`promoted_members`), and campaigns only once it has heard a leader; any other
        replica (a founder of a new group, a member of `current`) starts with `epoch`'s members,
        its log replaying the changes, and campaigns as usual."""
        s = self._settings
        directory = os.path.join(s.data_dir, f"shard-{shard_id}")
        joining = (promoted_members is None and current is not None and shard_id in current.shards
                   and s.address not in current.replicas(shard_id))
        retired = os.path.join(directory, RETIRED_MARK)
        if joining and os.path.exists(retired):
            # What a replica retired earlier left (it was no member by then): its journal's term may be
            # above the group's, and PySyncObj ignores a leader of a lower term without answering, so the
            # learner would wait forever. It joins empty, as a new member does.
            log.info("%s joins shard %s again: its retired replica's data is set aside", s.address, shard_id)
            shutil.rmtree(directory, ignore_errors=True)
        elif os.path.exists(retired):
            os.remove(retired)              # a member again: its data is its group's once more
        me = s.raft_address(s.address, epoch.slot(shard_id, s.address))

        def members(e: ConfigEpoch) -> list[str]:
            return [s.raft_address(a, e.slot(shard_id, a)) for a in e.replicas(shard_id)]

        peers = promoted_members if promoted_members is not None else members(current if joining else epoch)
        planned = tuple(sorted(set(members(epoch)) - set(peers) - {me})) if joining else ()
        # The group's starting ownership is its creation epoch's, not the one this node happens to know
        # now: a replica re-created later replays the same log from the same state as its peers.
        origin_number, origin_ring = epoch.origin(shard_id)
        ownership = (origin_number, shard_id, origin_ring)
        return RaftGroup(f"shard-{shard_id}", me, [p for p in peers if p != me], ShardState(ownership), directory,
                         s.secret, self._timing, bind_host=s.bind_host, learner=joining, also_connect=planned,
                         hold_election=promoted_members is not None,
                         loop=self._loop if s.raft_on_loop else None)
