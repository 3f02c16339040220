"""How followers learn a commit index that the event loop's writes moved (replica change 2, `hold_commit_send`).

Real replicas on tick threads (the default mode) on 127.0.0.1 ports; writes and reads come from a uvloop
loop in a thread of the test through `LoopGroup`, as a node's key path sends them. Heartbeats are slow
here (one a second), so what arrives sooner than a heartbeat was sent for a reason."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Iterator

import pytest

from kvs.fsm.shard import ShardState
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.loop import LoopGroup
from kvs.testing.cluster import find_free_base_port, wait_until
from tests.test_fsync import leader_of
from tests.test_loop_poller import running_loop

SLOW_HEARTBEAT = RaftTiming(heartbeat=1.0, election_min=3.5, election_max=5.0, leader_fallback=8.0,
                            connection_timeout=8.0, compaction_entries=10**9, compaction_seconds=10**9)


@contextlib.contextmanager
def three_replicas(tmp_path, name: str, timing: RaftTiming) -> Iterator[list[RaftGroup]]:
    """A group of three real replicas on 127.0.0.1, closed on the way out (a test may close one itself and
    take it out of the list)."""
    base = find_free_base_port(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    groups = [RaftGroup(name, a, addresses, ShardState(), str(tmp_path / f"r{i}"), None, timing)
              for i, a in enumerate(addresses)]
    try:
        yield groups
    finally:
        for g in groups:
            g.close()


@pytest.fixture
def groups(tmp_path):
    with three_replicas(tmp_path, "notice", SLOW_HEARTBEAT) as replicas:
        yield replicas


def settled_leader(groups: list[RaftGroup]) -> RaftGroup:
    """The leader, once every replica knows its first entry (the no-op) committed: nothing is in flight."""
    leader = wait_until(lambda: leader_of(groups), 30, message="one leader")
    last = leader._replica._SyncObj__raftLog[-1][1]
    wait_until(lambda: all(g.commit_index >= last for g in groups), 10, message="the no-op committed everywhere")
    return leader


def record_sends(group: RaftGroup) -> list[tuple[int, int]]:
    """(last log index, commit index) of every AppendEntries round the group's replica sends."""
    replica = group._replica
    sends: list[tuple[int, int]] = []
    send = replica._SyncObj__sendAppendEntries

    def recording_send() -> None:       # on the tick thread
        sends.append((replica._SyncObj__raftLog[-1][1], replica.raftCommitIndex))
        send()
    replica._SyncObj__sendAppendEntries = recording_send
    return sends


def write(loop, group: LoopGroup, i: int) -> None:
    asyncio.run_coroutine_threadsafe(group.execute(("put", f"id-{i}", f"k{i}", f"v{i}"), time.monotonic() + 10),
                                     loop).result(20)


def test_a_commit_answered_on_the_loop_rides_on_the_next_write_instead_of_a_message_of_its_own(groups):
    leader = settled_leader(groups)
    sends = record_sends(leader)
    with running_loop() as loop:
        replica = LoopGroup(leader, loop)
        indexes = []
        for i in range(5):
            write(loop, replica, i)
            indexes.append(leader.commit_index)
        rounds = list(sends)
    # each write's entry left once, carrying the commit index of the write before it; none left for a
    # commit index alone (a heartbeat would, after a second of quiet: the writes took far less)
    assert [log for log, _ in rounds] == indexes, rounds
    assert [commit for _, commit in rounds[1:]] == indexes[:-1], rounds


def test_followers_learn_the_last_commit_from_the_heartbeat(groups):
    leader = wait_until(lambda: leader_of(groups), 30, message="one leader")
    with running_loop() as loop:
        write(loop, LoopGroup(leader, loop), 0)
    committed = leader.commit_index
    wait_until(lambda: all(g.commit_index >= committed for g in groups), 3 * SLOW_HEARTBEAT.heartbeat,
               message="the followers learnt the last commit index")


def test_a_read_through_a_follower_right_after_a_write_sees_it_without_waiting_for_the_heartbeat(groups):
    leader = wait_until(lambda: leader_of(groups), 30, message="one leader")
    follower = next(g for g in groups if g is not leader)
    with running_loop() as loop:
        for i in range(5):
            write(loop, LoopGroup(leader, loop), i)
            started = time.monotonic()
            value = asyncio.run_coroutine_threadsafe(
                LoopGroup(follower, loop).read(lambda state, i=i: state.read_versioned(f"k{i}"),
                                               time.monotonic() + 10), loop).result(20)
            took = time.monotonic() - started
            assert f"v{i}" in repr(value), value
            # the leader sent the commit index before the read index; a heartbeat would take a second
            assert took < SLOW_HEARTBEAT.heartbeat / 2, f"read {i} took {took:.3f}s"
