"""The coordinator's checks and bounded waits on other nodes (kvs.reconfig.settle).

A node a change adds is asked again for REACH_SECONDS: one lost request does not refuse a valid
change, and a node that never answers, or stays busy, is refused once that time is up.

The bounded waits after a commit end when their target is superseded, and ask a node that misses a
request again, as the checks do.

A change's reply waits until the metadata group's members are the new view's.
If a later change has already committed (it removed one of those members, say),
that target is never reached, and the coordinator would hold its node's change
lock for the whole bound: the node refused the next valid change with 409
(Docker soak seed 69 on b03b7db).
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from kvs.config.epoch import ConfigEpoch
from kvs.errors import BadRequest
from kvs.reconfig import settle
from kvs.reconfig.protocol import GroupStatus, NodeStatus
from kvs.reconfig.remote import Remote
from kvs.routing.peers import PeerResponse, PeerUnreachable
from kvs.settings import METADATA_SLOT, NodeSettings

from .test_coordinator import FakeNode, ScriptedForwarder, coordinator

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


IDLE = {"shard-id": None, "groups": {"meta": {}}}
BUSY = {"shard-id": None, "groups": {"meta": {}, "shard-4": {}}}


class ScriptedPeer(ScriptedForwarder):
    """A peer whose first `misses` requests are lost (a dropped SYN, a restarting bridge), then answers
    each status with the next of `answers` (the last one again once they run out)."""

    def __init__(self, misses: int, answers: list[dict]):
        super().__init__(body=answers[0])
        self.misses, self.answers = misses, answers

    def send(self, address, method, path, payload, request_id, deadline) -> PeerResponse:
        if len(self.sent) < self.misses:
            self.sent.append((address, method, path, payload))
            raise PeerUnreachable(f"{address}: ConnectTimeout")
        answered = len(self.sent) - self.misses
        self.answer = (200, self.answers[min(answered, len(self.answers) - 1)])
        return super().send(address, method, path, payload, request_id, deadline)


def grown() -> tuple:
    epoch = FakeNode().epoch
    return replace(epoch, view=epoch.view + ("127.0.0.1:3",)), epoch


def test_a_new_node_that_misses_a_probe_or_two_is_still_reachable_and_idle():
    peer = ScriptedPeer(misses=2, answers=[IDLE])
    settle.check_reachable(Remote(peer), *grown())
    assert [sent[0] for sent in peer.sent] == ["127.0.0.1:3"] * 3
    peer = ScriptedPeer(misses=2, answers=[IDLE])
    settle.check_idle(Remote(peer), "127.0.0.1:3")
    assert len(peer.sent) == 3


def test_a_node_still_retiring_its_replica_is_asked_again_until_it_is_idle():
    peer = ScriptedPeer(misses=0, answers=[BUSY, BUSY, IDLE])
    settle.check_idle(Remote(peer), "127.0.0.1:3")
    assert len(peer.sent) == 3


@pytest.mark.parametrize("check", ["reachable", "idle"])
def test_a_new_node_that_never_answers_is_refused_once_the_probes_time_is_up(monkeypatch, check):
    monkeypatch.setattr(settle, "REACH_SECONDS", 0.5)
    peer = ScriptedForwarder(reachable=False)
    started = time.monotonic()
    with pytest.raises(BadRequest, match=r"new node 127\.0\.0\.1:3 is unreachable \(127\.0\.0\.1:3: down\)"):
        if check == "reachable":
            settle.check_reachable(Remote(peer), *grown())
        else:
            settle.check_idle(Remote(peer), "127.0.0.1:3")
    elapsed = time.monotonic() - started
    assert len(peer.sent) >= 2 and 0.35 <= elapsed < 2.0


def test_a_node_that_stays_busy_is_refused_as_not_idle_once_the_time_is_up(monkeypatch):
    monkeypatch.setattr(settle, "REACH_SECONDS", 0.5)
    peer = ScriptedPeer(misses=0, answers=[BUSY])
    started = time.monotonic()
    with pytest.raises(BadRequest, match="not idle: it runs a replica of shard 4"):
        settle.check_idle(Remote(peer), "127.0.0.1:3")
    assert len(peer.sent) >= 2 and 0.25 <= time.monotonic() - started < 2.0


def epoch_status(number: int) -> dict:
    return {"epoch": number, "shard-id": None, "groups": {"meta": {}}}


def test_the_wait_for_an_epoch_asks_a_node_again_after_a_lost_request_until_it_routes_by_it():
    epoch = FakeNode().epoch
    one_node = replace(epoch, view=epoch.view[:1])
    peer = ScriptedPeer(misses=2, answers=[epoch_status(epoch.number - 1), epoch_status(epoch.number)])
    settle.wait_for_epoch(Remote(peer), one_node)
    assert len(peer.sent) == 4      # two lost, one answer of the old epoch, then the new one


def test_the_wait_for_an_epoch_leaves_out_nodes_that_never_answer_once_the_probes_time_is_up_together(
        monkeypatch, caplog):
    monkeypatch.setattr(settle, "REACH_SECONDS", 1.0)
    epoch = FakeNode().epoch
    assert len(epoch.view) == 2
    peer = ScriptedForwarder(reachable=False)
    started = time.monotonic()
    settle.wait_for_epoch(Remote(peer), epoch)
    elapsed = time.monotonic() - started
    asked = {address for address, *_ in peer.sent}
    assert asked == set(epoch.view) and len(peer.sent) >= 2 * len(epoch.view)
    assert 1.0 <= elapsed < 1.8, "the dead nodes were waited for one after another, or not for long enough"
    assert caplog.text.count("answered nothing") == 2


def test_a_node_to_add_is_asked_its_status_once_when_it_answers_idle(monkeypatch):
    class Started(Exception):
        pass

    change = coordinator(peer_status=IDLE)
    monkeypatch.setattr(change, "_acquire", lambda current: (_ for _ in ()).throw(Started()))
    with pytest.raises(Started):
        change.add_member("127.0.0.1:3", "1")
    assert [sent[:3] for sent in change._remote._forwarder.sent] == [("127.0.0.1:3", "GET", "/internal/status")]
