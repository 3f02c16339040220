"""What a replica on the event loop does off the loop (KVS_RAFT_ON_LOOP=on): installing a snapshot the
leader sent, loading its own snapshot at start, and resolving host names (kvs.raft.loop_replica,
kvs.raft.loop_poller.run_off_loop, kvs.raft.resolver).

Real replicas on 127.0.0.1 ports, driven by one uvloop loop in a thread of the test."""

from __future__ import annotations

import threading
import time

import pytest

from kvs.fsm.shard import ShardState
from kvs.raft import loop_replica
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.resolver import BackgroundResolver
from kvs.testing.cluster import find_free_base_port, wait_until
from tests.test_fsync import leader_of, write_concurrently
from tests.test_loop_poller import on_loop, running_loop

COMPACT_OFTEN = RaftTiming(compaction_entries=40, compaction_seconds=10**9)
NEVER_COMPACT = RaftTiming(compaction_entries=10**9, compaction_seconds=10**9)


@pytest.fixture
def loop():
    with running_loop() as loop:
        yield loop


class GatedState(ShardState):
    """A shard state whose restore (a snapshot install) waits for the test, and says on which thread
    it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.restoring = threading.Event()
        self.release = threading.Event()
        self.restore_threads: list[int] = []

    def restore(self, snapshot: dict) -> None:
        self.restore_threads.append(threading.get_ident())
        self.restoring.set()
        if not self.release.wait(30):
            raise AssertionError("the test never released the install")
        super().restore(snapshot)


def put(group: RaftGroup, i: int) -> None:
    group.execute(("put", f"id-{i}", f"k{i}", "v" * 32), time.monotonic() + 10)


def test_a_snapshot_from_the_leader_is_installed_off_the_loop_while_the_loop_keeps_serving(tmp_path, loop):
    base = find_free_base_port(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]

    def open_group(i: int, state: ShardState) -> RaftGroup:
        return RaftGroup("offload", addresses[i], addresses, state, str(tmp_path / f"r{i}"), None,
                         COMPACT_OFTEN, loop=loop)

    groups = [open_group(0, ShardState()), open_group(1, ShardState())]
    try:
        leader = wait_until(lambda: leader_of(groups), 20, message="a leader of two")
        for i in range(200):            # several compactions: the third replica can only get a snapshot
            put(leader, i)
        wait_until(lambda: leader.status()["log-length"] < 200, 20, message="the leader compacted its log")

        gated = GatedState()
        groups.append(open_group(2, gated))
        assert gated.restoring.wait(20), "the third replica was never sent the snapshot"
        loop_thread = on_loop(loop, threading.get_ident)
        assert gated.restore_threads and loop_thread not in gated.restore_threads
        # While the install is held, the loop runs everything else: the leader on it commits, and a
        # callback on it runs at once.
        term = leader.status()["term"]
        for i in range(200, 220):
            put(leader, i)
        assert on_loop(loop, lambda: "answered") == "answered"
        # Hold the install past the third replica's election timeout: once it is done, what the leader
        # sent meanwhile (held, or still in the socket) is handled before its first tick, so it does
        # not campaign (which would depose the leader: a new term).
        held_since = time.monotonic()
        wait_until(lambda: time.monotonic() - held_since > COMPACT_OFTEN.election_max * 1.5, 10,
                   message="the install held past an election timeout")
        gated.release.set()

        wait_until(lambda: on_loop(loop, gated.key_count) == 220, 20, message="the third replica caught up")
        put(leader, 220)
        wait_until(lambda: on_loop(loop, gated.key_count) == 221, 20, message="and follows the log")
        assert leader.is_leader() and leader.status()["term"] == term, "an election followed the install"
    finally:
        for g in groups:
            g.close()


def test_a_replica_on_the_loop_loads_its_snapshot_before_the_loop_takes_it(tmp_path, loop):
    address = f"127.0.0.1:{find_free_base_port(1)}"
    directory = str(tmp_path / "r0")
    group = RaftGroup("load", address, [address], ShardState(), directory, None, COMPACT_OFTEN, loop=loop)
    try:
        wait_until(group.is_leader, 20, message="a leader")
        for i in range(120):
            put(group, i)
        wait_until(lambda: group.status()["log-length"] < 120, 20, message="a snapshot was taken")
    finally:
        group.close()

    constructing = threading.get_ident()
    state = GatedState()
    state.release.set()
    group = RaftGroup("load", address, [address], state, directory, None, COMPACT_OFTEN, loop=loop)
    try:
        assert state.restore_threads == [constructing]      # loaded by the constructor, on this thread
        wait_until(group.is_leader, 20, message="a leader again")
        assert on_loop(loop, state.key_count) == 120
    finally:
        group.close()


def test_a_follower_far_behind_is_caught_up_in_slices_between_the_loops_other_work(tmp_path, loop, monkeypatch):
    # A budget that any send exceeds: every call sends one message per follower and leaves the rest for
    # the loop's next iteration (the real 2 ms may or may not suffice for 2,400 entries, by machine).
    monkeypatch.setattr(loop_replica, "SEND_BUDGET", 1e-9)
    base = find_free_base_port(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]

    def open_group(i: int) -> RaftGroup:
        return RaftGroup("catch-up", addresses[i], addresses, ShardState(), str(tmp_path / f"r{i}"), None,
                         NEVER_COMPACT, loop=loop)

    groups = [open_group(0), open_group(1)]
    try:
        leader = wait_until(lambda: leader_of(groups), 20, message="a leader of two")
        write_concurrently(leader, threads=8, per_thread=300)    # 2,400 entries of ~100 bytes
        groups.append(open_group(2))
        wait_until(lambda: on_loop(loop, groups[2].state.key_count) == 2400, 60,
                   message="the third replica caught up")
        # The budget cut the sends short, and the leader went on at the loop's next iteration.
        assert leader._replica.sends_continued > 0
        put(leader, 5000)
        wait_until(lambda: on_loop(loop, groups[2].state.key_count) == 2401, 20, message="and follows the log")
    finally:
        for g in groups:
            g.close()


def test_a_closing_replica_waits_for_its_install_to_finish(tmp_path, loop):
    base = find_free_base_port(2)
    addresses = [f"127.0.0.1:{base + i}" for i in range(2)]
    leader = RaftGroup("close", addresses[0], addresses[:1], ShardState(), str(tmp_path / "r0"), None,
                       COMPACT_OFTEN, loop=loop)
    gated = GatedState()
    follower = None
    try:
        wait_until(leader.is_leader, 20, message="a leader")
        for i in range(120):
            put(leader, i)
        wait_until(lambda: leader.status()["log-length"] < 120, 20, message="a snapshot was taken")
        follower = RaftGroup("close", addresses[1], addresses, gated, str(tmp_path / "r1"), None,
                             COMPACT_OFTEN, loop=loop, learner=True)
        assert gated.restoring.wait(20), "the learner was never sent the snapshot"
        closed = threading.Event()
        closer = threading.Thread(target=lambda: (follower.close(), closed.set()))
        closer.start()
        # close() must not take the replica from its worker: it is still waiting after a moment.
        assert not closed.wait(0.5)
        gated.release.set()
        closer.join(20)
        assert closed.is_set()
        follower = None
    finally:
        gated.release.set()
        if follower is not None:
            follower.close()
        leader.close()


def test_the_resolver_never_blocks_an_event_loop_and_looks_names_up_on_its_own_thread(loop):
    lookups: list[tuple[str, int]] = []
    gate = threading.Event()

    def lookup(host: str, family: object) -> list[str]:
        lookups.append((host, threading.get_ident()))
        if host == "slow.example":
            gate.wait(10)
        return {"node-a.example": ["10.0.0.7"], "node-b.example": ["10.0.0.8"],
                "slow.example": ["10.0.0.9"]}.get(host, [])

    def hosts_looked_up() -> list[str]:
        return [host for host, _ in lookups]

    resolver = BackgroundResolver(cache_seconds=600, fail_cache_seconds=0.2, lookup=lookup)
    assert resolver.resolve("10.1.2.3") == "10.1.2.3" and lookups == []     # an IP is its own answer
    assert on_loop(loop, lambda: resolver.resolve("::1")) == "::1"

    resolver.prime(["node-a.example", "10.1.2.3"])                          # on this thread
    assert lookups == [("node-a.example", threading.get_ident())]
    assert on_loop(loop, lambda: resolver.resolve("node-a.example")) == "10.0.0.7"
    # Off a loop (a constructor binding, a tick thread) an unknown name is looked up at once, as before.
    assert resolver.resolve("node-b.example") == "10.0.0.8"
    assert lookups[-1] == ("node-b.example", threading.get_ident())

    # On the loop: no address yet, and no wait; one lookup in flight, on the resolver's thread.
    assert on_loop(loop, lambda: [resolver.resolve("slow.example") for _ in range(2)]) == [None, None]
    wait_until(lambda: "slow.example" in hosts_looked_up(), 5, message="the lookup started")
    loop_thread = on_loop(loop, threading.get_ident)
    assert lookups[-1][1] not in (loop_thread, threading.get_ident())
    gate.set()
    wait_until(lambda: on_loop(loop, lambda: resolver.resolve("slow.example")) == "10.0.0.9", 5,
               message="the name resolved")
    assert hosts_looked_up().count("slow.example") == 1

    # A name that does not resolve is looked up again after the fail-cache time, in the background.
    assert on_loop(loop, lambda: resolver.resolve("gone.example")) is None
    wait_until(lambda: on_loop(loop, lambda: resolver.resolve("gone.example")) is None
               and hosts_looked_up().count("gone.example") >= 2, 5, message="a failed name is retried")
