"""EpochSync: a node outside the metadata group catches up with epochs it missed while it was down.

Members of the metadata group learn every epoch from their own replica. Other
nodes are told by the coordinator (`Remote.push_epochs`); one that was down
then asks a metadata member every SYNC_PERIOD. It only ever moves forward: it
takes what the member knows only if it names a newer active epoch, or the same
one with a newer revision (the log index of the metadata group's decision), so a member that lags (one just restarted, replaying its
log) can neither drop a pending epoch nor bring back one that was rolled back.
"""

from __future__ import annotations

import threading

from kvs.node import Node
from kvs.reconfig.remote import Remote

SYNC_PERIOD = 1.0


class EpochSync:
    def __init__(self, node: Node, remote: Remote):
        self._node = node
        self._remote = remote

    def run(self, stopping: threading.Event) -> None:
        """The thread body: until `stopping` is set."""
        while not stopping.wait(SYNC_PERIOD):
            if not self._node.has_metadata_replica:
                self.pull()

    def pull(self) -> None:
        epoch = self._node.epoch
        if epoch is None:
            return                              # idle: it joins when a coordinator pushes to it
        for address in epoch.metadata_members:
            known = self._remote.known_epochs(address)
            if known is None or not known.metadata_member or known.active is None:
                continue
            if known.active["number"] > epoch.number or known.revision > self._node.pushed_revision:
                self._node.learn(known.active, known.pending, known.revision)
            return
