"""The tick thread hands a batch's outcome to the event loop (`LoopGroup._from_tick`) and, when that batch
is all the loop waits for (one client, say), lets the loop answer before it goes on: otherwise the loop,
woken, waited for the GIL while the tick thread finished its tick. Bounded by HANDBACK_WAIT, and never
for a batch of more than HANDBACK_BATCH or when other requests wait (the loop has a queue of work then, and
the tick thread must not idle behind it).

A uvloop loop in a thread of the test; the test's own thread plays the tick thread."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from pysyncobj.config import FAIL_REASON

from kvs.raft import loop as loop_module
from kvs.raft.loop import LoopGroup
from kvs.testing.cluster import wait_until
from tests.test_loop_poller import running_loop


def waiting_request(loop, group: LoopGroup, answered: list) -> tuple:
    """A request waiting on the loop for its batch: (future, deadline), as `_batches` makes them; once
    resumed it records its answer, as a request writes its response."""
    async def make():
        item = (loop.create_future(), time.monotonic() + 10)
        group._waiting.add(item)

        async def serve():
            answered.append(await item[0])
        loop.create_task(serve())
        return item
    return asyncio.run_coroutine_threadsafe(make(), loop).result(10)


def test_a_batch_the_loop_alone_waits_for_is_answered_before_the_tick_thread_goes_on():
    answered: list = []
    with running_loop() as loop:
        group = LoopGroup(SimpleNamespace(name="g", failure=None), loop)
        item = waiting_request(loop, group, answered)
        group._from_tick(group._wrote, [item], ["written"], FAIL_REASON.SUCCESS)
        assert answered == [("written", FAIL_REASON.SUCCESS)]       # already, on the loop's side


def test_the_tick_thread_does_not_wait_for_a_large_batch_or_while_others_wait_and_waits_a_stuck_loop_only_so_long(
        monkeypatch):
    monkeypatch.setattr(loop_module, "HANDBACK_WAIT", 2.0)
    answered: list = []
    with running_loop() as loop:
        group = LoopGroup(SimpleNamespace(name="g", failure=None), loop)
        first, second = waiting_request(loop, group, answered), waiting_request(loop, group, answered)
        batch = [waiting_request(loop, group, answered) for _ in range(loop_module.HANDBACK_BATCH + 1)]
        waiting = set(group._waiting)
        group._waiting = set(batch)                 # a batch too large to wait for, alone
        stuck, release = threading.Event(), threading.Event()
        loop.call_soon_threadsafe(lambda: (stuck.set(), release.wait(30)))
        assert stuck.wait(10)
        try:
            started = time.monotonic()
            group._from_tick(group._wrote, batch, ["many"] * len(batch), FAIL_REASON.SUCCESS)
            assert time.monotonic() - started < 1.0 and answered == []
            group._waiting = waiting - set(batch)
            started = time.monotonic()
            group._from_tick(group._wrote, [first], ["one"], FAIL_REASON.SUCCESS)       # another waits
            assert time.monotonic() - started < 1.0 and answered == []
            group._waiting.discard(first)       # as the loop will once it runs: the second is alone now
            started = time.monotonic()
            group._from_tick(group._wrote, [second], ["two"], FAIL_REASON.SUCCESS)
            assert 1.5 <= time.monotonic() - started < 10 and answered == []       # the bound, not the loop
        finally:
            release.set()
        wait_until(lambda: len(answered) == len(batch) + 2, 10, message="the loop answered all once it ran")
        assert sorted(answered) == sorted([("many", FAIL_REASON.SUCCESS)] * len(batch) +
                                          [("one", FAIL_REASON.SUCCESS), ("two", FAIL_REASON.SUCCESS)])
