"""Takeover: a metadata member finishes or rolls back a view change whose coordinator died.

Every metadata member watches the change the metadata group records. If it
makes no progress for TAKEOVER_SECONDS and its coordinator is gone (or is this
node, restarted), the watcher claims the change through the metadata log (one
claimant wins: the claim names the coordinator and step count it saw) and
rolls it back if it was not committed, or finishes the clean-up if it was.
There is never a half-state that needs a tool.

Whether another node is gone is judged by the metadata group's leader alone, and only after the
coordinator failed two probes in a row: a member cut off from the others (or
too loaded to answer in time) would otherwise take a healthy coordinator's
change away from it, and every needless rollback is a change the operator
asked for and did not get.
"""

from __future__ import annotations

import logging
import threading
import time

from kvs.errors import KvsError
from kvs.node import Node
from kvs.reconfig.coordinator import ViewChange
from kvs.reconfig.remote import Remote

log = logging.getLogger(__name__)

TAKEOVER_SECONDS = 5.0    # a change without progress this long, whose coordinator is gone, is taken over
WATCH_PERIOD = 1.0


class TakeoverWatcher:
    def __init__(self, node: Node, coordinator: ViewChange, remote: Remote):
        self._node = node
        self._coordinator = coordinator
        self._remote = remote
        self._seen: tuple | None = None
        self._since = time.monotonic()
        self._missed = 0                # consecutive probes the stalled change's coordinator failed

    def run(self, stopping: threading.Event) -> None:
        """The watcher's thread body: until `stopping` is set."""
        while not stopping.wait(WATCH_PERIOD):
            try:
                self.check()
            except KvsError as exc:
                log.error("taking over a view change failed: %s", exc.message)
            except Exception:           # the watcher outlives any one bad check
                log.exception("the take-over watcher's check failed")

    def check(self) -> None:
        """Take over the recorded change if it has stalled and its coordinator is gone."""
        if not self._node.has_metadata_replica:
            return
        change = self._node.change()
        mark = None if change is None else (change["number"], change["coordinator"], change["steps"])
        if mark != self._seen:
            self._seen, self._since, self._missed = mark, time.monotonic(), 0
            return
        if change is None or time.monotonic() - self._since < TAKEOVER_SECONDS or self._coordinator.busy:
            return
        if change["coordinator"] != self._node.settings.address and not self._coordinator_gone(change["coordinator"]):
            return
        self._coordinator.take_over(change)     # its coordinator is gone, or is this node, restarted

    def _coordinator_gone(self, coordinator: str) -> bool:
        meta = self._node.metadata_group
        if meta is None or not meta.is_leader() or self._remote.reachable(coordinator):
            self._missed = 0
            return False                # alive and stuck on a slow step: its own deadlines end it
        self._missed += 1
        return self._missed >= 2
