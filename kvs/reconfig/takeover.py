"""Takeover: a metadata member finishes or rolls back a view change whose coordinator died.

Every metadata member watches the change the metadata group records. If it
makes no progress for TAKEOVER_SECONDS and its coordinator is gone (or is this
node, restarted), the watcher claims the change through the metadata log (one
claimant wins: the claim names the coordinator and step count it saw) and
rolls it back if it was not committed, or finishes the clean-up if it was.
There is never a half-state that needs a tool.
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

    def run(self, stopping: threading.Event) -> None:
        """The watcher's thread body: until `stopping` is set."""
        while not stopping.wait(WATCH_PERIOD):
            try:
                self.check()
            except KvsError as exc:
                log.error("taking over a view change failed: %s", exc.message)

    def check(self) -> None:
        """Take over the recorded change if it has stalled and its coordinator is gone."""
        if not self._node.has_metadata_replica:
            return
        change = self._node.change()
        mark = None if change is None else (change["number"], change["coordinator"], change["steps"])
        if mark != self._seen:
            self._seen, self._since = mark, time.monotonic()
            return
        if change is None or time.monotonic() - self._since < TAKEOVER_SECONDS or self._coordinator.busy:
            return
        if change["coordinator"] != self._node.settings.address and self._remote.reachable(change["coordinator"]):
            return                      # alive and stuck on a slow step: its own deadlines end it
        self._coordinator.take_over(change)
