"""Faults of a chaos run: the seeded schedule, and the log of what was injected and healed.

Two lanes of a run inject faults: the fault schedule (`make_schedule`) and the
view-change lane (`view_changes.py`, which kills a change's coordinator, and a
replica that it then replaces: `replacement.py`). Both go through one
`FaultLog`, which never lets two faults hold the same node at once: a node
killed by one lane is neither paused nor killed again by the other (docker
cannot kill a stopped container, and the heals would race). A node killed and
then taken out of the cluster is retired: it stays down, never healed.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from .driver import ClusterDriver

FAULT_KINDS = ("kill_leader", "kill_follower", "pause_leader", "pause_follower", "isolate_leader",
               "isolate_follower", "kill_group")
RESTART_LIMIT = 30.0     # a restarted node must serve again within this


@dataclass(frozen=True)
class Fault:
    at: float            # seconds after the start of the run
    kind: str
    shard: str           # a shard of the largest layout; mapped onto the shards of the epoch at `at`
    hold: float          # seconds until healed


@dataclass
class FaultEvent:
    kind: str            # a FAULT_KINDS entry, or "kill_coordinator"
    shard: str           # the shard (of the epoch active at injection) whose replicas were hit
    nodes: list[str]
    injected: float      # monotonic
    healed: float | None = None
    leader: bool = False  # a target was the shard's leader: the group had to elect a new one
    retired: bool = False  # its nodes left the cluster while down: they stay down, unhealed


def make_schedule(seed: int, duration: float, shards: int, kinds: tuple[str, ...] = FAULT_KINDS) -> list[Fault]:
    """One fault at a time: injected, held 2-5 s, healed, then 3-5 s of quiet. Pure in its inputs."""
    rng = random.Random(seed)
    faults, t = [], 3.0
    while True:
        hold = rng.uniform(2.0, 5.0)
        if t + hold + 2.0 > duration:
            return faults
        faults.append(Fault(at=round(t, 2), kind=rng.choice(kinds), shard=str(rng.randint(1, shards)),
                            hold=round(hold, 2)))
        t += hold + rng.uniform(3.0, 5.0)


class FaultLog:
    """Injects and heals faults through the driver; records every event; one fault per node at a time."""

    def __init__(self, driver: ClusterDriver):
        self.driver = driver
        self.events: list[FaultEvent] = []
        self.violations: list[str] = []
        self.harness_errors: list[str] = []     # the driver failed to inject or heal (not the store's doing)
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._healing: set[int] = set()

    def under_fault(self, node: str) -> bool:
        with self._lock:
            return node in self._held

    def reserve(self, node: str) -> bool:
        """Hold `node` for a fault to come (no other fault may take it meanwhile); False if held."""
        with self._lock:
            if node in self._held:
                return False
            self._held.add(node)
            return True

    def release(self, node: str) -> None:
        """Give back a reserved node that no fault took."""
        with self._lock:
            self._held.discard(node)

    def inject(self, kind: str, shard: str, targets: list[str], leader: bool,
               reserved: bool = False) -> FaultEvent | None:
        """Apply `kind`'s action to the targets no other fault holds (or that the caller reserved);
        None if none is left."""
        with self._lock:
            free = list(targets) if reserved else [n for n in targets if n not in self._held]
            self._held.update(free)
        if not free:
            return None
        action = {"kill": self.driver.kill, "pause": self.driver.pause, "isolate": self.driver.isolate}[_action(kind)]
        event = FaultEvent(kind, shard, free, injected=time.monotonic(), leader=leader)
        with self._lock:
            self.events.append(event)       # from before the first action: the checks see it from then
        applied = []
        for node in free:
            try:
                action(node)
                applied.append(node)
            except Exception as exc:        # e.g. docker pause failing under load ("unable to freeze")
                self.harness_errors.append(f"{kind} of {node} not injected: {exc}")
        with self._lock:
            self._held.difference_update(set(free) - set(applied))
            if not applied:
                self.events.remove(event)
                return None
        event.nodes = applied
        return event

    def heal(self, event: FaultEvent) -> None:
        with self._lock:                    # healed once, whichever lane (or the final clean-up) comes first
            if event.healed is not None or id(event) in self._healing:
                return
            self._healing.add(id(event))
        action = _action(event.kind)
        heal = {"kill": self.driver.start_node, "pause": self.driver.resume, "isolate": self.driver.heal}[action]
        for node in event.nodes:
            try:
                heal(node)
            except Exception as exc:        # the checks that follow show what a node left broken does
                self.harness_errors.append(f"healing {event.kind} of {node} failed: {exc}")
        if action == "kill":
            # A restarted node has returned once it serves again; the grace period runs from then.
            try:
                self.driver.wait_healthy(event.nodes, timeout=RESTART_LIMIT)
            except TimeoutError:
                self.violations.append(f"{event.nodes} not healthy {RESTART_LIMIT}s after restart")
        event.healed = time.monotonic()
        with self._lock:
            self._held.difference_update(event.nodes)

    def retire(self, event: FaultEvent) -> None:
        """The event's (killed) nodes were taken out of the cluster: they stay down for the rest of
        the run, held, so that no fault takes them and `heal_everything` leaves them down."""
        with self._lock:
            event.retired = True

    def retired_nodes(self) -> set[str]:
        with self._lock:
            return {node for e in self.events if e.retired for node in e.nodes}

    def heal_everything(self) -> None:
        with self._lock:
            pending = [e for e in self.events if e.healed is None and not e.retired]
        for event in pending:
            self.heal(event)


def _action(kind: str) -> str:
    return kind.split("_")[0]          # kill_leader -> kill, kill_coordinator -> kill, pause_... -> pause
