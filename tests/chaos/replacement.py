"""The view-change lane's "replace_dead_replica" step: a replica dies, and an idle spare replaces it in place.

What an operator does when a node is lost for good, while the clients run and
the fault lane goes on:

1. pick the victim: a replica that neither the clients nor the coordinators use,
   i.e. a spare node serving a shard (every node of the initial view is both a
   client entry and a metadata member that may coordinate). If the view has
   none (the lane's previous change, to the grown view, was rolled back), the
   step first grows the view itself, with a "change" whose coordinator is
   protected from faults;
2. SIGKILL it: a fault of the FaultLog ("kill_to_replace"), the node reserved
   first, so that the fault lane neither pauses nor kills it meanwhile;
3. PUT /kvs/view-change/remove-member {victim} through a live metadata member
   of the initial view, reserved for the whole step (a coordinator dying is
   what "kill_coordinator" tests; here the replacement is to get done);
4. PUT /kvs/view-change/add-member {an idle spare, the victim's shard} through
   the same member.

Both are view changes as the lane records them (events, epoch timeline), their
answers checked the same way (200 committed as planned, 503 rolled back, never
400 or 409), and both must be in place: the shard keeps its id and only its
replica set changes (the victim out, then the spare in), no other shard
changes, and a 200 lists the shard under its id with those replicas.

A removal that did not commit leaves the victim a replica: it is restarted at
once (the final checks compare every replica of the final epoch) and the step
ends there; so does an addition that did not commit (the shard runs on with
the replicas left). Once removed, the victim stays down for the rest of the
run (`FaultLog.retire`), because nothing needs it back: it is in no epoch
after its removal, so no check looks at it (the replicas compared, and the
nodes that must route by the final epoch, are the final epoch's; the metadata
group keeps a majority without it), the clients never used it, and the grown
view of a later step leaves it out. A removed node that comes back is another
scenario (see docs/ARCHITECTURE.md, known gaps), not this one.
"""

from __future__ import annotations

import threading

import requests

from kvs.config.epoch import ConfigEpoch
from kvs.reconfig.planner import plan_add_member, plan_remove_member
from kvs.testing.cluster import wait_until

from .faults import FaultEvent
from .view_changes import ANSWER_LIMIT, RunningChange, ViewChangeEvent, ViewChangeLane, ViewChangeStep

MODE = "replace_dead_replica"
# A victim free of other faults, then an idle spare, within this: a fault holds its nodes 2-5 s, and
# a kill's heal up to RESTART_LIMIT more, until its nodes serve again (slow under load in Docker).
FIND_LIMIT = 60.0


def victims(members: list[str], epoch: ConfigEpoch) -> list[tuple[str, str]]:
    """(node, shard id) of every replica of `epoch` outside `members` (the nodes clients and coordinators use)."""
    return [(node, sid) for sid in epoch.shard_ids() for node in epoch.replicas(sid) if node not in members]


def replace_dead_replica(lane: ViewChangeLane, step: ViewChangeStep, stop: threading.Event) -> None:
    epoch = lane.driver.current_epoch()
    if epoch is not None and not victims(lane.members, epoch):
        grow = lane.change_view(ViewChangeStep(step.at, "change", step.coordinator, None, 0.0), stop, protect=True)
        if grow is not None:
            grow.add_note(f"made by {MODE}, for a replica outside the clients' nodes")
    coordinator = lane.member_from(step.coordinator, reserve=True)
    if coordinator is None:
        return                                          # every member under a fault: skip, as the other steps do
    try:
        Replacement(lane, step, coordinator, stop).run()
    finally:
        lane.faults.release(coordinator)


class Replacement:
    def __init__(self, lane: ViewChangeLane, step: ViewChangeStep, coordinator: str, stop: threading.Event):
        self.lane = lane
        self.driver = lane.driver
        self.faults = lane.faults
        self.step = step
        self.coordinator = coordinator
        self.stop = stop

    def run(self) -> None:
        killed = self._kill_victim()
        if killed is None:
            self._note(f"{MODE}: no victim killed (none free of faults within {FIND_LIMIT:g}s, or the kill "
                       f"failed: see the harness errors)")
            return
        victim, shard = killed.nodes[0], killed.shard
        before = self.driver.current_epoch()
        if before is None:
            self._note(f"{MODE}: no metadata member answered with the epoch to plan from; {victim} restarted")
            self.faults.heal(killed)
            return
        after = self._member_change("remove-member", victim, shard, before,
                                    plan_remove_member(self._base(before), victim).epoch,
                                    lambda: self.driver.remove_member(self.coordinator, victim, ANSWER_LIMIT))
        if victim in after.view:
            self.faults.heal(killed)                    # still a replica: the final checks need it up
            return
        self.faults.retire(killed)
        spare = self._idle_spare(after)
        if spare is None:
            self._note(f"{MODE}: no idle spare within {FIND_LIMIT:g}s; shard {shard} runs on with "
                       f"{len(after.replicas(shard))} replicas")
            return
        self._member_change("add-member", spare, shard, after, plan_add_member(self._base(after), spare, shard).epoch,
                            lambda: self.driver.add_member(self.coordinator, spare, shard, ANSWER_LIMIT))

    def _kill_victim(self) -> FaultEvent | None:
        """SIGKILL a victim, drawn by the step among those no fault holds (reserved, then killed)."""
        def candidates() -> list[tuple[str, str]]:
            epoch = self.driver.current_epoch()
            found = victims(self.lane.members, epoch) if epoch is not None else []
            return [found[(self.step.victim + i) % len(found)] for i in range(len(found))]

        chosen = _first(candidates, lambda c: self.faults.reserve(c[0]), "a victim free of faults")
        if chosen is None:
            return None
        victim, shard = chosen
        status = self.driver.group_status(victim, shard) or {}
        return self.faults.inject("kill_to_replace", shard, [victim], leader=status.get("role") == "leader",
                                  reserved=True)

    def _member_change(self, request: str, member: str, shard: str, before: ConfigEpoch, planned: ConfigEpoch,
                       put) -> ConfigEpoch:
        """Send one member change, wait until it settled, record it and check it; the epoch after it."""
        event = ViewChangeEvent(MODE, self.coordinator, before.number, list(planned.view), planned.repl_factor,
                                request=request, member=member, shard=shard)
        running = self.lane.start_change(event, before, planned, self.stop, put)
        self.lane.wait_settled(running)
        after = self.lane.record(running)
        self._check_in_place(running, after, shard, planned.replicas(shard))
        return after

    def _check_in_place(self, running: RunningChange, after: ConfigEpoch, shard: str,
                        replicas: tuple[str, ...]) -> None:
        """A committed member change changed the shard's replicas only, under the same id; a 200 says so."""
        event, before = running.event, running.before
        if after.number > before.number:
            expected = dict(before.shards, **{shard: tuple(replicas)})
            if dict(after.shards) != expected:
                event.problems.append(f"not in place: epoch {after.number} has shards {dict(after.shards)}, "
                                      f"expected {expected}")
        if event.answer == "200":
            listed = {s.get("shard-id"): s.get("replicas") for s in running.reply.get("shards", [])}
            if listed.get(shard) != list(replicas):
                event.problems.append(f"answered 200 with shards {listed}: shard {shard} should have {list(replicas)}")

    def _idle_spare(self, epoch: ConfigEpoch) -> str | None:
        """A spare outside the view, up and free of faults, that runs no replica (a node that left a view
        closes its replicas a moment later); the first in the driver's order."""
        retired = self.faults.retired_nodes()
        candidates = [s for s in self.driver.spare_nodes() if s not in epoch.view and s not in retired]
        return _first(lambda: candidates, lambda s: not self.faults.under_fault(s) and self._runs_no_replica(s),
                      "an idle spare")

    def _runs_no_replica(self, node: str) -> bool:
        try:
            status, body = self.driver.http(node, "/kvs/status", timeout=2)
        except (requests.RequestException, ValueError):
            return False
        return status == 200 and not any(name.startswith("shard-") for name in body.get("groups", {}))

    def _base(self, epoch: ConfigEpoch) -> ConfigEpoch:
        return self.driver.settled_planning_base() or epoch

    def _note(self, text: str) -> None:
        """What did not go as scheduled, on the lane's latest event (the report shows it there)."""
        if self.lane.events:
            self.lane.events[-1].add_note(text)


def _first(candidates, take, what: str):
    """The first of `candidates()` that `take` accepts, looked for again every 0.2 s for FIND_LIMIT
    seconds; None if there is none by then."""
    found: list = []

    def one() -> bool:
        for candidate in candidates():
            if take(candidate):
                found.append(candidate)
                return True
        return False

    try:
        wait_until(one, FIND_LIMIT, interval=0.2, message=what)
    except TimeoutError:
        return None
    return found[0]
