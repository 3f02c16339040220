"""The view-change coordinator's requests and the typed node-to-node protocol, without a cluster.

The coordinator runs against `FakeNode`, which implements the node interface
the coordinator declares (`CoordinatedNode`), and a `Remote` over a scripted
forwarder, so the checks a request goes through before any change starts are
tested alone; the protocol's records are round-tripped and fed bad input.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from typing import Callable

import pytest

from kvs.config.epoch import ConfigEpoch
from kvs.errors import BadRequest, Conflict, Unavailable
from kvs.fsm.commands import (DropKeys, Freeze, Install, Own, Thaw, Track, command_from_json, command_to_json)
from kvs.fsm.shard import Deleted, Mismatch, Written
from kvs.node import Node
from kvs.reconfig.copy import CHUNK_BYTES, batches
from kvs.fsm.base import Invalid
from kvs.reconfig import coordinator as coordinator_module
from kvs.reconfig import settle
from kvs.reconfig.coordinator import ViewChange
from kvs.reconfig.planner import plan_remove_member
from kvs.reconfig.phases import CoordinatedNode
from kvs.reconfig.protocol import Epochs, Exported, ExportRequest, NodeStatus
from kvs.reconfig.remote import Remote, StepRefused
from kvs.routing.peers import PeerResponse, PeerUnreachable
from kvs.settings import NodeSettings

RING = {"groups": ["1", "2"], "vnodes": 8}


class FakeNode:
    """A node of a two-node, two-shard cluster, with a change in progress or not."""

    def __init__(self, change: dict | None = None):
        self.settings = NodeSettings.load(environ={"ADDRESS": "127.0.0.1:1", "VIEW": "127.0.0.1:1,127.0.0.1:2",
                                                   "DATA_DIR": "/nonexistent"})
        self._epoch = ConfigEpoch.initial(("127.0.0.1:1", "127.0.0.1:2"), 1)
        self._change = change
        self.proposed: list[tuple] = []

    @property
    def epoch(self) -> ConfigEpoch | None:
        return self._epoch

    def meta_epoch(self, number: int) -> ConfigEpoch | None:
        return self._epoch if number == self._epoch.number else None

    def committed_configuration(self, deadline: float) -> tuple[dict | None, dict | None, int]:
        return self._epoch.to_dict(), self._change, 0

    def propose_meta(self, command: tuple, deadline: float) -> object:
        self.proposed.append(command)
        return True

    def decisions(self) -> tuple[int, dict | None, dict | None] | None:
        return len(self.proposed), self._epoch.to_dict(), None


class ScriptedForwarder:
    """Answers every request with (status, body); None: the peer is unreachable."""

    def __init__(self, status: int = 200, body: dict | None = None, reachable: bool = True):
        self.answer = (status, body or {})
        self.reachable = reachable
        self.sent: list[tuple[str, str, str, dict | None]] = []

    def send(self, address, method, path, payload, request_id, deadline) -> PeerResponse:
        self.sent.append((address, method, path, payload))
        if not self.reachable:
            raise PeerUnreachable(f"{address}: down")
        return PeerResponse(self.answer[0], json.loads(json.dumps(self.answer[1])), None)


def coordinator(change: dict | None = None, peer_status: dict | None = None) -> ViewChange:
    forwarder = ScriptedForwarder(body=peer_status, reachable=peer_status is not None)
    return ViewChange(FakeNode(change), Remote(forwarder))


def test_the_fake_and_the_real_node_both_implement_the_coordinators_interface(tmp_path):
    assert isinstance(FakeNode(), CoordinatedNode)
    settings = NodeSettings.load(environ={"ADDRESS": "127.0.0.1:1", "VIEW": "127.0.0.1:1", "DATA_DIR": str(tmp_path)})
    assert isinstance(Node(settings), CoordinatedNode)


def test_member_changes_while_a_change_runs_are_conflicts():
    running = coordinator(change={"number": 2, "phase": "copying"})
    with pytest.raises(Conflict):
        running.add_member("127.0.0.1:3", "1")
    with pytest.raises(Conflict):
        running.remove_member("127.0.0.1:2")


@pytest.mark.parametrize("address, shard_id, words", [
    (None, "1", "address must be"),
    (7, "1", "address must be"),
    ("  ", "1", "address must be"),
    ("127.0.0.1:3", None, "shard-id must be"),
    ("127.0.0.1:3", True, "shard-id must be"),
    ("127.0.0.1:3", ["1"], "shard-id must be"),
    ("127.0.0.1:3", 9, "shard 9 does not exist"),
    ("127.0.0.1:2", "1", "already in the view"),
    ("127.0.0.1:3", 1, "unreachable"),                     # a JSON number is taken as the id "1"
])
def test_bad_add_member_requests(address, shard_id, words, monkeypatch):
    monkeypatch.setattr(settle, "REACH_SECONDS", 0.3)      # an unreachable node is asked again until then
    with pytest.raises(BadRequest) as info:
        coordinator().add_member(address, shard_id)
    assert words in info.value.message


def test_a_node_that_serves_a_shard_cannot_join(monkeypatch):
    monkeypatch.setattr(settle, "REACH_SECONDS", 0.3)      # it is asked again until then
    busy = coordinator(peer_status={"shard-id": None, "groups": {"meta": {}, "shard-4": {}}})
    with pytest.raises(BadRequest, match="not idle: it runs a replica of shard 4"):
        busy.add_member("127.0.0.1:3", "1")


@pytest.mark.parametrize("address, words", [(None, "address must be"), ("127.0.0.1:3", "not in the view")])
def test_bad_remove_member_requests(address, words):
    with pytest.raises(BadRequest) as info:
        coordinator().remove_member(address)
    assert words in info.value.message


def test_a_job_runs_on_its_own_thread_and_hands_back_its_outcome():
    vc = coordinator(change={"number": 2, "phase": "copying"})
    caller = threading.current_thread()
    assert vc.submit(lambda: threading.current_thread() is not caller) is True
    with pytest.raises(Conflict):
        vc.submit(lambda: vc.remove_member("127.0.0.1:2"))
    vc.stop()
    assert not vc.busy


class ClaimingNode(FakeNode):
    """A node whose take-over is stuck in its claim (a metadata round trip) until `claimed` is set; the
    claim then fails, as it does for a change that ended meanwhile. A prepare is refused: far enough."""

    def __init__(self):
        super().__init__()
        self.claiming, self.claimed = threading.Event(), threading.Event()

    def propose_meta(self, command: tuple, deadline: float) -> object:
        self.proposed.append(command)
        if command[0] == "claim":
            self.claiming.set()
            assert self.claimed.wait(10)
            return False
        return Invalid("prepared: the test ends here") if command[0] == "prepare" else True


class WatchedLock:
    """The coordinator's one-change lock, calling `on_wait` the first time a request finds it held: what
    the test does then happens while the request waits, not after a guessed delay."""

    def __init__(self, lock, on_wait: Callable[[], None]):
        self._lock, self._on_wait = lock, on_wait

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking, timeout):
            return True
        on_wait, self._on_wait = self._on_wait, None
        if on_wait is not None:
            on_wait()
        return False

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


def when_the_request_waits(vc: ViewChange, action: Callable[[], None]) -> None:
    vc._busy = WatchedLock(vc._busy, action)


def take_over_in_the_background(vc: ViewChange) -> threading.Thread:
    change = {"number": 2, "coordinator": "127.0.0.1:9", "steps": 3, "phase": "copying", "plan": {}}
    thread = threading.Thread(target=vc.take_over, args=(change,))
    thread.start()
    assert vc._node.claiming.wait(10)
    return thread


def test_a_change_sent_while_a_take_over_claims_a_change_that_just_ended_waits_for_it_instead_of_a_409():
    node = ClaimingNode()
    vc = ViewChange(node, Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    taking_over = take_over_in_the_background(vc)
    assert vc.busy and vc.progress.phase == "taking over"   # what a client polling the status sees
    when_the_request_waits(vc, node.claimed.set)
    with pytest.raises(Conflict) as info:
        vc.remove_member("127.0.0.1:2")
    assert info.value.message == "prepared: the test ends here"
    assert [c[0] for c in node.proposed] == ["claim", "prepare"]
    assert (vc.progress.phase, vc.progress.error) == ("refused", "prepared: the test ends here")
    taking_over.join(10)
    assert not vc.busy


@pytest.mark.parametrize("meanwhile", ["a change committed", "a change rolled back after using new shard ids"])
def test_a_change_that_waited_while_the_configuration_changed_is_refused_without_a_prepare(meanwhile):
    node = ClaimingNode()
    vc = ViewChange(node, Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    taking_over = take_over_in_the_background(vc)

    def another_change_commits() -> None:
        if meanwhile == "a change committed":
            node._epoch = replace(node._epoch, number=node._epoch.number + 1)
        else:
            node._epoch = replace(node._epoch, max_shard_id=node._epoch.max_shard_id + 1)
        node.claimed.set()

    when_the_request_waits(vc, another_change_commits)
    with pytest.raises(Conflict) as info:
        vc.remove_member("127.0.0.1:2")
    assert "changed while this change waited" in info.value.message
    assert [c[0] for c in node.proposed] == ["claim"]
    taking_over.join(10)
    assert not vc.busy


def test_a_failing_check_after_the_wait_lets_go_of_the_node():
    node = ClaimingNode()
    vc = ViewChange(node, Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    taking_over = take_over_in_the_background(vc)
    checks = []

    def committed_configuration(deadline: float) -> tuple[dict | None, dict | None, int]:
        checks.append(1)                    # the request's own check passes; the one after the wait fails
        if len(checks) > 1:
            raise RuntimeError("the metadata read failed")
        return node._epoch.to_dict(), None, 0
    node.committed_configuration = committed_configuration
    when_the_request_waits(vc, node.claimed.set)
    with pytest.raises(RuntimeError):
        vc.remove_member("127.0.0.1:2")
    taking_over.join(10)
    assert not vc.busy


def test_a_change_waiting_for_the_node_gives_up_when_the_node_stops():
    node = ClaimingNode()
    vc = ViewChange(node, Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    taking_over = take_over_in_the_background(vc)
    when_the_request_waits(vc, vc.stop)
    try:
        with pytest.raises(Unavailable) as info:
            vc.remove_member("127.0.0.1:2")
        assert info.value.message == "the node is stopping"
        assert [c[0] for c in node.proposed] == ["claim"]
    finally:
        node.claimed.set()
        taking_over.join(10)


def test_the_replys_key_counts_are_taken_after_the_node_is_free_for_the_next_change(monkeypatch):
    vc = ViewChange(FakeNode(), Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    monkeypatch.setattr(vc, "_change", lambda plan, current: None)
    busy_while_counting = []
    monkeypatch.setattr(coordinator_module.settle, "shard_report",
                        lambda remote, epoch: busy_while_counting.append(vc.busy) or [])
    vc.remove_member("127.0.0.1:2")
    assert busy_while_counting == [False]


def test_a_node_held_past_the_bounded_wait_refuses_with_a_409(monkeypatch):
    monkeypatch.setattr(coordinator_module, "BUSY_WAIT_SECONDS", 0.2)
    node = ClaimingNode()
    vc = ViewChange(node, Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    taking_over = take_over_in_the_background(vc)
    try:
        with pytest.raises(Conflict) as info:
            vc.remove_member("127.0.0.1:2")
        assert info.value.message == "a view change is in progress on this node"
        assert [c[0] for c in node.proposed] == ["claim"]
    finally:
        node.claimed.set()
        taking_over.join(10)


class BehindNode(FakeNode):
    """A node that routes by epoch 1 of two nodes while the metadata group has committed epoch 2, in which
    a third node joined (it restarted and still replays the metadata log). A prepare is refused: far enough."""

    def __init__(self):
        super().__init__()
        self.committed = replace(ConfigEpoch.initial(("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"), 1), number=2)
        self.reads = 0

    def committed_configuration(self, deadline: float) -> tuple[dict | None, dict | None, int]:
        self.reads += 1
        return self.committed.to_dict(), None, 0

    def meta_epoch(self, number: int) -> ConfigEpoch | None:
        return self.committed if number == 2 else None

    def decisions(self) -> tuple[int, dict | None, dict | None] | None:
        return len(self.proposed), self.committed.to_dict(), None

    def propose_meta(self, command: tuple, deadline: float) -> object:
        self.proposed.append(command)
        return Invalid("prepared: the test ends here") if command[0] == "prepare" else True


def test_a_node_behind_the_metadata_group_plans_on_the_committed_epoch_not_its_own():
    node = BehindNode()
    vc = ViewChange(node, Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    with pytest.raises(Conflict, match="prepared: the test ends here"):
        vc.remove_member("127.0.0.1:3")                 # not in the node's own view: 400 before
    (prepare,) = [c for c in node.proposed if c[0] == "prepare"]
    assert prepare[1]["epoch"]["number"] == 3 and "127.0.0.1:3" not in prepare[1]["epoch"]["view"]
    assert not vc.busy


def test_a_node_that_cannot_read_the_committed_configuration_answers_503_and_proposes_nothing():
    node = FakeNode()

    def unreadable(deadline: float) -> tuple[dict | None, dict | None, int]:
        raise Unavailable("group meta: no read index before the deadline")
    node.committed_configuration = unreadable
    vc = ViewChange(node, Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    with pytest.raises(Unavailable):
        vc.remove_member("127.0.0.1:2")
    assert node.proposed == [] and not vc.busy


def test_a_bad_shard_count_is_refused_before_any_read():
    node = BehindNode()
    with pytest.raises(BadRequest, match="shard-count"):
        ViewChange(node, Remote(ScriptedForwarder())).reshard(0)
    assert node.reads == 0


def test_a_reshard_plans_on_the_one_configuration_it_counted_the_nodes_of():
    node = BehindNode()
    counted = node.committed
    node.committed = replace(plan_remove_member(counted, "127.0.0.1:3").epoch, status="active")   # then a change commits

    reads = iter([counted, node.committed, node.committed])
    node.committed_configuration = lambda deadline: (next(reads).to_dict(), None, 0)
    vc = ViewChange(node, Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    with pytest.raises(Conflict, match="changed while this change waited"):
        vc.reshard(1)                                   # 3 nodes counted, in 1 shard
    assert [c for c in node.proposed if c[0] == "prepare"] == []


def test_a_take_over_rolls_back_on_the_epoch_the_change_was_planned_on_when_the_node_routes_by_none():
    node = BehindNode()
    node._epoch = None                                  # restarted: no epoch adopted yet
    plan = plan_remove_member(node.committed, "127.0.0.1:3")
    vc = ViewChange(node, Remote(ScriptedForwarder(body={"phase": None}, reachable=True)))
    vc.take_over({"number": 3, "coordinator": "127.0.0.1:1", "steps": 2, "phase": "copying",
                  "plan": plan.to_dict()})
    assert [c[0] for c in node.proposed] == ["claim", "abort"]
    assert vc.progress.phase == "rolled back" and not vc.busy


# -- the protocol --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    Track(3, RING), Freeze(3, RING), Thaw(3), Own(3, "2", RING), DropKeys(3, ["a", "b"]),
    Install(3, "1", RING, RING, [("k", "v", 7)], [("rid", (("put", "k", "v"), "k", Written(False, 7))),
                                                 ("rid2", (("delete", "k"), "k", Deleted(True))),
                                                 ("rid3", (("put", "k", "w", "match", 3), "k", Mismatch(7, True)))],
            True, ["gone"], revision=9),
])
def test_every_group_command_survives_its_json_form_unchanged(command):
    wire = json.loads(json.dumps(command_to_json(command)))
    assert command_from_json(wire) == command
    assert command_from_json(wire).as_entry() == command.as_entry()


@pytest.mark.parametrize("body, words", [
    (["install", 3], "JSON object"),
    ({"op": "explode"}, "not a view-change command"),
    ({"op": "thaw"}, "epoch is missing"),
    ({"op": "thaw", "epoch": True}, "non-negative integer"),
    ({"op": "freeze", "epoch": 3, "new_ring": {"groups": "12", "vnodes": 8}}, "must be a ring"),
    ({"op": "drop-keys", "epoch": 3, "keys": [1, 2]}, "list of keys"),
    ({"op": "install", "epoch": 3, "source": "1", "old_ring": RING, "new_ring": RING, "items": [["k"]],
      "dedup": [], "clear": True}, "value, version"),
    ({"op": "install", "epoch": 3, "source": "1", "old_ring": RING, "new_ring": RING, "items": [["k", "v", -1]],
      "dedup": [], "clear": True}, "value, version"),
    ({"op": "install", "epoch": 3, "source": "1", "old_ring": RING, "new_ring": RING, "items": [],
      "dedup": [], "clear": True, "revision": "9"}, "non-negative integer"),
    ({"op": "install", "epoch": 3, "source": "1", "old_ring": RING, "new_ring": RING, "items": [],
      "dedup": [["rid", "not a list", "k", ["Written", False]]], "clear": True}, "deduplication rows"),
])
def test_malformed_group_commands_are_refused_before_the_log(body, words):
    with pytest.raises(ValueError, match=words):
        command_from_json(body)


def test_a_command_its_state_machine_refuses_raises_instead_of_passing_for_a_success():
    forwarder = ScriptedForwarder(status=409, body={"error": "thaw: malformed 'thaw' command"})
    remote = Remote(forwarder)
    with pytest.raises(StepRefused, match="malformed"):
        remote.command(FakeNode().epoch, "1", Thaw(3))
    assert forwarder.sent[0][2] == "/internal/groups/1/commands"


def test_epochs_are_checked_when_received():
    good = ConfigEpoch.initial(("127.0.0.1:1",), 1).to_dict()
    assert Epochs.from_json({"active": good, "pending": None}).active == good
    for bad in ({"active": {"number": 99}}, {"active": good, "pending": good}, {"active": "x"}):
        with pytest.raises(ValueError):
            Epochs.from_json(bad)


def test_exports_and_statuses_round_trip():
    exported = Exported([("k", "v", 3), (b"\xff\x00", bytes(range(256)), 4), ("s", b"", 5)], ["gone", b"\x80"],
                        [("rid", (("put", "k", "v"), "k", Written(True))),
                         ("rid#0", (("set", "ab"), b"\xfe", Written(False, 4)))], 7)
    assert Exported.from_json(json.loads(json.dumps(exported.to_json()))) == exported
    # rows of nodes older than versions: version 0
    assert Exported.from_json({"items": [["k", "v"]], "deleted": [], "dedup": [], "number": 1}).items == [("k", "v", 0)]
    for bad in ([["k", {"b64": "!!"}, 1]], [["k", {"b64": "AA==", "x": 1}, 1]], [[1, "v", 1]], [["k", "v", -1]]):
        with pytest.raises(ValueError):
            Exported.from_json({"items": bad, "deleted": [], "dedup": [], "number": 1})
    request = ExportRequest("1", RING, RING, "2", since=4)
    assert ExportRequest.from_json(request.to_json(), True) == request
    status = NodeStatus.from_json({"epoch": 3, "shard-id": "2", "groups": {"shard-5": {"leader": "h:1",
                                                                                        "members": ["h:1"]}}})
    assert status.hosted_shards() == {"2", "5"} and status.groups["shard-5"].leader == "h:1"


# -- copies --------------------------------------------------------------------------------------------------

def test_install_batches_stay_under_the_chunk_size_and_keep_every_row_in_order():
    items = [[f"key-{i}", "x" * 100] for i in range(20_000)]
    dedup = [[f"rid-{i}", ["put", f"key-{i}", "x"], f"key-{i}", ["Written", False]] for i in range(20_000)]
    deleted = [f"gone-{i}" for i in range(5_000)]
    cut = batches(items, dedup, deleted)
    assert len(cut) > 10
    assert [row for b in cut for row in b[0]] == items
    assert [row for b in cut for row in b[1]] == dedup
    assert [row for b in cut for row in b[2]] == deleted
    assert all(len(json.dumps(b)) < 2 * CHUNK_BYTES for b in cut)


def test_an_empty_range_is_still_one_install_that_clears():
    assert batches([], [], []) == [([], [], [])]
