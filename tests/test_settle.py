"""The coordinator's bounded waits after a commit (kvs.reconfig.settle) end when their target is superseded.

A change's reply waits until the metadata group's members are the new view's.
If a later change has already committed (it removed one of those members, say),
that target is never reached, and the coordinator would hold its node's change
lock for the whole bound: the node refused the next valid change with 409
(Docker soak seed 69 on b03b7db).
"""

from __future__ import annotations

import time

from kvs.config.epoch import ConfigEpoch
from kvs.reconfig import settle
from kvs.reconfig.protocol import GroupStatus, NodeStatus
from kvs.reconfig.remote import Remote
from kvs.settings import METADATA_SLOT, NodeSettings

VIEW = ("10.0.0.1:13800", "10.0.0.2:13800", "10.0.0.3:13800")


class StatusesOf(Remote):
    """A Remote whose nodes all answer the same status."""

    def __init__(self, status: NodeStatus):
        super().__init__(forwarder=None)
        self._status = status

    def status(self, address: str, deadline: float) -> NodeStatus:
        return self._status


def meta_status(epoch: int, members: list[str]) -> NodeStatus:
    return NodeStatus(epoch, None, {"meta": GroupStatus(leader=members[0], members=members)})


def test_the_wait_for_the_metadata_members_ends_at_once_when_a_later_epoch_is_active(monkeypatch):
    monkeypatch.setattr(settle, "MEMBERSHIP_SECONDS", 5.0)
    settings = NodeSettings(VIEW[0], VIEW, 3, "/nonexistent")
    epoch = ConfigEpoch.initial(VIEW, 3)
    others = [settings.raft_address(a, METADATA_SLOT) for a in VIEW[:2]]     # not this epoch's members
    started = time.monotonic()
    settle.wait_for_metadata_members(StatusesOf(meta_status(epoch.number + 1, others)), settings, epoch)
    assert time.monotonic() - started < 2.0, "it waited for members a later change had replaced"
    started = time.monotonic()
    settle.wait_for_metadata_members(StatusesOf(meta_status(epoch.number, others)), settings, epoch)
    assert time.monotonic() - started >= 5.0, "the members were not those of the epoch, yet it stopped waiting"
