"""The times kvs sets inside PySyncObj are on PySyncObj's own clock.

PySyncObj reads its deadlines on `pysyncobj.monotonic` (CLOCK_MONOTONIC_RAW on Linux), not on
time.monotonic() (CLOCK_MONOTONIC, which NTP adjusts): on one machine here the two were 0.26 s apart two
minutes after its boot. A time set on the wrong one is off by their difference. Each test runs with
time.monotonic() ten seconds away from PySyncObj's clock, and checks the time where PySyncObj reads it.
Replicas are built without their constructor: only the attributes each method reads are set.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from pysyncobj import SyncObj
from pysyncobj.monotonic import monotonic as pysyncobj_clock

from kvs.raft.joiner import JoinerQuorum
from kvs.raft.loop_replica import LoopReplica
from kvs.raft.replica import Replica


@pytest.fixture
def other_clock_off_by(monkeypatch):
    """time.monotonic() made `offset` seconds away from PySyncObj's clock."""
    def set_offset(offset: float) -> None:
        monkeypatch.setattr(time, "monotonic", lambda: pysyncobj_clock() + offset)
    return set_offset


def test_a_held_replica_does_not_campaign_before_a_whole_election_timeout_on_pysyncobj_s_clock(
        other_clock_off_by):
    # A promoted learner holds its election until it hears a leader (change 5): its deadline is pushed a
    # whole timeout ahead at each tick. On a clock 10 s behind, it would be in the past: a campaign at once.
    other_clock_off_by(-10.0)
    replica = Replica.__new__(Replica)
    replica._SyncObj__conf = SimpleNamespace(raftMaxTimeout=1.5)
    replica._hold = True
    replica._getLeader = lambda: None
    replica._hold_election()
    assert replica._SyncObj__raftElectionDeadline - pysyncobj_clock() == pytest.approx(1.5, abs=0.5)


class _Node:
    def __init__(self, node_id: str):
        self.id = node_id


def test_a_joiner_s_grace_from_the_leader_s_step_down_starts_now_on_pysyncobj_s_clock(other_clock_off_by):
    # A leader steps down when a majority has not answered for leaderFallbackTimeout, read on PySyncObj's
    # clock; a joiner that does not count yet is given its grace by a fresh last-response time. On a clock
    # 10 s behind, the grace would have run out already.
    other_clock_off_by(-10.0)
    nodes = [_Node("b"), _Node("c"), _Node("d")]
    raft = SimpleNamespace(
        _SyncObj__otherNodes=set(nodes), _SyncObj__raftMatchIndex={n: 0 for n in nodes},
        _SyncObj__lastResponseTime={}, raftCurrentTerm=3, raftCommitIndex=9,
        _SyncObj__getEntries=lambda index, count: [(b"", index, 3)],
        _SyncObj__getCurrentLogIndex=lambda: 10, _isLeader=lambda: True)
    quorum = JoinerQuorum(raft)
    quorum.on_proposed(("add", "d"), 10)
    quorum.commit_before_tick()
    assert list(raft._SyncObj__lastResponseTime) == [nodes[2]]
    assert raft._SyncObj__lastResponseTime[nodes[2]] == pytest.approx(pysyncobj_clock(), abs=0.5)


def test_a_leader_on_the_event_loop_sends_its_next_heartbeat_a_period_from_now_on_pysyncobj_s_clock(
        other_clock_off_by, monkeypatch):
    # Loop mode (KVS_RAFT_ON_LOOP=on) sets when PySyncObj sends the next AppendEntries. On a clock 10 s
    # ahead the followers would hear nothing for 10 s and elect another leader; on one behind, the leader
    # would send at every iteration.
    other_clock_off_by(10.0)
    replica = LoopReplica.__new__(LoopReplica)
    replica._SyncObj__conf = SimpleNamespace(appendEntriesPeriod=0.05)
    monkeypatch.setattr(SyncObj, "_SyncObj__sendAppendEntries", lambda self: None)
    replica._SyncObj__sendAppendEntries()
    assert replica._SyncObj__newAppendEntriesTime - pysyncobj_clock() == pytest.approx(0.05, abs=0.5)
    assert replica.conf.appendEntriesPeriod == 0.05       # its send budget put back
