"""LoopPoller: one replica's PySyncObj I/O and ticks on the node's event loop, not on a tick thread.

EXPERIMENTAL (KVS_RAFT_ON_LOOP=on, shard groups only; docs/design/ticks-on-loop.md, phase 1). With
a tick thread, a write crosses threads twice (the loop proposes, the tick thread appends and sends;
the tick thread applies, the loop answers) and each crossing waits for the GIL. Here the loop
runs the replica: its sockets' events, its timer ticks and the tick that appends a proposal.

How PySyncObj is driven (autoTick=False; `pollerType` is this object, which `createPoller` returns
as it is, see `install`):
- Its sockets are registered in an epoll set of this poller's own, with PySyncObj's masks and
  semantics (ERROR included; a socket closed before it is unsubscribed simply drops out). The
  loop watches the set's one descriptor: when it is readable, `_dispatch` polls the set without
  waiting and runs PySyncObj's handlers (under `LoopReplica.run_handlers`, the disk fault policy
  that `Replica._onTick` gives them on a thread), then one tick, as the thread's loop ticked again
  after `poll` returned. A replica that has halted is detached: its sockets go unread, as a
  halted tick thread never polled, and a level-triggered set would otherwise spin the loop.
  (Per-socket `add_reader` was not used: uvloop closes a poll handle on POLLERR without calling
  its reader, so PySyncObj would never see that connection fail.)
- `poll()`, at the end of every tick, returns at once.
- A tick runs every `period` (PySyncObj's timers: heartbeats, elections, reconnects), after each
  dispatch, on `wake()` (from any thread: a proposal, a ReadIndex request, a transfer), and inline
  through `tick_now()` from the loop (the batch just proposed is appended and sent at once).
- Ownership: the constructing thread owns the replica until `attach()`, which hands it to the loop
  (at the loop's next iteration, or when it starts running: a node builds its first groups before
  its loop runs). The loop owns it until `detach()`, which returns once the loop has let go of it;
  the closing thread then destroys it. On a loop that is not running, detach runs in place: no
  callback of the loop can run meanwhile. The one lock decides which of the two runs it.

- Off the loop (`run_off_loop`): a handler that would hold the loop for long (installing a
  snapshot the leader sent: seconds at 300,000 keys) hands the replica to a worker thread. From
  then on the loop runs nothing of the replica: its set is not watched and its ticks are skipped
  (messages already read are held by `LoopReplica`). The worker starts once the loop's handlers
  have returned, so it is the replica's only user. Then the loop takes it back, runs the
  continuation under the fault policy, and ticks. `detach()` waits for such a worker.

Still on the loop (the design note, section 7): every fsync (the follower's before its
acknowledgement, the leader's after sending, `.meta`, the journal's growth) and compaction. A
catch-up send is sliced (`kvs.raft.loop_replica`); host names resolve off the loop
(`kvs.raft.resolver`).
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
from typing import Any, Callable

import pysyncobj.syncobj
from pysyncobj.poller import POLL_EVENT_TYPE, Poller

log = logging.getLogger(__name__)

_WAIT_SECONDS = 30.0       # attach/detach off the loop: the loop answers within a few ms when alive


def install() -> None:
    """Let SyncObjConf.pollerType carry a LoopPoller itself (PySyncObj does not validate the value)."""
    original = pysyncobj.syncobj.createPoller
    if getattr(original, "kvs_loop_poller", False):
        return

    def create_poller(poller_type: Any) -> Poller:
        return poller_type if isinstance(poller_type, LoopPoller) else original(poller_type)

    create_poller.kvs_loop_poller = True           # type: ignore[attr-defined]
    pysyncobj.syncobj.createPoller = create_poller


# PySyncObj's event bits and epoll's; HUP reads as ERROR, as PySyncObj's PollPoller reports it.
_EPOLL_BITS = ((POLL_EVENT_TYPE.READ, select.EPOLLIN), (POLL_EVENT_TYPE.WRITE, select.EPOLLOUT),
               (POLL_EVENT_TYPE.ERROR, select.EPOLLERR | select.EPOLLHUP))


def _to_epoll(mask: int) -> int:
    return sum(bits for event, bits in _EPOLL_BITS if mask & event)


def _from_epoll(events: int) -> int:
    return sum(event for event, bits in _EPOLL_BITS if events & bits)


class _FailureLog:
    """Logs a failure with its traceback the first time, then at most once a minute with a count: a
    tick that keeps failing runs 50 times a second, and a log line each time would fill the disk."""

    INTERVAL = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0

    def report(self, what: str) -> None:
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        log.exception("%s%s", what, suffix)
        self._next, self._suppressed = now + self.INTERVAL, 0


class LoopPoller(Poller):
    binds_at_first_tick = True      # read by RaftTransport: see LoopReplica.__init__
    def __init__(self, loop: asyncio.AbstractEventLoop, period: float):
        self._loop = loop
        self._period = period
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int, int], None]] = {}
        self._tick: Callable[[], None] | None = None
        self._handle: Callable[[Callable[[], None]], bool] | None = None
        self._attached = False
        self._offloaded = False     # a worker thread owns the replica for now (run_off_loop)
        self._worker: threading.Thread | None = None
        self._work_due: tuple[Callable[[], None], Callable[[], None]] | None = None  # started after the handlers
        self._closing = False
        self._ticking = False
        self._tick_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._failures = _FailureLog()

    # -- PySyncObj's Poller ------------------------------------------------------------------

    def subscribe(self, descr: int, callback: Callable[[int, int], None], eventMask: int) -> None:
        events = _to_epoll(eventMask)
        try:
            if descr in self._callbacks:
                self._epoll.modify(descr, events)
            else:
                self._epoll.register(descr, events)
        except FileExistsError:
            self._epoll.modify(descr, events)     # a reused number whose old socket was never unsubscribed
        except FileNotFoundError:
            self._epoll.register(descr, events)   # closed and reopened under the same number
        self._callbacks[descr] = callback

    def unsubscribe(self, descr: int) -> None:
        self._callbacks.pop(descr, None)
        try:
            self._epoll.unregister(descr)
        except OSError:
            pass        # PySyncObj closes a socket before unsubscribing it: the kernel dropped it already

    def poll(self, timeout: float) -> None:
        """The end of every tick: events are dispatched by the loop instead."""

    # -- ownership ---------------------------------------------------------------------------

    def attach(self, tick: Callable[[], None], handle: Callable[[Callable[[], None]], bool]) -> None:
        """Hand the replica to the loop: from the loop's next iteration on (or once it runs, at a node's
        start) it runs `tick()` and `handle(dispatch)`, which runs PySyncObj's handlers under the
        replica's fault policy and returns False once the replica has halted. The caller must not
        touch the replica afterwards except through its thread-safe entry points."""
        self._tick, self._handle = tick, handle
        if self._in_loop_thread():
            self._attach()
        else:
            self._loop.call_soon_threadsafe(self._attach)

    def detach(self) -> None:
        """Take the replica back from the loop; returns once no tick or handler of it can run any more."""
        self._closing = True                # an attach still queued does nothing
        try:
            self._detach_from_loop()
        finally:
            self._join_worker()

    def _detach_from_loop(self) -> None:
        if self._in_loop_thread() or self._loop.is_closed():
            self._detach()
            return
        claim = threading.Lock()            # the loop's callback or this thread runs _detach, not both
        done = threading.Event()

        def on_loop() -> None:
            if claim.acquire(blocking=False):
                self._detach()
                done.set()
        try:
            self._loop.call_soon_threadsafe(on_loop)
        except RuntimeError:
            pass                            # closed meanwhile
        deadline = time.monotonic() + _WAIT_SECONDS
        while not done.wait(0.05):
            # A loop that is not running runs no callback: nothing of the replica runs either, and the
            # callback queued above will find the claim taken.
            if not self._loop.is_running() and claim.acquire(blocking=False):
                self._detach()
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the event loop did not release a Raft replica in time")

    def close(self) -> None:
        self._epoll.close()

    def _join_worker(self) -> None:
        # A worker that has the replica (run_off_loop) is done with it before its closer takes it.
        worker = self._worker
        # It is bounded by local work (reading one snapshot file); it is waited for, however long.
        while worker is not None and worker is not threading.current_thread() and worker.is_alive():
            worker.join(_WAIT_SECONDS)
            if worker.is_alive():
                log.warning("closing a Raft replica: still waiting for its worker thread (%s)", worker.name)

    def _attach(self) -> None:
        if self._closing or self._attached:
            return
        self._attached = True
        self._watch()
        self._timer = self._loop.call_later(self._period, self._periodic)
        self._run_tick()

    def _detach(self) -> None:
        if not self._attached:
            return
        self._attached = False
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _watch(self) -> None:
        self._loop.add_reader(self._epoll.fileno(), self._dispatch)

    def _unwatch(self) -> None:
        try:
            self._loop.remove_reader(self._epoll.fileno())
        except (RuntimeError, ValueError, OSError):
            pass            # a closed loop

    def _owned(self) -> bool:
        """The loop runs this replica now: attached, and no worker has it."""
        return self._attached and not self._offloaded

    def _in_loop_thread(self) -> bool:
        return asyncio._get_running_loop() is self._loop

    # -- ticks -------------------------------------------------------------------------------

    def wake(self) -> None:
        """A tick soon, from any thread (a proposal, a ReadIndex request, a leadership transfer)."""
        if self._in_loop_thread():
            self._schedule_tick()
        else:
            try:
                self._loop.call_soon_threadsafe(self._schedule_tick)
            except RuntimeError:
                pass            # the loop is closed: the node is stopping

    def call_soon(self, fn: Callable[[], None]) -> None:
        """On the loop: `fn()` at the loop's next iteration, while this replica is attached."""
        self._loop.call_soon(lambda: self._owned() and fn())

    def tick_now(self) -> None:
        """On the loop: tick at once (the proposals just queued are appended and sent in this call)."""
        if self._ticking:
            self._schedule_tick()
        else:
            self._run_tick()

    def on_loop_thread(self) -> bool:
        return self._in_loop_thread()

    def _schedule_tick(self) -> None:
        if not self._tick_scheduled and self._attached:
            self._tick_scheduled = True
            self._loop.call_soon(self._scheduled_tick)

    def _scheduled_tick(self) -> None:
        self._tick_scheduled = False
        self._run_tick()

    def _periodic(self) -> None:
        self._timer = self._loop.call_later(self._period, self._periodic) if self._attached else None
        self._run_tick()

    def _run_tick(self) -> None:
        if not self._owned() or self._tick is None:
            return
        self._ticking = True
        try:
            self._tick()
        except Exception:
            self._failures.report("a Raft tick failed")    # the next tick retries, as on PySyncObj's thread
        finally:
            self._ticking = False

    def _dispatch(self) -> None:
        """The epoll set is readable: PySyncObj's handlers for what is ready, then one tick (as the
        thread's next tick followed its `poll`)."""
        self._handle_then_tick(self._dispatch_events)

    def _handle_then_tick(self, handlers: Callable[[], None]) -> None:
        if not self._owned() or self._handle is None:
            return
        self._ticking = True
        try:
            running = self._handle(handlers)
        except Exception:
            self._failures.report("a Raft message handler failed")
            running = True
        finally:
            self._ticking = False
            self._start_worker()
        if not running:
            # Halted (its journal failed): it reads no socket any more, as a halted tick thread never
            # polled; its node closes it. Without this the level-triggered set would spin the loop.
            self._detach()
            return
        self._run_tick()

    def _dispatch_events(self) -> None:
        try:
            events = self._epoll.poll(0)
        except OSError:
            return
        for descr, event in events:
            if self._offloaded:
                return          # a handler gave the replica to a worker: the rest waits (level-triggered)
            callback = self._callbacks.get(descr)
            if callback is not None:
                callback(descr, _from_epoll(event))

    # -- work off the loop ---------------------------------------------------------------

    def run_off_loop(self, work: Callable[[], None], then: Callable[[], None]) -> None:
        """On the loop, from a handler: `work()` runs on a worker thread, which owns the replica from
        when the handlers running now have returned; the loop neither reads its sockets nor ticks it
        from now on. Then, back on the loop, `then()` runs under the replica's fault policy, followed
        by what arrived meanwhile and a tick (or the replica is detached, if it halted). Anything
        `work` raises is logged."""
        if not self._owned() or self._work_due is not None:
            raise RuntimeError("run_off_loop: the loop does not own this replica")
        self._offloaded = True
        self._unwatch()
        self._work_due = (work, then)

    def _start_worker(self) -> None:
        due, self._work_due = self._work_due, None
        if due is None:
            return
        worker = threading.Thread(target=self._work, args=due, daemon=True, name="raft-off-loop")
        try:
            worker.start()
        except RuntimeError:
            # No thread to be had: do the work here, late rather than never (the loop waits meanwhile).
            log.exception("cannot start a thread for a Raft replica's work: doing it on the loop")
            self._work(*due)
            return
        self._worker = worker

    def _work(self, work: Callable[[], None], then: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            log.exception("a Raft replica's work off the loop failed")
        finally:
            try:
                self._loop.call_soon_threadsafe(self._resume, then)
            except RuntimeError:
                pass        # the loop is closed: the node is stopping, and detach() takes it from here

    def _resume(self, then: Callable[[], None]) -> None:
        self._offloaded = False
        if not self._attached:
            return          # detached meanwhile: its closer owns it
        self._watch()

        def handlers() -> None:
            then()
            # Then what arrived meanwhile (the leader's heartbeats, say), before the tick: a follower
            # busy for longer than its election timeout must not take the wait for a lost leader.
            if not self._offloaded:
                self._dispatch_events()
        self._handle_then_tick(handlers)
