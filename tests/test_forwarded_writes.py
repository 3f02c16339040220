"""A follower's writes reach its leader on the Raft connection (`kvs.raft.forwarding`).

The protocol's rules against a scripted replica (no sockets): what is sent to whom, what comes back
as None (no leader, leading now, the leader changed or stayed silent, a malformed or unled message),
an answer from another node is ignored, and a leader that never answers (an older version) is asked
again only by a probe after a pause, unless it announced in its handshake that it answers forwards.
Then on real replicas on tick threads, with writes from a uvloop loop as a node's key path sends
them: a follower's writes of one loop iteration become one entry of the leader's log and come back
with their results, a write forwarded twice is applied once, a forward to a leader that is gone
comes back None and the write then commits through the new one, and on a cluster with a secret a
silent leader that announced forwards is asked again while one of an earlier version is not.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from pysyncobj.config import FAIL_REASON

import kvs.raft.replica
from kvs.fsm.shard import ShardState, Written
from kvs.raft import forwarding, storage, wire
from kvs.raft.forwarding import FORWARD, RESULT, Forwarding
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.loop import LoopGroup
from kvs.raft.transport import RaftTransport, _RaftConnection
from kvs.testing.cluster import find_free_base_port, wait_until
from tests.test_commit_notice import three_replicas
from tests.test_fsync import leader_of
from tests.test_loop_poller import running_loop
from tests.test_read_index import ScriptedRaft as ReadIndexRaft


class ScriptedRaft(ReadIndexRaft):
    """What Forwarding uses of the replica, set by the test: ReadIndex's scripted replica, plus proposals."""

    def __init__(self, leader: bool = False, leader_node: str | None = "L"):
        super().__init__(others=2, leader=leader)
        self.leader_node = leader_node
        self.proposed: list[tuple[object, object]] = []     # (command, callback)
        self.held = 0
        self.announced: set[str] = set()      # nodes whose handshake said they answer forwards

    def answers_forwards(self, node) -> bool:
        # Stands in for RaftTransport.answers_forwards: ReadIndex's ScriptedRaft is its own _SyncObj__transport.
        return node in self.announced

    def submit(self, command, callback, from_handler=False) -> None:
        assert from_handler             # the leader proposes from its message handler: no wake-up needed
        self.proposed.append((command, callback))

    def hold_commit_send(self) -> None:
        self.held += 1


def forward(fwd: Forwarding, commands: list) -> list:
    outcome: list = []
    fwd.request(commands, outcome.append)
    return outcome


PUT = ("put", "r1", "k", "v", None)


def test_a_follower_sends_what_arrived_to_its_leader_and_hands_the_results_to_the_caller():
    raft = ScriptedRaft()
    fwd = Forwarding(raft)
    first, second = forward(fwd, [PUT]), forward(fwd, [PUT, PUT])
    fwd.on_tick()
    assert [(node, m["type"], m["commands"]) for node, m in raft.sent] == [("L", FORWARD, [PUT]),
                                                                           ("L", FORWARD, [PUT, PUT])]
    ids = [m["id"] for _, m in raft.sent]
    assert len(set(ids)) == 2
    fwd.on_message("L", {"type": RESULT, "id": ids[1], "results": ["a", "b"]})
    assert (first, second) == ([], [["a", "b"]])
    fwd.on_message("L", {"type": RESULT, "id": ids[0], "results": None})
    assert first == [None]


def test_without_a_leader_or_when_leading_the_caller_gets_none_at_once():
    for raft in (ScriptedRaft(leader_node=None), ScriptedRaft(leader=True)):
        fwd = Forwarding(raft)
        outcome = forward(fwd, [PUT])
        fwd.on_tick()
        assert outcome == [None] and raft.sent == []


def test_a_forward_is_handed_back_when_the_leader_changes_or_stays_silent(monkeypatch):
    raft = ScriptedRaft()
    fwd = Forwarding(raft)
    changed = forward(fwd, [PUT])
    fwd.on_tick()
    raft.leader_node = "L2"
    fwd.on_tick()
    assert changed == [None]
    silent = forward(fwd, [PUT])
    fwd.on_tick()
    assert silent == [] and raft.sent[-1][0] == "L2"
    now = time.monotonic()
    monkeypatch.setattr(forwarding.time, "monotonic", lambda: now + forwarding.FORWARD_SECONDS + 1)
    fwd.on_tick()
    assert silent == [None]


class Clock:
    """forwarding's time.monotonic, moved by the test."""

    def __init__(self, monkeypatch):
        self.now = time.monotonic()
        monkeypatch.setattr(forwarding.time, "monotonic", lambda: self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def unanswered(clock: Clock, fwd: Forwarding) -> list:
    """One forward sent and left unanswered past FORWARD_SECONDS: its outcome."""
    outcome = forward(fwd, [PUT])
    fwd.on_tick()
    clock.advance(forwarding.FORWARD_SECONDS + 0.1)
    fwd.on_tick()
    return outcome


def test_a_leader_that_never_answers_is_not_asked_again_until_a_probe_after_a_pause(monkeypatch):
    # An older leader ignores kvs_forward: one write waits FORWARD_SECONDS, then the others are handed
    # back at once (the caller proposes them through PySyncObj) until a probe finds it answering.
    clock, raft = Clock(monkeypatch), ScriptedRaft()
    fwd = Forwarding(raft)
    first = unanswered(clock, fwd)
    assert first == [None]
    during = forward(fwd, [PUT])
    fwd.on_tick()
    assert during == [None] and len(raft.sent) == 1
    clock.advance(forwarding.PROBE_SECONDS)
    probe, behind_it = forward(fwd, [PUT]), forward(fwd, [PUT])
    fwd.on_tick()
    assert len(raft.sent) == 2 and probe == [] and behind_it == [None]
    fwd.on_message("L", {"type": RESULT, "id": raft.sent[1][1]["id"], "results": ["ok"]})
    assert probe == [["ok"]]
    after = forward(fwd, [PUT])
    fwd.on_tick()
    assert len(raft.sent) == 3 and after == []


def test_a_forward_handed_back_after_a_silence_finds_the_leader_marked_silent_already(monkeypatch):
    # The caller (the event loop, on another thread) may go on at once: its next write must not be sent to
    # the leader that has just left one unanswered, which it would be if the mark came after the hand-back.
    clock, raft = Clock(monkeypatch), ScriptedRaft()
    fwd = Forwarding(raft)
    seen: list[bool] = []
    fwd.request([PUT], lambda results: seen.append("L" in fwd._silent))
    fwd.on_tick()
    clock.advance(forwarding.FORWARD_SECONDS + 0.1)
    fwd.on_tick()
    assert seen == [True]


def test_a_probe_left_unanswered_keeps_the_leader_silent_for_another_pause(monkeypatch):
    clock, raft = Clock(monkeypatch), ScriptedRaft()
    fwd = Forwarding(raft)
    unanswered(clock, fwd)
    clock.advance(forwarding.PROBE_SECONDS)
    probe = unanswered(clock, fwd)
    assert probe == [None]
    clock.advance(forwarding.PROBE_SECONDS - forwarding.FORWARD_SECONDS - 1)
    still = forward(fwd, [PUT])
    fwd.on_tick()
    assert still == [None] and len(raft.sent) == 2


def test_a_leader_that_answered_before_is_forgiven_one_silence_not_two(monkeypatch):
    clock, raft = Clock(monkeypatch), ScriptedRaft()
    fwd = Forwarding(raft)
    answered = forward(fwd, [PUT])
    fwd.on_tick()
    fwd.on_message("L", {"type": RESULT, "id": raft.sent[0][1]["id"], "results": ["ok"]})
    for sent in (2, 3):                     # a pause of the leader: each forward waits and comes back None
        waited = unanswered(clock, fwd)
        assert len(raft.sent) == sent
        assert waited == [None]
    handed_back = forward(fwd, [PUT])
    fwd.on_tick()
    assert answered == [["ok"]] and handed_back == [None] and len(raft.sent) == 3


def test_a_leader_that_announced_forwards_is_forgiven_its_first_silence_though_it_never_answered(monkeypatch):
    # Its silence is a pause or a busy spell (a new leader catching up), not a version that ignores
    # forwards; a second silence in a row still marks it, so a leader that stays slow is not asked again
    # and again. An answer restores its standing.
    clock, raft = Clock(monkeypatch), ScriptedRaft()
    raft.announced.add("L")
    fwd = Forwarding(raft)
    assert unanswered(clock, fwd) == [None]
    assert unanswered(clock, fwd) == [None] and len(raft.sent) == 2, "asked again after its first silence"
    during = forward(fwd, [PUT])
    fwd.on_tick()
    assert during == [None] and len(raft.sent) == 2, "marked silent after its second"
    clock.advance(forwarding.PROBE_SECONDS)
    probe = forward(fwd, [PUT])
    fwd.on_tick()
    fwd.on_message("L", {"type": RESULT, "id": raft.sent[2][1]["id"], "results": ["ok"]})
    assert probe == [["ok"]]
    assert unanswered(clock, fwd) == [None]
    after = forward(fwd, [PUT])
    fwd.on_tick()
    assert len(raft.sent) == 5 and after == [], "forgiven one silence again once it answered"


def test_a_forward_that_cannot_be_sent_to_the_leader_is_handed_back_at_once():
    raft = ScriptedRaft()
    raft.send = lambda node, message: (raft.sent.append((node, message)), False)[1]    # not connected
    fwd = Forwarding(raft)
    outcome = forward(fwd, [PUT])
    fwd.on_tick()
    assert outcome == [None] and len(raft.sent) == 1
    fwd.on_message("L", {"type": RESULT, "id": raft.sent[0][1]["id"], "results": ["late"]})
    assert outcome == [None]                # nothing waits for it any more


def test_an_answer_from_a_node_that_was_not_asked_is_ignored():
    raft = ScriptedRaft()
    fwd = Forwarding(raft)
    outcome = forward(fwd, [PUT])
    fwd.on_tick()
    rid = raft.sent[0][1]["id"]
    fwd.on_message("X", {"type": RESULT, "id": rid, "results": ["forged"]})
    fwd.on_message("L", {"type": RESULT, "id": rid + 1, "results": ["unknown id"]})
    assert outcome == []
    fwd.on_message("L", {"type": RESULT, "id": rid, "results": ["ok"]})
    assert outcome == [["ok"]]


def test_the_leader_proposes_a_forward_as_one_batch_and_answers_its_results_on_commit():
    raft = ScriptedRaft(leader=True)
    fwd = Forwarding(raft)
    fwd.on_message("F", {"type": FORWARD, "id": 7, "commands": [PUT, PUT]})
    [(command, callback)] = raft.proposed
    assert command == ("batch", [PUT, PUT]) and raft.sent == []
    callback([Written(False, 1), Written(True, 2)], FAIL_REASON.SUCCESS)
    assert raft.sent == [("F", {"type": RESULT, "id": 7, "results": [Written(False, 1), Written(True, 2)]})]
    assert raft.held == 1           # nobody waits for that commit index: it rides on the next AppendEntries
    fwd.on_message("F", {"type": FORWARD, "id": 8, "commands": [PUT]})
    raft.proposed[-1][1](None, FAIL_REASON.LEADER_CHANGED)
    assert raft.sent[-1] == ("F", {"type": RESULT, "id": 8, "results": None})


@pytest.mark.parametrize("message", [
    {"type": FORWARD, "id": 1, "commands": []},
    {"type": FORWARD, "id": 1, "commands": [PUT] * (forwarding.MAX_COMMANDS + 1)},
    {"type": FORWARD, "id": 1, "commands": [list(PUT)]},
    {"type": FORWARD, "id": 1, "commands": "put"},
    {"type": FORWARD, "id": "1", "commands": [PUT]},
    {"type": FORWARD, "id": 1},
])
def test_a_malformed_forward_proposes_nothing_and_is_answered_none(message):
    raft = ScriptedRaft(leader=True)
    Forwarding(raft).on_message("F", message)
    assert raft.proposed == [] and raft.sent == [("F", {"type": RESULT, "id": message.get("id"),
                                                        "results": None})]


def test_a_replica_that_does_not_lead_answers_none_and_proposes_nothing():
    raft = ScriptedRaft()
    Forwarding(raft).on_message("F", {"type": FORWARD, "id": 3, "commands": [PUT]})
    assert raft.proposed == [] and raft.sent == [("F", {"type": RESULT, "id": 3, "results": None})]


def test_closing_hands_every_waiting_forward_back():
    raft = ScriptedRaft()
    fwd = Forwarding(raft)
    sent, queued = forward(fwd, [PUT]), None
    fwd.on_tick()
    queued = forward(fwd, [PUT])
    fwd.fail_all()
    assert sent == [None] and queued == [None]


# -- real replicas -----------------------------------------------------------------------------------

QUICK = RaftTiming(compaction_entries=10**9, compaction_seconds=10**9)


@pytest.fixture
def groups(tmp_path):
    with three_replicas(tmp_path, "fwd", QUICK) as replicas:
        yield replicas


def settled(groups: list[RaftGroup]) -> tuple[RaftGroup, list[RaftGroup]]:
    """The leader and its followers, once every follower knows it and the no-op committed."""
    leader = wait_until(lambda: leader_of(groups), 30, message="one leader")
    followers = [g for g in groups if g is not leader]
    wait_until(lambda: all(f.leader() == leader.self_address for f in followers) and
               all(g.commit_index >= leader._replica._SyncObj__raftLog[-1][1] for g in groups), 10,
               message="the followers know the leader")
    return leader, followers


def put(i: int, value: str = "v") -> tuple:
    return ("put", f"id-{i}", f"k{i}", f"{value}{i}", None)


def on_loop(loop, coroutine, timeout: float = 20):
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)


def test_a_follower_s_writes_of_one_loop_iteration_are_one_leader_entry_answered_with_their_results(groups):
    leader, (follower, _) = settled(groups)
    before = leader._replica._SyncObj__raftLog[-1][1]
    with running_loop() as loop:
        replica = LoopGroup(follower, loop)

        async def together():
            deadline = time.monotonic() + 10
            return await asyncio.gather(*(replica.forward(put(i), deadline) for i in range(5)))
        results = on_loop(loop, together())
    assert all(isinstance(r, Written) and not r.replaced for r in results), results
    assert leader._replica._SyncObj__raftLog[-1][1] == before + 1       # one batch entry, proposed by the leader
    for i in range(5):
        assert leader.state.read_versioned(f"k{i}") == (f"v{i}", results[i].version)


def test_the_leader_appends_a_forward_in_the_tick_after_its_handler_without_writing_itself_a_wake_up(groups):
    leader, (follower, _) = settled(groups)
    tick_thread = leader._replica._SyncObj__thread.ident
    wakes: list[int] = []
    wake = leader._replica._wake
    leader._replica._wake = lambda: (wakes.append(threading.get_ident()), wake())
    before = leader._replica._SyncObj__raftLog[-1][1]
    with running_loop() as loop:
        replica = LoopGroup(follower, loop)
        result = on_loop(loop, replica.forward(put(1), time.monotonic() + 10))
    assert isinstance(result, Written) and leader._replica._SyncObj__raftLog[-1][1] == before + 1
    assert tick_thread not in wakes


def test_a_command_proposed_by_a_handler_still_wakes_the_tick_thread_for_another_thread_s_command(monkeypatch):
    replica = kvs.raft.replica.Replica.__new__(kvs.raft.replica.Replica)
    replica._quiet_thread = None
    wakes: list[int] = []
    replica._wake = lambda: wakes.append(threading.get_ident())

    def queued(self, command, callback, command_type=None):
        if command == "handler's":      # meanwhile another thread (the event loop) proposes
            other = threading.Thread(target=replica._applyCommand, args=("loop's", None))
            other.start()
            other.join()
    monkeypatch.setattr(kvs.raft.replica.SyncObj, "_applyCommand", queued)
    replica._apply = lambda command, callback: replica._applyCommand(command, callback)
    replica.submit("handler's", None, from_handler=True)
    assert len(wakes) == 1 and wakes[0] != threading.get_ident()       # the loop's command woke it
    replica.submit("another", None)
    assert wakes[-1] == threading.get_ident() and replica._quiet_thread is None


def test_a_tick_that_stopped_appending_at_its_period_wakes_itself_for_the_commands_left(monkeypatch):
    # PySyncObj's _checkCommandsToApply appends for at most appendEntriesPeriod; a handler's proposal left
    # in the queue wrote no wake-up of its own, and would wait for a timer tick.
    replica = kvs.raft.replica.Replica.__new__(kvs.raft.replica.Replica)
    replica._SyncObj__conf = SimpleNamespace(appendEntriesPeriod=0.005)
    wakes: list[int] = []
    replica._wake = lambda: wakes.append(1)
    now, took = [100.0], [0.0]          # PySyncObj's clock, and how long the appends take on it
    monkeypatch.setattr(kvs.raft.replica, "pysyncobj_clock", lambda: now[0])

    def appends(self):
        now[0] += took[0]
    monkeypatch.setattr(kvs.raft.replica.SyncObj, "_checkCommandsToApply", appends)
    took[0] = 0.004
    replica._checkCommandsToApply()
    assert wakes == []                  # it emptied the queue within the period: nothing left
    took[0] = 0.006                     # it appended for the whole period: it stopped there
    replica._checkCommandsToApply()
    assert wakes == [1]


def test_a_write_forwarded_twice_is_applied_once(groups):
    leader, (follower, _) = settled(groups)
    with running_loop() as loop:
        replica = LoopGroup(follower, loop)
        first = on_loop(loop, replica.forward(put(1), time.monotonic() + 10))
        again = on_loop(loop, replica.forward(put(1), time.monotonic() + 10))
    assert isinstance(first, Written) and again == first
    assert leader.state.read_versioned("k1")[0] == "v1"


def test_a_forward_to_a_leader_that_is_gone_comes_back_none_and_the_write_commits_through_the_new_one(groups):
    leader, followers = settled(groups)
    leader.close()
    groups.remove(leader)           # closed once
    with running_loop() as loop:
        replica = LoopGroup(followers[0], loop)
        started = time.monotonic()
        outcome = on_loop(loop, replica.forward(put(9), time.monotonic() + 10))
        assert outcome is None or isinstance(outcome, Written)   # None unless a new leader took it in time
        assert time.monotonic() - started < forwarding.FORWARD_SECONDS + 2
        result = on_loop(loop, replica.execute(put(9), time.monotonic() + 20), 30)
    assert isinstance(result, Written) and (outcome is None or result == outcome)
    new_leader = wait_until(lambda: leader_of(groups), 30, message="a new leader")
    wait_until(lambda: new_leader.state.read_versioned("k9")[0] == "v9", 10, message="k9 applied")


def test_a_follower_of_a_leader_that_ignores_forwards_waits_once_then_proposes_the_next_writes_at_once(groups):
    # A rolling upgrade: the leader still runs a version without forwarded writes, which ignores them.
    leader, (follower, _) = settled(groups)
    leader._replica._side_messages.pop(forwarding.FORWARD)
    with running_loop() as loop:
        replica = LoopGroup(follower, loop)
        started = time.monotonic()
        assert on_loop(loop, replica.forward(put(1), started + 10)) is None
        assert time.monotonic() - started >= forwarding.FORWARD_SECONDS
        started = time.monotonic()
        assert on_loop(loop, replica.forward(put(2), started + 10)) is None
        assert time.monotonic() - started < forwarding.FORWARD_SECONDS / 2
        results = [on_loop(loop, replica.execute(put(i), time.monotonic() + 20), 30) for i in (1, 2)]
    assert all(isinstance(r, Written) for r in results), results
    for i in (1, 2):
        wait_until(lambda i=i: leader.state.read_versioned(f"k{i}")[0] == f"v{i}", 10, message=f"k{i} applied")


class _EarlierConnection(_RaftConnection):
    """A connection of a kvs version that reads wire version 2 but does not announce forwards."""

    key_prefix = wire.CAPABLE


class _EarlierTransport(RaftTransport):
    connection_class = _EarlierConnection


@contextmanager
def secured_replicas(tmp_path, monkeypatch, transport: type[RaftTransport]):
    """Three real replicas on a cluster with a secret (so with handshake keys), of `transport`'s kind."""
    storage.install()
    base = find_free_base_port(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    with monkeypatch.context() as patched:
        patched.setattr(kvs.raft.replica, "RaftTransport", transport)
        replicas = [RaftGroup("fwd", a, addresses, ShardState(), str(tmp_path / f"r{i}"), "forward-test-secret",
                              QUICK) for i, a in enumerate(addresses)]
    try:
        yield replicas
    finally:
        for g in replicas:
            g.close()


@pytest.mark.parametrize("announced", [True, False], ids=["announced", "an-earlier-version"])
def test_on_a_secured_cluster_a_silent_leader_that_announced_forwards_is_asked_again_once_and_an_earlier_one_is_not(
        tmp_path, monkeypatch, announced):
    with secured_replicas(tmp_path, monkeypatch, RaftTransport if announced else _EarlierTransport) as groups:
        leader, (follower, _) = settled(groups)
        transport = follower._replica._SyncObj__transport
        leader_node = follower._replica._getLeader()
        assert transport.answers_forwards(leader_node) is announced
        leader._replica._side_messages.pop(forwarding.FORWARD)      # it stays silent (paused, or ignores them)
        silent = follower._replica._forwarding._silent
        with running_loop() as loop:
            replica = LoopGroup(follower, loop)
            started = time.monotonic()
            assert on_loop(loop, replica.forward(put(1), started + 10)) is None
            assert time.monotonic() - started >= forwarding.FORWARD_SECONDS
            assert (leader_node in silent) is not announced
            started = time.monotonic()
            assert on_loop(loop, replica.forward(put(2), started + 10)) is None
            waited = time.monotonic() - started
            if announced:
                assert waited >= forwarding.FORWARD_SECONDS, "asked again, not taken for an older version"
            else:
                assert waited < forwarding.FORWARD_SECONDS / 2, "marked silent after its first silence"
            assert leader_node in silent        # either way now: silent twice, or never answered
            results = [on_loop(loop, replica.execute(put(i), time.monotonic() + 20), 30) for i in (1, 2)]
        assert all(isinstance(r, Written) for r in results), results
