"""ViewChange: the coordinator of a two-phase configuration change, one at a time per node.

The node that receives `PUT /kvs/view-change` (or add-member, remove-member,
reshard) checks the request, plans epoch N+1 (`kvs.reconfig.planner`) on the
settled epoch N, holds the node's one change and drives the plan through its
phases (`kvs.reconfig.phases`: prepare, copy, catch up and freeze, commit,
clean up; or roll back), each recorded in the metadata group. A change runs as
a background job of the node (`submit`): the HTTP request that asked for it
only waits for it. A change whose coordinator died is finished or rolled back
through `take_over`, called by `kvs.reconfig.takeover` on the metadata leader
or on the coordinator itself once it restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Callable, TypeVar

from kvs.config.epoch import ConfigEpoch
from kvs.errors import BadRequest, Conflict, KvsError, Unavailable
from kvs.fsm.base import Invalid
from kvs.reconfig import settle
from kvs.reconfig.phases import ChangePhases, CoordinatedNode, Progress
from kvs.reconfig.planner import Plan, plan_add_member, plan_remove_member, plan_view_change
from kvs.reconfig.remote import Remote
from kvs.settings import normalize_address, parse_view

log = logging.getLogger(__name__)

JOB_JOIN_SECONDS = 10.0   # a running change is given this long to end when the node stops
BUSY_WAIT_SECONDS = 10.0  # a new change waits this long for the node's previous one to let go
PLAN_READ_SECONDS = 10.0  # a change reads the committed configuration it plans on within this

T = TypeVar("T")


class ViewChange:
    def __init__(self, node: CoordinatedNode, remote: Remote):
        self._node = node
        self._remote = remote
        self._busy = threading.Lock()
        self._stopping = threading.Event()      # no new change starts once the node stops
        self.progress = Progress()
        self._phases = ChangePhases(node, remote, self.progress)
        self._jobs_lock = threading.Lock()
        self._jobs: list[threading.Thread] = []

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, job: Callable[[], T]) -> T:
        """Run `job` on a background thread of the node and wait for its outcome. The job goes on if
        the caller (an HTTP request thread) gives up; `stop` waits for it, bounded."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(job())
            except BaseException as exc:        # handed to the waiting caller, which raises it
                future.set_exception(exc)
            finally:
                with self._jobs_lock:
                    self._jobs.remove(threading.current_thread())

        thread = threading.Thread(target=run, name="kvs-view-change-job", daemon=True)
        with self._jobs_lock:
            self._jobs.append(thread)
        thread.start()
        return future.result()

    def stop(self) -> None:
        self._stopping.set()
        with self._jobs_lock:
            jobs = list(self._jobs)
        for thread in jobs:
            thread.join(JOB_JOIN_SECONDS)
            if thread.is_alive():
                log.warning("a view change was still running when the node stopped; "
                            "another metadata member takes it over")

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    # -- the requests --------------------------------------------------------------------------

    def run(self, view_text: object, repl_factor: object) -> list[dict]:
        """Change the view; returns the new shards with key counts. Blocks until done."""
        if not isinstance(view_text, str) or not parse_view(view_text):
            raise BadRequest("view must be a non-empty comma-separated list of addresses")
        if repl_factor is not None and (not isinstance(repl_factor, int) or isinstance(repl_factor, bool)):
            raise BadRequest("repl-factor must be an integer")
        current = self._settled_epoch()
        return self._carry_out(plan_view_change(current, parse_view(view_text), repl_factor), current)

    def reshard(self, shard_count: object) -> list[dict]:
        """Reshard: the same nodes in `shard_count` shards (the replication factor follows)."""
        if not isinstance(shard_count, int) or isinstance(shard_count, bool) or shard_count < 1:
            raise BadRequest("shard-count must be a positive integer")
        current = self._settled_epoch()
        if len(current.view) % shard_count:
            raise BadRequest(f"{len(current.view)} nodes cannot form {shard_count} shards of equal size")
        # Planned on this one read: a second one could see another view than the nodes counted here.
        return self._carry_out(plan_view_change(current, list(current.view), len(current.view) // shard_count),
                               current)

    def add_member(self, address: object, shard_id: object) -> list[dict]:
        """An idle node joins shard `shard_id`'s Raft group (in place: no key moves)."""
        address = _address_field(address)
        if isinstance(shard_id, int) and not isinstance(shard_id, bool):
            shard_id = str(shard_id)            # shard ids are strings; a JSON number is clear enough
        if not isinstance(shard_id, str) or not shard_id:
            raise BadRequest('shard-id must be the id of a shard, such as "1"')
        current = self._settled_epoch()
        plan = plan_add_member(current, address, shard_id)
        settle.check_idle(self._remote, address)        # reachable too: asked again below only if not
        return self._carry_out(plan, current, checked=frozenset((address,)))

    def remove_member(self, address: object) -> list[dict]:
        """A node leaves the view; its shard's group shrinks by one in place, or the shard is retired if
        the node was its only replica. The node may be down (taking a dead replica out is what this is for)."""
        current = self._settled_epoch()
        return self._carry_out(plan_remove_member(current, _address_field(address)), current)

    def _settled_epoch(self) -> ConfigEpoch:
        """The active epoch as the metadata group has committed it, when no change is running (Conflict
        otherwise). Read through the group (a ReadIndex round), not from this node's view: a member that
        restarted and still replays the metadata log would plan on an epoch the group has left behind,
        and refuse a valid change as naming a node outside the view (docker soak seed 54 on f4c40a1).
        A member that cannot reach the group's leader answers 503."""
        active, change, floor = self._node.committed_configuration(time.monotonic() + PLAN_READ_SECONDS)
        if active is None or change is not None:
            raise Conflict("a view change is in progress" if active else "no configuration yet")
        current = ConfigEpoch.from_dict(active)
        # Plan new groups after every id any plan used, a rolled-back one's too (the metadata group
        # refuses a plan that reuses one).
        return replace(current, max_shard_id=floor) if floor > current.max_shard_id else current

    # -- the change ----------------------------------------------------------------------------

    def _carry_out(self, plan: Plan, current: ConfigEpoch, checked: frozenset[str] = frozenset()) -> list[dict]:
        """Prepare, copy, commit and clean up `plan` (or roll it back); the new shards with key counts.
        A plan that changes nothing (the current layout, sent again) is no change: no new epoch. `checked`:
        new nodes whose reachability the caller has just checked."""
        if not plan.moves and not plan.new_groups and not plan.retired_groups and not plan.members \
                and plan.epoch.shards == current.shards and plan.epoch.view == current.view:
            return settle.shard_report(self._remote, current)
        settle.check_reachable(self._remote, plan.epoch, current, checked)
        self._acquire(current)
        try:
            self._change(plan, current)
        finally:
            self._phases.copy.copied_keys.clear()
            self._busy.release()
        # Outside the lock: the change is over once it is done, and counting every shard's keys
        # can wait on slow replicas; a next change must not be refused meanwhile.
        return settle.shard_report(self._remote, plan.epoch)

    def _acquire(self, current: ConfigEpoch) -> None:
        """Hold the node's one change, planned on `current`. A change that settled in the metadata
        group can still hold the node briefly (a take-over's claim of a change that just ended, the
        last pushes of an epoch), and status shows it idle meanwhile: wait for it, bounded, rather
        than refuse a change the client was just told it may send."""
        deadline = time.monotonic() + BUSY_WAIT_SECONDS
        while not self._busy.acquire(timeout=0.1):
            if self._stopping.is_set():
                raise Unavailable("the node is stopping")
            if time.monotonic() >= deadline:
                raise Conflict("a view change is in progress on this node")
        try:
            if self._stopping.is_set():
                raise Unavailable("the node is stopping")
            latest = self._settled_epoch()
            # The shard-id floor too: a change prepared and rolled back meanwhile used the plan's new ids.
            if (latest.number, latest.max_shard_id) != (current.number, current.max_shard_id):
                raise Conflict("the configuration changed while this change waited; plan it again")
        except BaseException:
            self._busy.release()
            raise

    def _change(self, plan: Plan, current: ConfigEpoch) -> None:
        self._phases.start(plan.epoch.number, "preparing", len(plan.moves), len(plan.members))
        result = self._phases.meta(("prepare", plan.to_dict(), self._node.settings.address))
        if isinstance(result, Invalid):
            self.progress.phase, self.progress.error = "refused", result.reason
            raise Conflict(result.reason)
        try:
            self._phases.prepare_and_copy(plan, current)
        except Exception as exc:
            self.progress.error = str(exc)
            self._phases.roll_back(plan, current)
            raise
        self._phases.commit(plan)
        try:
            self._phases.clean_up(plan, current)
        except KvsError as exc:
            # Committed: nothing rolls back now. The metadata group still records the change, so a
            # watcher takes it over and finishes the clean-up; the client learns it is committed.
            self.progress.phase, self.progress.error = "clean-up failed", exc.message
            raise Unavailable(f"epoch {plan.epoch.number} is committed, but its clean-up failed "
                              f"({exc.message}); another node finishes it") from exc
        self.progress.phase = "done"

    def take_over(self, change: dict) -> None:
        """Finish (committed) or roll back (not committed) a change whose coordinator is gone."""
        if not self._busy.acquire(blocking=False):
            return
        try:
            n, me = change["number"], self._node.settings.address
            # Busy from here on, and the status says so: the claim is a metadata round trip.
            before, self.progress.phase = self.progress.phase, "taking over"
            if self._phases.meta(("claim", n, change["coordinator"], change["steps"], me)) is not True:
                self.progress.phase = before        # the change ended, or another node has it
                return
            log.warning("%s takes over the view change to epoch %d (phase %s) from %s",
                        me, n, change["phase"], change["coordinator"])
            plan = Plan.from_dict(change["plan"])
            self._phases.start(n, change["phase"], len(plan.moves), len(plan.members))
            if change["phase"] == "committed":
                self._phases.clean_up(plan, self._node.meta_epoch(n - 1) or plan.epoch)
                self.progress.phase = "done"
            else:
                # The epoch the change was planned on, as the metadata group recorded it: this node may
                # route by an older one (it restarted and takes its own change over) or by none yet.
                self._phases.roll_back(plan, self._node.meta_epoch(n - 1) or self._node.epoch)
        finally:
            self._busy.release()


def _address_field(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("address must be a 'host:port' string")
    return normalize_address(value)

