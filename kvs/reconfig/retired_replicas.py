"""RetiredReplicas: a node deletes the data of replicas it no longer runs, once that is decided.

A replica leaves its node when its group is retired (a change of the shard
count) or when a change takes the node out of the group (in place,
`kvs.reconfig.shard_membership`). Its directory (journal, snapshot) is kept
until the metadata group's decided epochs, read linearizably
(`decided_epochs`), give the node no replica of that shard, neither active nor
pending: a change rolled back, or one a node only heard of from a lagging
member, loses nothing. The deletion itself runs under the node's lock that
also guards opening a replica (`Node.delete_replica_directory`), and never
touches a replica that runs or is held after a disk fault.
"""

from __future__ import annotations

import logging
import threading

from kvs.errors import KvsError
from kvs.node import Node
from kvs.reconfig.remote import Remote
from kvs.reconfig.shard_membership import decided_epochs

log = logging.getLogger(__name__)

PERIOD = 10.0             # seconds between two looks for directories to delete


class RetiredReplicas:
    def __init__(self, node: Node, remote: Remote):
        self._node = node
        self._remote = remote

    def run(self, stopping: threading.Event) -> None:
        """The thread body: one look per PERIOD until `stopping` is set."""
        while not stopping.wait(PERIOD):
            try:
                self.delete()
            except KvsError as exc:
                log.warning("retired replicas: %s", exc.message)

    def delete(self) -> list[str]:
        """Delete the directories of replicas that neither decided epoch gives this node; returns the
        shard ids deleted."""
        hosted = set(self._node.shard_groups())
        candidates = [sid for sid in self._node.replica_directories() if sid not in hosted]
        if not candidates:
            return []
        active, pending = decided_epochs(self._node, self._remote)
        if active is None:
            return []
        me = self._node.settings.address
        mine = {sid for e in (active, pending) if e is not None for sid, r in e.shards.items() if me in r}
        deleted = [sid for sid in candidates if sid not in mine and self._node.delete_replica_directory(sid)]
        for sid in deleted:
            log.info("%s deleted its directory of shard %s: no decided epoch gives it a replica", me, sid)
        return deleted
