"""LoopGroup: a RaftGroup as an asyncio event loop sees it, with batched proposals and reads.

The key path runs on one event loop per node (kvs.http.aio). Handing each
request to PySyncObj's tick thread and back would cost two thread switches
and a Raft log entry per request; instead:

* Writes that arrive during one iteration of the loop are proposed together,
  as one `("batch", [command, ...])` log entry (`kvs.fsm.base` applies each in
  order and returns their results), and the entry's one callback, on the
  tick thread, resolves every waiting request with one
  `call_soon_threadsafe`. Each request keeps its own retry loop and deadline,
  with the same rules as `RaftGroup.execute`: codes that mean "not applied"
  and those that mean "maybe applied" are both retried with the same command
  (its request id makes a retry of an applied write return the first
  outcome) until the deadline, then `Unavailable`.
* A follower's writes (`forward`) that arrive during one iteration go to the
  leader together (`kvs.raft.forwarding`), and their results come back to
  the loop in one call, as a batch's do.
* Reads that arrive during one iteration share one ReadIndex request
  (`kvs.raft.read_index`); once it says the replica may be read, every
  waiting read runs on the local state.

Deadlines are enforced by one sweep per group every SWEEP_SECONDS rather than
a timer per request. The same sweep fails every waiting request at once with
`ReplicaHalted` when the replica has halted (its journal failed, see
`kvs.raft.replica`): it would never answer them, and the router sends them to
the group's other replicas instead (`kvs.routing.keys`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Iterator

from pysyncobj.config import FAIL_REASON

from kvs.metrics import PROPOSALS_FAILED
from kvs.errors import ReplicaHalted, Unavailable
from kvs.raft.group import RaftGroup

MAX_BATCH = 512            # commands per log entry
SWEEP_SECONDS = 0.05
_RETRY_BACKOFF = (0.005, 0.2)
_TIMED_OUT = -1            # an outcome code of ours: the deadline passed while waiting
_HALTED = -2               # another: the replica halted while the request waited
_NOT_TAKEN = -3            # and another: the leader did not take a forwarded write


class LoopGroup:
    def __init__(self, group: RaftGroup, loop: asyncio.AbstractEventLoop):
        self.group = group
        self._loop = loop
        self._writes: list[tuple[tuple, asyncio.Future, float]] = []
        self._forwards: list[tuple[tuple, asyncio.Future, float]] = []
        self._reads: list[tuple[asyncio.Future, float]] = []
        self._waiting: set[tuple[asyncio.Future, float]] = set()
        self._flush_scheduled = False
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def state(self) -> Any:
        return self.group.state

    # -- writes -------------------------------------------------------------------------------

    async def execute(self, command: tuple, deadline: float) -> Any:
        """Apply `command` through the log (batched with its neighbours); its result, or Unavailable."""
        backoff = _RETRY_BACKOFF[0]
        while True:
            if time.monotonic() >= deadline:
                raise Unavailable(f"group {self.name}: no commit before the deadline")
            self._check_running()
            future = self._loop.create_future()
            self._writes.append((command, future, deadline))
            self._schedule_flush()
            result, error = await future
            if error == FAIL_REASON.SUCCESS:
                return result
            if error == _TIMED_OUT:
                PROPOSALS_FAILED.labels(self.name).inc()
                raise Unavailable(f"group {self.name}: no commit before the deadline")
            self._check_running()
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, _RETRY_BACKOFF[1])

    async def forward(self, command: tuple, deadline: float) -> Any | None:
        """On a follower: `command` proposed by the leader (kvs.raft.forwarding, batched with its
        neighbours); its result, or None if the leader did not take it (then propose it with `execute`:
        the same request id makes a write applied twice return its first outcome)."""
        if time.monotonic() >= deadline:
            return None
        self._check_running()
        future = self._loop.create_future()
        self._forwards.append((command, future, deadline))
        self._schedule_flush()
        result, error = await future
        return result if error == FAIL_REASON.SUCCESS else None

    # -- reads --------------------------------------------------------------------------------

    async def read(self, fn: Callable[[Any], Any], deadline: float) -> Any:
        """`fn(state)` once a ReadIndex round (shared with the reads around it) allows; or Unavailable."""
        backoff = _RETRY_BACKOFF[0]
        while True:
            if time.monotonic() >= deadline:
                raise Unavailable(f"group {self.name}: no read index before the deadline")
            self._check_running()
            future = self._loop.create_future()
            self._reads.append((future, deadline))
            self._schedule_flush()
            ok, error = await future
            if ok:
                return fn(self.group.state)
            if error == _TIMED_OUT:
                raise Unavailable(f"group {self.name}: no read index before the deadline")
            self._check_running()
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, _RETRY_BACKOFF[1])

    def _check_running(self) -> None:
        if self.group.failure is not None:
            raise ReplicaHalted(f"group {self.name}: this replica halted ({self.group.failure.error})")

    # -- on the loop: batching ------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def _flush(self) -> None:
        self._flush_scheduled = False
        writes, self._writes = self._writes, []
        for commands, waiting in self._batches(writes):
            self.group.propose(("batch", commands),
                               lambda result, error, waiting=waiting: self._committed(waiting, result, error))
        forwards, self._forwards = self._forwards, []
        for commands, waiting in self._batches(forwards):
            self.group.forward(commands,
                               lambda results, waiting=waiting: self._from_tick(self._forwarded, waiting, results, None))
        if self._reads:
            reads, self._reads = self._reads, []
            self._waiting.update(reads)
            self.group.read_index(lambda ok, reads=reads: self._from_tick(self._read_ready, reads, ok, None))
        self.group.tick_now()           # a group on the loop appends and sends them now (else a no-op)

    def _batches(self, queued: list) -> Iterator[tuple[list, list]]:
        """`queued` in batches of at most MAX_BATCH: (commands, what waits for them), the latter now waiting."""
        for start in range(0, len(queued), MAX_BATCH):
            chunk = queued[start:start + MAX_BATCH]
            waiting = [(future, deadline) for _, future, deadline in chunk]
            self._waiting.update(waiting)
            yield [command for command, _, _ in chunk], waiting

    def _committed(self, waiting: list, result: Any, error: Any) -> None:
        if asyncio._get_running_loop() is not self._loop:
            # On the tick thread: no AppendEntries leaves for this commit index alone; the next one carries it
            # (`Replica.hold_commit_send`), and the loop, waiting for the GIL to answer, gets it sooner.
            self.group.hold_commit_send()
        self._from_tick(self._wrote, waiting, result, error)

    def _from_tick(self, handler: Callable, waiting: list, result: Any, error: Any) -> None:
        """On the thread that ticks the replica: hand the outcome of a whole batch to the loop in one call
        (or, for a replica that ticks on the loop itself, to the handler right away)."""
        if asyncio._get_running_loop() is self._loop:
            handler(waiting, result, error)     # a group that ticks on the loop: no hand-off
            return
        try:
            self._loop.call_soon_threadsafe(handler, waiting, result, error)
        except RuntimeError:
            pass                        # the loop is closed: the node is stopping, nobody waits

    def _wrote(self, waiting: list, result: Any, error: int) -> None:
        ok = error == FAIL_REASON.SUCCESS and isinstance(result, list) and len(result) == len(waiting)
        for i, item in enumerate(waiting):
            self._waiting.discard(item)
            future = item[0]
            if not future.done():
                future.set_result((result[i], FAIL_REASON.SUCCESS) if ok else (None, error))

    def _forwarded(self, waiting: list, results: list | None, _: Any) -> None:
        ok = isinstance(results, list) and len(results) == len(waiting)
        for i, item in enumerate(waiting):
            self._waiting.discard(item)
            if not item[0].done():
                item[0].set_result((results[i], FAIL_REASON.SUCCESS) if ok else (None, _NOT_TAKEN))

    def _read_ready(self, waiting: list, ok: bool, _: Any) -> None:
        for item in waiting:
            self._waiting.discard(item)
            if not item[0].done():
                item[0].set_result((ok, None))

    def _sweep(self) -> None:
        """Fail what waits past its deadline (its command may still be applied: a retry is safe)."""
        now, halted = time.monotonic(), self.group.failure is not None
        expired = [item for item in self._waiting if halted or item[1] <= now]
        for item in expired:
            self._waiting.discard(item)
            if not item[0].done():
                item[0].set_result((None, _HALTED if halted else _TIMED_OUT))
        self._sweeper = None
        if self._waiting or self._writes or self._forwards or self._reads:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def close(self) -> None:
        """Every waiting request gets its answer now (Unavailable): the replica is going away."""
        queued = [(f, d) for _, f, d in self._writes + self._forwards]
        for item in list(self._waiting) + queued + self._reads:
            if not item[0].done():
                item[0].set_result((None, _TIMED_OUT))
        self._waiting.clear()
        self._writes, self._forwards, self._reads = [], [], []
