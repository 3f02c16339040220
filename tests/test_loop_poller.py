"""Raft replicas that tick on an event loop (kvs.raft.loop_poller), not on tick threads.

Real replicas on 127.0.0.1 ports, all three driven by one uvloop loop in a thread of the test,
as the shard groups of a node with KVS_RAFT_ON_LOOP=1 are by its main thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Iterator

import pytest

from kvs.config.epoch import ConfigEpoch
from kvs.errors import BadRequest
from kvs.fsm.shard import ShardState
from kvs.http.aio import new_event_loop
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.hosting import GroupFactory
from kvs.raft.loop import LoopGroup
from kvs.settings import NodeSettings
from kvs.testing.cluster import find_free_base_port, wait_until
from tests.test_fsync import DurabilityRecorder, leader_of, run_writes, write_concurrently

NEVER_COMPACT = RaftTiming(compaction_entries=10**9, compaction_seconds=10**9)


@contextlib.contextmanager
def running_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A uvloop loop running in a thread of the test, as a node's main thread runs its loop."""
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        assert not thread.is_alive(), "the loop did not stop"
        loop.close()


@pytest.fixture
def loop():
    with running_loop() as loop:
        yield loop


def start_groups(tmp_path, loop, count: int = 3, timing: RaftTiming = NEVER_COMPACT) -> list[RaftGroup]:
    base = find_free_base_port(count)
    addresses = [f"127.0.0.1:{base + i}" for i in range(count)]
    return [RaftGroup("on-loop", a, addresses, ShardState(), str(tmp_path / f"r{i}"), None, timing, loop=loop)
            for i, a in enumerate(addresses)]


def on_loop(loop, fn):
    """Run `fn()` on the loop's thread; its result (or exception) here."""
    async def call():
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), loop).result(10)


def test_replicas_on_one_loop_elect_a_leader_and_commit_writes_from_other_threads(tmp_path, loop):
    groups = start_groups(tmp_path, loop)
    try:
        assert all(g.on_loop for g in groups)
        leader = wait_until(lambda: leader_of(groups), 20, message="one leader")
        write_concurrently(leader, threads=4, per_thread=20)
        last = leader.status()["commit-index"]
        wait_until(lambda: all(g.status()["commit-index"] >= last for g in groups), 20,
                   message="every replica learnt the commit index")
        wait_until(lambda: len({on_loop(loop, g.state.key_count) for g in groups}) == 1, 20,
                   message="every replica applied every write")
        assert on_loop(loop, groups[0].state.key_count) == 80
    finally:
        for g in groups:
            g.close()
    assert not [t for t in threading.enumerate() if "_autoTickThread" in repr(getattr(t, "_target", None))]


def test_a_batch_proposed_on_the_loop_is_appended_and_answered_there(tmp_path, loop):
    groups = start_groups(tmp_path, loop)
    try:
        leader = wait_until(lambda: leader_of(groups), 20, message="one leader")

        async def write() -> list:
            replica = LoopGroup(leader, loop)
            deadline = time.monotonic() + 10
            return await asyncio.gather(*(replica.execute(("put", f"id-{i}", f"k{i}", "v"), deadline)
                                          for i in range(50)))
        results = asyncio.run_coroutine_threadsafe(write(), loop).result(20)
        assert len(results) == 50

        async def read() -> object:
            return await LoopGroup(groups[0], loop).read(lambda state: state.read_versioned("k7"),
                                                         time.monotonic() + 10)
        value = asyncio.run_coroutine_threadsafe(read(), loop).result(20)
        assert "v" in repr(value)
    finally:
        for g in groups:
            g.close()


def test_a_blocking_call_on_the_loop_that_runs_the_replica_is_refused(tmp_path, loop):
    groups = start_groups(tmp_path, loop, count=1)
    try:
        group = groups[0]
        wait_until(group.is_leader, 20, message="a leader")
        with pytest.raises(RuntimeError, match="blocking call on the event loop"):
            on_loop(loop, lambda: group.execute(("put", "id", "k", "v"), time.monotonic() + 5))
        assert group.execute(("put", "id", "k", "v"), time.monotonic() + 5) is not None
    finally:
        for g in groups:
            g.close()


def test_replicas_close_when_their_loop_has_stopped(tmp_path, loop):
    groups = start_groups(tmp_path, loop)
    leader = wait_until(lambda: leader_of(groups), 20, message="one leader")
    leader.execute(("put", "id", "k", "v"), time.monotonic() + 5)
    loop.call_soon_threadsafe(loop.stop)
    wait_until(lambda: not loop.is_running(), 10, message="the loop stopped")
    started = time.monotonic()
    for g in groups:
        g.close()
    assert time.monotonic() - started < 5


def test_only_fdatasynced_entries_are_acknowledged_and_committed_on_the_loop(tmp_path, loop, monkeypatch):
    recorder = DurabilityRecorder(monkeypatch)
    run_writes(tmp_path, 3, NEVER_COMPACT, loop)
    assert recorder.acks > 0 and recorder.commits > 0
    assert recorder.violations == []


def test_kvs_raft_on_loop_puts_a_nodes_shard_groups_on_its_loop_and_leaves_the_metadata_group_threaded(
        tmp_path, loop):
    assert NodeSettings.load(environ={}).raft_on_loop is False
    with pytest.raises(BadRequest, match="KVS_RAFT_ON_LOOP"):
        NodeSettings.load(environ={"KVS_RAFT_ON_LOOP": "1"})
    base = find_free_base_port(1, offset=1000)
    settings = NodeSettings.load(environ={"ADDRESS": f"127.0.0.1:{base}", "VIEW": f"127.0.0.1:{base}",
                                          "REPL_FACTOR": "1", "DATA_DIR": str(tmp_path / "node"),
                                          "KVS_RAFT_ON_LOOP": "on"})
    factory = GroupFactory(settings, NEVER_COMPACT, on_metadata_applied=lambda: None, loop=loop)
    epoch = ConfigEpoch.initial(settings.view, 1)
    meta = factory.metadata_group(None)
    shard = factory.shard_group(epoch, next(iter(epoch.shards)))
    try:
        assert shard.on_loop and not meta.on_loop
        wait_until(shard.is_leader, 20, message="the shard's replica leads")
        assert shard.execute(("put", "id", "k", "v"), time.monotonic() + 5) is not None
    finally:
        shard.close()
        meta.close()


def test_a_failure_that_repeats_on_every_tick_is_logged_once_a_minute_with_a_count(caplog):
    from kvs.raft import loop_poller
    clock = [1000.0]
    failures = loop_poller._FailureLog(clock=lambda: clock[0])
    for _ in range(50):
        try:
            raise ValueError("boom")
        except ValueError:
            failures.report("a Raft tick failed")
    clock[0] += loop_poller._FailureLog.INTERVAL + 1
    try:
        raise ValueError("boom")
    except ValueError:
        failures.report("a Raft tick failed")
    messages = [r.getMessage() for r in caplog.records if r.name == loop_poller.__name__]
    assert messages == ["a Raft tick failed", "a Raft tick failed (49 more since the last report)"]
    assert all(r.exc_info for r in caplog.records if r.name == loop_poller.__name__)
