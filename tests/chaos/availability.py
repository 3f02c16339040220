"""The availability check of a chaos run: which failed operations the run's faults and view changes excuse.

An operation that did not succeed (failed, or unknown: a write that timed out
or got 503) is excused, and only then, if:

* it was sent to a node under a fault (or healed less than GRACE before); or
* its key was moving: a view change that moves the key (by the plan, even if
  the change was rolled back) was under way, or settled less than
  SETTLE_GRACE before. Clients of a moving key wait while its ranges are
  frozen for the final copy and until routers learn the new epoch; a change
  whose coordinator dies keeps them frozen until another node rolls it back
  (5 s without progress, then the roll-back). A key that does not move is
  served by the same group throughout, so a change alone excuses nothing for
  it; or
* a group the key belonged to at some moment of the operation (by the epochs
  of `EpochTimeline`) had lost its majority (its replicas under faults at the
  same time: every replica killed, or the coordinator killed while another
  fault holds a second replica), or had lost its leader less than GRACE
  before (an election), or a fault of one of its replicas was healed less
  than GRACE before (a rejoining replica may force an election: PySyncObj
  has no pre-vote). A fault on a follower alone excuses nothing: the group
  keeps its leader and majority.
"""

from __future__ import annotations

from kvs.testing.linearizability import OK, Operation

from .epochs import EpochTimeline
from .faults import FaultEvent

GRACE = 3.0              # seconds after a heal within which a group must serve again
UNKNOWN_SPAN = 7.0       # an operation without a return time is taken to have lasted the client timeout


class AvailabilityCheck:
    def __init__(self, events: list[FaultEvent], timeline: EpochTimeline, start: float, now: float):
        self.events = events
        self.timeline = timeline
        self.start = start
        self.now = now                  # stands for "healed" of a fault never healed

    def run(self, records: list[tuple[Operation, str]]) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
        """(violations, per shard: when clients that reached a healthy node saw failures, in run seconds)."""
        violations: list[str] = []
        windows: dict[str, list[tuple[float, float]]] = {}
        for op, node in records:
            if op.outcome == OK or op.client == "final":
                continue
            end = op.ret if op.ret is not None else op.call + UNKNOWN_SPAN
            if self._sent_to_faulty_node(node, op.call, end):
                continue
            # the store failed a client that reached a healthy node
            groups = [(e.shard_for_key(op.key), e) for e in self.timeline.epochs_during(op.call, end)]
            for shard_id in {shard_id for shard_id, _ in groups}:
                windows.setdefault(shard_id, []).append((op.call - self.start, end - self.start))
            if any(self._group_excused(shard_id, set(epoch.replicas(shard_id)), op.call, end)
                   for shard_id, epoch in groups):
                continue
            if self.timeline.moving_during(op.key, op.call, end):
                windows.setdefault("moving keys", []).append((op.call - self.start, end - self.start))
            else:
                shards = sorted({shard_id for shard_id, _ in groups})
                violations.append(f"{op.kind} {op.key} via {node} {op.outcome} at {op.call - self.start:.1f}s "
                                  f"outside any fault window of shard {'/'.join(shards)} or of {node}")
        return violations, {g: _merge(w) for g, w in windows.items()}

    def _healed(self, event: FaultEvent) -> float:
        return event.healed if event.healed is not None else self.now

    def _sent_to_faulty_node(self, node: str, call: float, end: float) -> bool:
        return any(node in e.nodes and call < self._healed(e) + GRACE and end > e.injected for e in self.events)

    def _group_excused(self, shard_id: str, replicas: set[str], call: float, end: float) -> bool:
        def overlaps(start: float, stop: float) -> bool:
            return call < stop and end > start

        if self._majority_lost(replicas, call, end):
            return True
        for event in self.events:
            if not replicas & set(event.nodes):
                continue
            healed = self._healed(event)
            if event.leader and event.shard == shard_id and overlaps(event.injected, event.injected + GRACE):
                return True                         # electing a new leader
            if overlaps(healed, healed + GRACE):
                return True                         # a replica rejoining
        return False

    def _majority_lost(self, replicas: set[str], call: float, end: float) -> bool:
        """At some moment of [call, end], more than a minority of the replicas were under faults."""
        down = [(node, e.injected, self._healed(e) + GRACE) for e in self.events for node in e.nodes
                if node in replicas]
        needed = len(replicas) - len(replicas) // 2
        for _, since, _ in down:
            moment = max(since, call)
            if moment >= end:
                continue
            if len({node for node, a, b in down if a <= moment < b}) >= needed:
                return True
        return False


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1] + 0.5:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(round(a, 1), round(b, 1)) for a, b in merged]
