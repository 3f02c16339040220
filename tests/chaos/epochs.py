"""Which configuration epoch the cluster ran when: what the checks of a chaos run route by.

A run starts at the epoch the cluster reports and goes through the view changes
of its view-change lane. Each change is a `Transition`: from `started` (the PUT
was sent) to `settled` (no change in progress any more) the cluster may route
by the epoch before or by the planned one; after it, by the epoch it settled on
(the planned one if committed, the one before if rolled back).

`planned` is computed by the test with the product's planner
(`kvs.reconfig.planner.plan_view_change`, a pure function of the epoch before and
the requested view), so it is exactly the plan the coordinator records, even
for a change that was rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvs.config.epoch import ConfigEpoch

# After a change settles, nodes may still route a moving key by the old epoch for a moment (they
# learn the new one from the metadata group or a push), and the key's request then waits for the
# epoch and is routed again: this long after `settled` a moving key may still fail.
SETTLE_GRACE = 3.0


@dataclass
class Transition:
    started: float                  # monotonic
    settled: float | None           # monotonic; None if it never settled (then: until the end of the run)
    before: ConfigEpoch
    planned: ConfigEpoch
    after: ConfigEpoch

    def overlaps(self, call: float, end: float) -> bool:
        stop = float("inf") if self.settled is None else self.settled + SETTLE_GRACE
        return call < stop and end > self.started

    def moves(self, key: str) -> bool:
        """The plan gives the key another group (shard ids are never shared by different groups)."""
        return self.before.shard_for_key(key) != self.planned.shard_for_key(key)


class EpochTimeline:
    def __init__(self, first: ConfigEpoch):
        self.first = first
        self.transitions: list[Transition] = []

    def add(self, transition: Transition) -> None:
        self.transitions.append(transition)

    def epochs_during(self, call: float, end: float) -> list[ConfigEpoch]:
        """Every epoch the cluster may have routed by at some moment of [call, end]."""
        return _unique([e for start, stop, epochs in self._segments() if call < stop and end > start
                        for e in epochs])

    def moving_during(self, key: str, call: float, end: float) -> bool:
        """The key changes group in a view change under way during [call, end] (or just settled)."""
        return any(t.overlaps(call, end) and t.moves(key) for t in self.transitions)

    def last(self) -> ConfigEpoch:
        return self.transitions[-1].after if self.transitions else self.first

    def _segments(self) -> list[tuple[float, float, list[ConfigEpoch]]]:
        """(from, until, epochs): one epoch between changes, both sides of a change while it runs."""
        segments, since, current = [], float("-inf"), self.first
        for t in self.transitions:
            until = float("inf") if t.settled is None else t.settled + SETTLE_GRACE
            segments += [(since, t.started, [current]), (t.started, until, [t.before, t.planned])]
            since, current = until, t.after
        return segments + [(since, float("inf"), [current])]


def _unique(epochs: list[ConfigEpoch]) -> list[ConfigEpoch]:
    seen: dict[tuple, ConfigEpoch] = {}
    for epoch in epochs:
        seen.setdefault((epoch.number, epoch.status, tuple(sorted(epoch.shards.items()))), epoch)
    return list(seen.values())
