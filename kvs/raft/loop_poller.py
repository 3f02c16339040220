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

Not done in this phase (the design note, section 5 step 4): every fsync (the follower's before its
acknowledgement, the leader's after sending, `.meta`, the journal's growth), a snapshot install,
a catch-up send (up to `appendEntriesPeriod` per follower) and a host name's DNS lookup run on the
loop and pause the node's HTTP meanwhile.
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

from kvs.raft.replica import Replica

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


class LoopReplica(Replica):
    """A Replica whose poller is a LoopPoller: woken through the loop, and its commit-only
    AppendEntries sent after the requests that the commit answers."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._SyncObj__transport.constructing = False      # binds at its first tick, on the loop
        self._commit_send_deferred = False

    def _wake(self) -> None:
        self._poller.wake()         # (the PipeNotifier that Replica made stays unused)

    def _replicate_now(self) -> None:
        # When only the commit index moved, the AppendEntries that tells the followers (a pickle and an
        # encryption per follower) waits one loop iteration: the requests this commit resolved run
        # first and write their responses. New entries still leave at once.
        if (self._isLeader() and self._SyncObj__raftLog[-1][1] == self._sent_log_index
                and self.raftCommitIndex != self._sent_commit_index):
            if not self._commit_send_deferred:
                self._commit_send_deferred = True
                self._poller.call_soon(self._send_deferred_commit)
            return
        super()._replicate_now()

    def _send_deferred_commit(self) -> None:
        self._commit_send_deferred = False
        if self.journal_failure is None:
            Replica._replicate_now(self)

    def run_handlers(self, dispatch: Callable[[], None]) -> bool:
        """PySyncObj's message handlers, under the disk fault policy that `Replica._onTick` applies to
        them on a tick thread. False once halted (nothing ran): its sockets go unread."""
        if self.journal_failure is not None:
            return False
        try:
            dispatch()
        except Exception:
            if self.journal_failure is None:
                raise
        return self.journal_failure is None


# PySyncObj's event bits and epoll's; HUP reads as ERROR, as PySyncObj's PollPoller reports it.
_EPOLL_BITS = ((POLL_EVENT_TYPE.READ, select.EPOLLIN), (POLL_EVENT_TYPE.WRITE, select.EPOLLOUT),
               (POLL_EVENT_TYPE.ERROR, select.EPOLLERR | select.EPOLLHUP))


def _to_epoll(mask: int) -> int:
    return sum(bits for event, bits in _EPOLL_BITS if mask & event)


def _from_epoll(events: int) -> int:
    return sum(event for event, bits in _EPOLL_BITS if events & bits)


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
        self._closing = False
        self._ticking = False
        self._tick_scheduled = False
        self._timer: asyncio.TimerHandle | None = None

    # -- PySyncObj's Poller ------------------------------------------------------------------

    def subscribe(self, descr: int, callback: Callable[[int, int], None], eventMask: int) -> None:
        events = _to_epoll(eventMask)
        try:
            self._epoll.modify(descr, events) if descr in self._callbacks else self._epoll.register(descr, events)
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

    def _attach(self) -> None:
        if self._closing or self._attached:
            return
        self._attached = True
        self._loop.add_reader(self._epoll.fileno(), self._dispatch)
        self._timer = self._loop.call_later(self._period, self._periodic)
        self._run_tick()

    def _detach(self) -> None:
        if not self._attached:
            return
        self._attached = False
        try:
            self._loop.remove_reader(self._epoll.fileno())
        except (RuntimeError, ValueError, OSError):
            pass            # a closed loop
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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
        self._loop.call_soon(lambda: self._attached and fn())

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
        if not self._attached or self._tick is None:
            return
        self._ticking = True
        try:
            self._tick()
        except Exception:
            log.exception("a Raft tick failed")     # as PySyncObj's tick thread does; the next tick retries
        finally:
            self._ticking = False

    def _dispatch(self) -> None:
        """The epoll set is readable: PySyncObj's handlers for what is ready, then one tick (as the
        thread's next tick followed its `poll`)."""
        if not self._attached or self._handle is None:
            return
        self._ticking = True
        try:
            running = self._handle(self._dispatch_events)
        except Exception:
            log.exception("a Raft message handler failed")
            running = True
        finally:
            self._ticking = False
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
            callback = self._callbacks.get(descr)
            if callback is not None:
                callback(descr, _from_epoll(event))
