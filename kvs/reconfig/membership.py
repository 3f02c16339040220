"""MetadataMembership: the metadata group's members follow the active epoch, one node at a time.

Every committed epoch names its metadata members (the planner makes them the
new view). The metadata leader compares them with the members of its own Raft
configuration and, while they differ, takes one step per round:

* add: propose the new member through the log (PySyncObj applies a membership
  entry when it is appended), tell the node to open its replica with the new
  member list, wait for the commit;
* remove: propose removing one member that is not the leader, wait for the
  commit, tell the node to close its replica. A leader that must itself leave
  first hands leadership to a caught-up follower, which continues.

Adds go before removes, so the group never shrinks below what both views can
keep alive, and one change at a time is the Raft leader's own rule (kvs.raft.replica,
change 6: a change is proposed only once the previous one is applied). The state of the
reconciliation is nothing but the two member lists, so a leader that dies
midway leaves nothing to repair: the next leader compares again and continues.
A node that is down when told to join or leave is told again by the same
leader while it leads (a new leader does not know: docs/ARCHITECTURE.md, known gaps).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from kvs.errors import KvsError
from kvs.node import Node
from kvs.reconfig.protocol import MetadataMembership as MembershipMessage
from kvs.reconfig.remote import Remote
from kvs.settings import METADATA_SLOT

log = logging.getLogger(__name__)

PERIOD = 0.5            # seconds between two comparisons on the leader
STEP_SECONDS = 15.0     # one membership change must commit within this


@dataclass(frozen=True)
class Step:
    """One membership change of a group's leader: "add" or "remove" `member`, or "hand over" (the
    leader itself must leave: it transfers its leadership to a caught-up follower first)."""
    op: str
    member: str | None = None


def next_step(members: list[str], target: list[str], leader: str, lagging: Sequence[str] = ()) -> Step | None:
    """The next single change that moves `members` toward `target` (None: there already). Adds first,
    so the group never has fewer members than either set; removes only once no member that stays is
    `lagging` (still catching up: the group would need its acknowledgements for a quorum)."""
    to_add = [m for m in target if m not in members]
    if to_add:
        return Step("add", to_add[0])
    to_remove = [m for m in members if m not in target]
    if not to_remove or any(m in target for m in lagging):
        return None
    others = [m for m in to_remove if m != leader]
    return Step("remove", others[0]) if others else Step("hand over")


class MetadataMembership:
    def __init__(self, node: Node, remote: Remote):
        self._node = node
        self._remote = remote
        # Raft address -> (member, peers) of a node that could not be told yet (this leader retries)
        self._untold: dict[str, tuple[bool, list[str]]] = {}

    def run(self, stopping: threading.Event) -> None:
        """The thread body: one step per PERIOD until `stopping` is set."""
        while not stopping.wait(PERIOD):
            try:
                self.step()
            except KvsError as exc:
                log.warning("metadata membership: %s", exc.message)

    def target(self) -> list[str] | None:
        """Raft addresses the metadata group should have, from the active epoch (None: unknown)."""
        epoch = self._node.epoch
        if epoch is None:
            return None
        return sorted(self._raft(a) for a in epoch.metadata_members)

    def step(self) -> bool:
        """Take at most one step towards the target; True if a step was taken."""
        meta = self._node.metadata_group
        target = self.target()
        # Not while a view change runs: its coordinator proposes through its own metadata replica, which
        # must not be closed under it; the change is short, membership follows right after.
        if meta is None or target is None or not meta.is_leader() or self._node.change() is not None:
            return False
        if meta.membership_change_pending():
            # An earlier step's change is still uncommitted (its wait timed out): another would be
            # refused, after its joiner had been told to open a voting replica, which would then
            # campaign from outside the group (PySyncObj has no pre-vote).
            return False
        members = meta.members()
        step = next_step(members, target, meta.self_address)
        deadline = time.monotonic() + STEP_SECONDS
        if step is not None and step.op == "add":
            joining = step.member
            peers = sorted(members + [joining])
            log.info("metadata group: adding %s", joining)
            meta.change_members("add", joining, deadline,
                                on_appended=lambda: self._tell(joining, True, peers))
            self._tell(joining, True, peers)     # again, in case it was down a moment ago
            return True
        if step is not None and step.op == "hand over":
            log.info("metadata group: %s must leave; handing leadership over", meta.self_address)
            meta.transfer_leadership()
            return True
        if step is not None:
            log.info("metadata group: removing %s", step.member)
            meta.change_members("remove", step.member, deadline, on_appended=lambda: None)
            self._tell(step.member, False, [])
            return True
        self._retell()
        return False

    def _retell(self) -> None:
        """Tell again the nodes that were unreachable when told to join or leave."""
        for raft_address, (member, peers) in list(self._untold.items()):
            self._tell(raft_address, member, peers)

    def _tell(self, raft_address: str, member: bool, peers: list[str]) -> None:
        address = self._node.settings.http_address(raft_address, METADATA_SLOT)
        if self._remote.tell_metadata(address, MembershipMessage(member, peers)):
            self._untold.pop(raft_address, None)
            return
        log.warning("metadata group: %s did not take %s (told again later)", address,
                    "its membership" if member else "its removal")
        self._untold[raft_address] = (member, peers)

    def _raft(self, http_address: str) -> str:
        return self._node.settings.raft_address(http_address, METADATA_SLOT)
