"""The view-change lane of a chaos run: view changes while clients run and faults come and go.

Three kinds of steps (`MODES`):

* "change": PUT /kvs/view-change to a node of the initial view in the middle of
  the run; it runs to its end while the fault schedule goes on.
* "kill_coordinator": the same, but the node that received the PUT (the
  coordinator) is SIGKILLed once another node reports the change at or past a
  phase the schedule picks; it stays down until the change has settled (rolled
  back before commit, or finished by another metadata member after it) and at
  least `down` seconds, then is restarted. Until the kill, the fault schedule
  leaves the coordinator alone (it is reserved in the FaultLog), so that it is
  this kill that the change meets; the coordinator of a plain "change" gets no
  such protection and may meet any fault.
* "replace_dead_replica" (`replacement.py`): a replica that serves a shard
  from a spare node is SIGKILLed, taken out with remove-member and replaced
  by an idle spare with add-member: two changes of the shard's Raft members
  in place, the shard keeping its id.

The other steps toggle between the initial view and the grown view: the
initial view plus one more shard of spares (`grown_view`; for 2 x 3 and 4
spares: 2 shards x 3 replicas <-> 3 shards x 3 replicas, one spare left idle
for a replacement), computed from the epoch the cluster runs at that moment,
so that a change rolled back is simply tried the other way next time (after a
replacement the view is neither: it shrinks back to the initial one). Only
nodes of the initial view coordinate: they are the metadata members, and they
are in every view of the toggle, so clients that use them are never sent to a
node that left.

A step has settled when GET /kvs/view-change shows no change on a majority of
the metadata members that answer (a lagging member alone may show null before
it applied the prepare). The next step first waits until its coordinator has
no part in the previous change any more ("progress" of GET /kvs/view-change):
a node that rolled back or finished a change for a dead coordinator still
pushes epochs after the change settled, and answers 409 meanwhile. The lane
checks what the answer implies: 200 means committed as planned, 503 means
rolled back, a coordinator killed at "committed" means finished, never 400 or
409 (the lane runs one change at a time, with a valid view). Every change is a
`ViewChangeEvent` of the report and a `Transition` of the epoch timeline.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import requests

from kvs.testing.cluster import wait_until
from kvs.fsm.meta import PHASES
from kvs.config.epoch import ConfigEpoch
from kvs.reconfig.planner import plan_view_change

from .driver import ClusterDriver
from .epochs import EpochTimeline, Transition
from .faults import FaultLog

MODES = ("change", "replace_dead_replica", "kill_coordinator")
KILL_PHASES = ("prepared", "copying", "frozen", "committed")   # "caught-up" lasts one metadata commit
ANSWER_LIMIT = 120.0       # the PUT answers (or its coordinator dies) within this
START_LIMIT = 30.0         # the change shows a phase (or the PUT answers) within this
                           # (for a kill at a later phase: within SETTLE_LIMIT)
SETTLE_LIMIT = 90.0        # no change in progress any more within this (takeover waits 5 s without progress)
IDLE_LIMIT = 30.0          # a coordinator-to-be finishes its part in the previous change within this
# GET /kvs/view-change "progress" of a node with no part in a change under way
IDLE_PROGRESS = ("idle", "done", "rolled back", "clean-up failed", "refused")


@dataclass(frozen=True)
class ViewChangeStep:
    at: float              # seconds after the start of the run
    mode: str              # one of MODES
    coordinator: int       # index into the initial view (the next node not under a fault if it is)
    kill_at: str | None    # kill_coordinator: the coordinator dies at the first phase seen at or past this
    down: float            # kill_coordinator: seconds it stays down at least
    victim: int = 0        # replace_dead_replica: index into the replicas that may be replaced


@dataclass
class ViewChangeEvent:
    mode: str
    coordinator: str
    before: int                             # epoch number
    view: list[str]
    repl_factor: int
    started: float = 0.0                    # seconds into the run (when its PUT was sent)
    during_clients: bool = True             # the clients were still running when it started
    request: str = "view-change"            # or "remove-member", "add-member" (a replacement's changes)
    member: str | None = None               # the node a member request removes or adds
    shard: str | None = None                # the shard it leaves or joins
    answer: str = "none"                    # "200", "503 ...", or the client error
    killed_in_phase: str | None = None
    settled: float | None = None            # seconds into the run
    after: int | None = None                # epoch number the cluster settled on
    outcome: str = "unsettled"              # committed | rolled back | unsettled
    note: str | None = None                 # what did not go as scheduled, without being wrong
    problems: list[str] = field(default_factory=list)

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text

    def describe(self) -> str:
        kill = f" coordinator killed at {self.killed_in_phase}" if self.killed_in_phase else ""
        kill += "" if self.during_clients else " after the clients"
        end = f"{self.settled:.1f}s" if self.settled is not None else "?"
        what = f"{len(self.view)} nodes" if self.member is None else \
            f"{self.request} {self.member} {'from' if self.request == 'remove-member' else 'to'} shard {self.shard}"
        return (f"{self.mode}({what}, epoch {self.before}->{self.after}{kill}) "
                f"{self.started:.1f}-{end} {self.outcome}, answer {self.answer}"
                + (f" ({self.note})" if self.note else ""))


def grown_view(members: list[str], spares: list[str], replicas: int, retired: set[str] = frozenset()) -> list[str]:
    """The initial view plus one shard of spares: the first `replicas` spares not retired (taken out
    of the cluster while down). The spares after them stay idle, for a replacement to add."""
    return members + [s for s in spares if s not in retired][:replicas]


def dead_replica_replaced(view_changes: list[dict]) -> bool:
    """A report's view changes (as dicts) include a replacement whose removal and addition committed."""
    done = {c["request"] for c in view_changes if c["mode"] == "replace_dead_replica" and c["outcome"] == "committed"}
    return done == {"remove-member", "add-member"}


def make_view_change_schedule(seed: int, duration: float, members: int, modes: tuple[str, ...]) -> list[ViewChangeStep]:
    """One step per mode, in the given order, spread over the middle of the run. Pure in its inputs.

    Step i of n starts in [0.2 + 0.6 i/n, 0.3 + 0.6 i/n] x duration: after the clients have
    built a history, and early enough for a change whose coordinator dies to settle (takeover
    needs 5 s without progress) while the clients still run. (A step runs later when the one
    before it takes longer; see ViewChangeLane.run.)
    """
    rng = random.Random(f"view-changes-{seed}")         # its own stream: the fault schedule stays as it was
    steps = []
    for i, mode in enumerate(modes):
        at = duration * (0.2 + 0.6 * i / len(modes)) + rng.uniform(0.0, 0.1 * duration)
        kill_at = rng.choice(KILL_PHASES) if mode == "kill_coordinator" else None
        steps.append(ViewChangeStep(at=round(at, 2), mode=mode, coordinator=rng.randrange(members),
                                    kill_at=kill_at, down=round(rng.uniform(2.0, 6.0), 2) if kill_at else 0.0,
                                    victim=rng.randrange(1000) if mode == "replace_dead_replica" else 0))
    return steps


@dataclass
class RunningChange:
    """A change whose PUT has been sent: what its settling and its record need."""
    event: ViewChangeEvent
    before: ConfigEpoch
    planned: ConfigEpoch                    # by the product's planner, from the epoch before
    started: float                          # monotonic
    answered: threading.Event
    observer: "PhaseObserver"
    reply: dict = field(default_factory=dict)    # the body of the answer
    settled: float | None = None            # monotonic


class ViewChangeLane:
    def __init__(self, driver: ClusterDriver, faults: FaultLog, timeline: EpochTimeline,
                 steps: list[ViewChangeStep], start: float):
        self.driver = driver
        self.faults = faults
        self.timeline = timeline
        self.steps = steps
        self.start = start
        self.members = driver.nodes()
        self.events: list[ViewChangeEvent] = []

    @property
    def violations(self) -> list[str]:
        return [f"view change {e.describe()}: {p}" for e in self.events for p in e.problems]

    def grown(self) -> list[str]:
        return grown_view(self.members, self.driver.spare_nodes(), self.driver.replicas, self.faults.retired_nodes())

    def run(self, stop: threading.Event) -> None:
        """Every step, each at its time or as soon as the one before has settled. On a slow machine
        (a change stalled by faults for tens of seconds) a step may come after the clients have
        stopped (`stop`): it still runs then, so that the run still meets it, marked as such."""
        from .replacement import replace_dead_replica     # here: that module builds on this one

        for step in self.steps:
            stop.wait(max(0.0, self.start + step.at - time.monotonic()))
            if step.mode == "replace_dead_replica":
                replace_dead_replica(self, step, stop)
            else:
                self.change_view(step, stop)

    # -- one change --------------------------------------------------------------------------

    def change_view(self, step: ViewChangeStep, stop: threading.Event,
                    protect: bool = False) -> ViewChangeEvent | None:
        """A change of the whole view, the toggle's next (None if skipped); with `protect` (or to kill
        it), its coordinator is reserved in the FaultLog, so that no fault of the other lane takes it."""
        before = self.driver.current_epoch()
        coordinator = self.member_from(step.coordinator, reserve=protect or step.mode == "kill_coordinator")
        if before is None or coordinator is None:
            if coordinator is not None:
                self.faults.release(coordinator)
            return None                                 # nobody to ask: skip this step
        view = self.grown() if set(before.view) == set(self.members) else self.members
        base = self.driver.settled_planning_base() or before
        planned = plan_view_change(base, view, self.driver.replicas).epoch
        running = self.start_change(ViewChangeEvent(step.mode, coordinator, before.number, list(view),
                                                    self.driver.replicas),
                                    before, planned, stop,
                                    lambda: self.driver.change_view(coordinator, view, self.driver.replicas,
                                                                    ANSWER_LIMIT))
        killed = None
        if step.mode == "kill_coordinator":
            killed = self._kill_coordinator(step, running.event, coordinator,
                                            before.shard_of_node(coordinator) or "?",
                                            running.answered, running.observer)
        self.wait_settled(running)
        if killed is not None:
            # Down until the change settled without it, and at least `down` seconds (a hold, as
            # the fault schedule's; the end of the run cuts it short and heals everything).
            stop.wait(max(0.0, killed.injected + step.down - time.monotonic()))
            self.faults.heal(killed)
        elif protect:
            self.faults.release(coordinator)
        self.record(running)
        return running.event

    def start_change(self, event: ViewChangeEvent, before: ConfigEpoch, planned: ConfigEpoch,
                     stop: threading.Event, put: Callable[[], tuple[int, dict]]) -> RunningChange:
        """Once the event's coordinator is idle, send its change (`put`, the PUT request, in a thread)."""
        busy = self._wait_until_idle(event.coordinator)
        if busy:
            event.add_note(busy)
        started = time.monotonic()
        event.started, event.during_clients = round(started - self.start, 2), not stop.is_set()
        self.events.append(event)
        others = [m for m in self.members if m != event.coordinator]
        running = RunningChange(event, before, planned, started, threading.Event(),
                                PhaseObserver(self.driver, self.faults, others))

        def send() -> None:
            try:
                status, running.reply = put()
                event.answer = str(status) if status == 200 else \
                    f"{status} {running.reply.get('error')} {running.reply.get('cause', '')}"
            except requests.RequestException as exc:
                event.answer = type(exc).__name__          # its coordinator died, or it took too long
            running.answered.set()

        threading.Thread(target=send, name="chaos-view-change-put", daemon=True).start()
        return running

    def record(self, running: RunningChange) -> ConfigEpoch:
        """Once the change settled (or could not): its outcome, checked against its answer, in the
        event and the timeline; the epoch it settled on."""
        event, before = running.event, running.before
        running.answered.wait(ANSWER_LIMIT)
        after = self.driver.settled_epoch() or before
        event.after = after.number
        if running.settled is not None:
            event.settled = round(running.settled - self.start, 2)
            event.outcome = "committed" if after.number > before.number else "rolled back"
        self._check_outcome(event, before, running.planned, after)
        self.timeline.add(Transition(running.started, running.settled, before, running.planned, after))
        return after

    def _kill_coordinator(self, step: ViewChangeStep, event: ViewChangeEvent, coordinator: str, shard: str,
                          answered: threading.Event, observer: "PhaseObserver"):
        """SIGKILL the (reserved) coordinator once another member shows the change at or past `step.kill_at`."""
        wanted = PHASES[PHASES.index(step.kill_at):]
        seen: list[str | None] = []

        def reached() -> bool:
            answer, phase = observer.phase()
            if answer and (phase is not None or seen):
                seen.append(phase)              # a None after a phase: the change ended
            return answered.is_set() or bool(seen and seen[-1] in wanted + (None,))

        try:
            wait_until(reached, SETTLE_LIMIT, interval=0.01, message=f"phase {step.kill_at}")
        except TimeoutError:
            pass
        if not seen or seen[-1] not in wanted:
            # Not a fault of the store (a change may end, or roll back, before that phase): noted, and
            # the test that asks for a coordinator kill sees that none happened.
            event.add_note(f"the change did not reach phase {step.kill_at} (seen {seen[-3:]}): no kill")
            self.faults.release(coordinator)
            return None
        status = self.driver.group_status(coordinator, shard) or {}
        killed = self.faults.inject("kill_coordinator", shard, [coordinator], leader=status.get("role") == "leader",
                                    reserved=True)
        if killed is not None:
            event.killed_in_phase = seen[-1]
        return killed

    def wait_settled(self, running: RunningChange) -> None:
        try:
            # The change shows in the metadata group, or the PUT answered (refused, or already done).
            wait_until(lambda: running.answered.is_set() or running.observer.phase()[1] is not None,
                       START_LIMIT, interval=0.02, message="the change under way")
            wait_until(self._no_change_on_a_majority, SETTLE_LIMIT, interval=0.2, message="no change in progress")
        except TimeoutError as exc:
            running.event.problems.append(str(exc))
            return
        running.settled = time.monotonic()

    def _check_outcome(self, event: ViewChangeEvent, before: ConfigEpoch, planned: ConfigEpoch,
                       after: ConfigEpoch) -> None:
        committed = after.number > before.number
        if committed and (after.number != planned.number or after.shards != planned.shards):
            event.problems.append(f"settled on epoch {after.number} {after.shards}, planned {planned.shards}")
        if event.answer == "200" and not committed:
            event.problems.append("answered 200 but the epoch did not change")
        says_committed = "is committed" in event.answer      # 503 after the commit: clean-up left to others
        if event.answer.startswith("503") and committed != says_committed:
            event.problems.append(f"answered {event.answer!r} but the new epoch is "
                                  f"{'active' if committed else 'not active'}")
        if event.answer.startswith(("400", "409")):
            event.problems.append("a valid change, with no other change running, was refused")
        if event.killed_in_phase == "committed" and not committed and event.settled is not None:
            event.problems.append("killed after commit, but the change was rolled back")

    # -- observation -------------------------------------------------------------------------

    def _wait_until_idle(self, node: str) -> str | None:
        """Wait until `node` has no part in a change any more; what was waited for, if anything.

        A change settles in the metadata group (no phase) before the node that finished or rolled
        it back is done: it still pushes the epochs to every node, waiting up to 5 s for each one
        that is down; a new change sent meanwhile waits for it, and after 10 s answers 409 ("in
        progress on this node").
        """
        waited = time.monotonic()
        seen: list[str] = []            # the phases the node reported, in order, each once

        def idle() -> bool:
            status = self.driver.view_change_status(node, timeout=1.0)
            phase = status["progress"]["phase"] if status is not None else None
            if phase is not None and (not seen or seen[-1] != phase):
                seen.append(phase)
            return phase in IDLE_PROGRESS

        try:
            wait_until(idle, IDLE_LIMIT, interval=0.1, message=f"{node} idle")
        except TimeoutError as exc:
            # Which phase held it: seed 69 on b03b7db had to be explained from the code without it.
            return f"{exc} (phases seen: {', '.join(seen) or 'none'})"
        waited = time.monotonic() - waited
        return f"{node} was busy with the previous change for {waited:.1f}s" if waited > 0.5 else None

    def member_from(self, index: int, reserve: bool) -> str | None:
        """The index-th member, or the next one after it that no fault holds (reserved if asked)."""
        for i in range(len(self.members)):
            node = self.members[(index + i) % len(self.members)]
            if self.faults.reserve(node) if reserve else not self.faults.under_fault(node):
                return node
        return None

    def _no_change_on_a_majority(self) -> bool:
        phases = [p for ok, p in (self.driver.view_change_phase(n, timeout=1.0) for n in self.members) if ok]
        return len(phases) > len(self.members) // 2 and all(p is None for p in phases)


class PhaseObserver:
    """The phase of the change as one metadata member (not its coordinator) reports it.

    The same member while it answers and no fault holds it: a member that has just come back
    from a fault lags, and would show phases the change has left (or none before catching up
    in one go), so another one is taken only when the current one cannot be asked.
    """

    def __init__(self, driver: ClusterDriver, faults: FaultLog, candidates: list[str]):
        self.driver = driver
        self.faults = faults
        self.candidates = candidates
        self.current: str | None = None

    def phase(self) -> tuple[bool, str | None]:
        """(answered, phase)."""
        if self.current is not None and not self.faults.under_fault(self.current):
            answered, phase = self.driver.view_change_phase(self.current, timeout=1.0)
            if answered:
                return True, phase
        for node in self.candidates:
            if node != self.current and not self.faults.under_fault(node):
                answered, phase = self.driver.view_change_phase(node, timeout=1.0)
                if answered:
                    self.current = node
                    return True, phase
        return False, None
