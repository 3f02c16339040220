"""ViewChange: the coordinator of a two-phase configuration change.

The node that receives `PUT /kvs/view-change` plans epoch N+1
(`kvs.shard.planner`) and drives it, recording each phase in the metadata
group (`kvs.raft.meta_state`):

1. prepare: commit the plan as pending; every node of both views learns it and
   starts the replicas of the new groups it belongs to.
2. copy: every moving range is exported from its source group (after a read
   barrier) and installed into its destination through the destination's own
   log, with its slice of the deduplication table, while the source serves.
3. catch up, freeze, catch up: sources number every write of a moving key
   from the start of the copy ("track"); a few rounds copy only the keys
   written since the previous copy while the sources serve; then sources stop
   serving only the moving keys (`NotOwned`) and one last round copies what
   was written since, so destinations hold exactly what the sources held at
   freeze time. Clients of moving keys wait only for this last, small round.
4. commit: epoch N+1 becomes active; every node learns it; routers that still
   route by N meet a frozen source, wait for N+1 and route again.
5. clean up: kept groups take the new ownership, sources drop the keys they
   gave away, retired groups stop, and the change is finished.

A failure before commit rolls back: sources thaw, the pending epoch is
aborted, nodes forget it. Every step is idempotent (commands are keyed by the
epoch number), so steps may be retried.

Crash safety: every metadata member watches the recorded change. If it makes
no progress for `TAKEOVER_SECONDS` and its coordinator is gone (or is this
node, restarted), the watcher claims the change through the metadata log (one
claimant wins) and rolls it back if it was not committed, or finishes the
clean-up if it was. There is never a half-state that needs a tool.

After the change is finished, the metadata group's membership follows the
new view one node at a time (`kvs.membership`); the reply waits for it
(bounded), so nodes that left the view may be stopped once it arrives.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ..errors import BadRequest, Conflict, KvsError, Unavailable
from ..forwarding import Forwarder, PeerUnreachable
from ..node import Node
from ..raft.state_machine import Invalid
from ..settings import METADATA_SLOT, normalize_address, parse_view
from .layout import ConfigEpoch
from .planner import Move, Plan, plan_add_member, plan_remove_member, plan_view_change

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024   # one install command carries about this much (requests are capped at 1 MiB)
DROP_KEYS = 2000          # keys per drop-keys command after the commit
COPY_PAUSE_RATIO = 3.0    # the bulk copy pauses this long, relative to each install, between installs
STEP_SECONDS = 30.0       # each remote step must succeed within this
MEMBERSHIP_SECONDS = 60.0 # the metadata group should follow the new view within this
PUSH_SECONDS = 5.0        # a node that does not take pushed epochs within this learns them later
SETTLE_SECONDS = 30.0     # new groups must elect leaders, nodes must learn epochs, within this
CATCH_UP_ROUNDS = 3       # at most this many catch-up copies while the sources still serve
FREEZE_BELOW_KEYS = 500   # freeze once a catch-up round moved fewer keys than this
TAKEOVER_SECONDS = 5.0    # a change without progress this long, whose coordinator is gone, is taken over
WATCH_PERIOD = 1.0


@dataclass
class Progress:
    epoch: int = 0
    phase: str = "idle"
    moves_total: int = 0
    moves_done: int = 0
    keys_moved: int = 0
    keys_total: int = 0        # keys in the bulk copies read so far: the total once moves-done = moves-total
    error: str | None = None

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "phase": self.phase, "moves-total": self.moves_total,
                "moves-done": self.moves_done, "keys-moved": self.keys_moved,
                "keys-total": self.keys_total, "error": self.error}


class ViewChange:
    def __init__(self, node: Node, forwarder: Forwarder):
        self._node = node
        self._forwarder = forwarder
        self._busy = threading.Lock()
        self.progress = Progress()
        self._copied_keys: dict[tuple[int, str], set[str]] = {}    # (epoch, source) -> keys copied away

    # -- the request ---------------------------------------------------------------------

    def run(self, view_text: object, repl_factor: object) -> list[dict]:
        """Change the view; returns the new shards with key counts. Blocks until done."""
        if not isinstance(view_text, str) or not parse_view(view_text):
            raise BadRequest("view must be a non-empty comma-separated list of addresses")
        if repl_factor is not None and (not isinstance(repl_factor, int) or isinstance(repl_factor, bool)):
            raise BadRequest("repl-factor must be an integer")
        current = self._settled_epoch()
        return self._carry_out(plan_view_change(current, parse_view(view_text), repl_factor), current)

    def _carry_out(self, plan: Plan, current: ConfigEpoch) -> list[dict]:
        """Prepare, copy, commit and clean up `plan` (or roll it back); the new shards with key counts."""
        self._check_reachable(plan.epoch, current)
        if not self._busy.acquire(blocking=False):
            raise Conflict("a view change is in progress on this node")
        try:
            self._copied_keys = {}
            self.progress = Progress(epoch=plan.epoch.number, phase="preparing", moves_total=len(plan.moves))
            result = self._meta(("prepare", plan.to_dict(), self._node.settings.address))
            if isinstance(result, Invalid):
                raise Conflict(result.reason)
            try:
                self._prepare_and_copy(plan, current)
            except Exception as exc:
                self.progress.error = str(exc)
                self._roll_back(plan, current)
                raise
            self._commit(plan)
            try:
                self._clean_up(plan, current)
            except KvsError as exc:
                # Committed: nothing rolls back now. The metadata group still records the change, so a
                # watcher takes it over and finishes the clean-up; the client learns it is committed.
                self.progress.phase, self.progress.error = "clean-up failed", exc.message
                raise Unavailable(f"epoch {plan.epoch.number} is committed, but its clean-up failed "
                                  f"({exc.message}); another node finishes it") from exc
            self.progress.phase = "done"
            return self._shard_report(plan.epoch)
        finally:
            self._copied_keys = {}
            self._busy.release()

    def reshard(self, shard_count: object) -> list[dict]:
        """The seeds' reshard: the same nodes in `shard_count` shards (the replication factor follows)."""
        current = self._node.epoch
        if current is None:
            raise Conflict("no configuration yet")
        if not isinstance(shard_count, int) or isinstance(shard_count, bool) or shard_count < 1:
            raise BadRequest("shard-count must be a positive integer")
        if len(current.view) % shard_count:
            raise BadRequest(f"{len(current.view)} nodes cannot form {shard_count} shards of equal size")
        return self.run(",".join(current.view), len(current.view) // shard_count)

    def add_member(self, address: object, shard_id: object) -> list[dict]:
        """The seeds' add-member: an idle node joins shard `shard_id`, which becomes a new group."""
        address = _address_field(address)
        if isinstance(shard_id, int) and not isinstance(shard_id, bool):
            shard_id = str(shard_id)            # the seeds' ids are strings; a JSON number is clear enough
        if not isinstance(shard_id, str) or not shard_id:
            raise BadRequest('shard-id must be the id of a shard, such as "1"')
        current = self._settled_epoch()
        plan = plan_add_member(current, address, shard_id)
        self._check_idle(address)
        return self._carry_out(plan, current)

    def remove_member(self, address: object) -> list[dict]:
        """The seeds' remove-one-node: a node leaves the view; its shard shrinks by one (a new group), or
        is retired if the node was its only replica. The node may be down (taking a dead replica out is
        what this is for). If it is alive it keeps running outside the view: it forwards requests, and
        stays a metadata member if it was one (metadata membership does not follow the view yet)."""
        current = self._settled_epoch()
        return self._carry_out(plan_remove_member(current, _address_field(address)), current)

    def _settled_epoch(self) -> ConfigEpoch:
        """The active epoch, when no change is running (Conflict otherwise)."""
        current = self._node.epoch
        if current is None or self._node.change() is not None:
            raise Conflict("a view change is in progress" if current else "no configuration yet")
        # Plan new groups after every id any plan used, a rolled-back one's too (the metadata group
        # refuses a plan that reuses one).
        floor = self._node.shard_id_floor()
        return replace(current, max_shard_id=floor) if floor > current.max_shard_id else current

    def _check_idle(self, address: str) -> None:
        """A node joins only if it is reachable and serves no shard (idle, or removed by an earlier change
        and done retiring its replicas): its Raft slots and data directories are then free."""
        try:
            resp = self._forwarder.send(address, "GET", "/kvs/status", None, uuid.uuid4().hex,
                                        time.monotonic() + 3)
        except PeerUnreachable:
            raise BadRequest(f"new node {address} is unreachable") from None
        if resp.status != 200:
            raise BadRequest(f"new node {address} answered its status with {resp.status}")
        hosted = {name[len("shard-"):] for name in resp.body.get("groups") or {} if name.startswith("shard-")}
        if resp.body.get("shard-id"):
            hosted.add(str(resp.body["shard-id"]))
        if hosted:
            raise BadRequest(f"new node {address} is not idle: it runs a replica of shard {', '.join(sorted(hosted))}")

    # -- phases ----------------------------------------------------------------------------

    def _prepare_and_copy(self, plan: Plan, current: ConfigEpoch) -> None:
        n = plan.epoch.number
        self._push_epochs(current, plan.epoch, _all_nodes(current, plan.epoch))
        for shard_id in plan.new_groups:
            self._wait_for_leader(plan.epoch, shard_id)
        self._advance(n, "copying")
        new_ring = plan.epoch.ring.to_dict()
        sources = sorted({m.source for m in plan.moves})
        for source in sources:
            self._group_command(current, source, ["track", n, new_ring])
        copied = []                             # per move: the change number its copy was read at
        for move in plan.moves:
            copied.append(self._copy(move, plan, current, since=None))
            self.progress.moves_done += 1
        # Catch up while the sources still serve, so the final catch-up (the write pause of the
        # moving keys) has only the writes of one short round to move.
        for _ in range(CATCH_UP_ROUNDS):
            before = self.progress.keys_moved
            copied = [self._copy(move, plan, current, since) for move, since in zip(plan.moves, copied)]
            if self.progress.keys_moved - before < FREEZE_BELOW_KEYS:
                break
        self._advance(n, "frozen")
        for source in sources:
            self._group_command(current, source, ["freeze", n, new_ring])
        for move, since in zip(plan.moves, copied):
            self._copy(move, plan, current, since)
        self._advance(n, "caught-up")

    def _commit(self, plan: Plan) -> None:
        n = plan.epoch.number
        self.progress.phase = "committing"
        result = self._meta(("commit", n))
        if isinstance(result, Invalid):
            raise Unavailable(f"commit of epoch {n} refused: {result.reason}")

    def _clean_up(self, plan: Plan, current: ConfigEpoch) -> None:
        n = plan.epoch.number
        self.progress.phase = "cleaning up"
        everyone = _all_nodes(current, plan.epoch)
        self._push_epochs(plan.epoch, None, everyone)
        new_ring = plan.epoch.ring.to_dict()
        kept = [sid for sid in plan.epoch.shards if sid in current.shards]
        for shard_id in kept:
            self._group_command(plan.epoch, shard_id, ["own", n, shard_id, new_ring])
        for shard_id in sorted({m.source for m in plan.moves} & set(kept)):
            copied = self._copied_keys.get((n, shard_id))
            if copied is None:
                # taken over from another coordinator: which keys moved is not known here, so scan
                self._group_command(plan.epoch, shard_id, ["drop", n])
                continue
            # Every key that moved was in one of this coordinator's copies (moving keys cannot be
            # written after the freeze), so drop exactly those, in slices the tick thread applies
            # quickly, instead of one entry that scans the whole shard while clients wait.
            keys = sorted(copied)
            for start in range(0, len(keys), DROP_KEYS):
                self._group_command(plan.epoch, shard_id, ["drop-keys", n, keys[start:start + DROP_KEYS]])
        self._meta(("finish", n))
        self._wait_for_epoch(plan.epoch)
        self._wait_for_metadata_members(plan.epoch)

    def _roll_back(self, plan: Plan, current: ConfigEpoch) -> None:
        n = plan.epoch.number
        log.warning("view change to epoch %d failed; rolling back: %s", n, self.progress.error)
        self.progress.phase = "rolling back"
        for source in sorted({m.source for m in plan.moves}):
            try:
                self._group_command(current, source, ["thaw", n])
            except KvsError as exc:
                log.error("could not thaw shard %s: %s", source, exc.message)
        # kept destinations may hold part of a copy: keys they do not own at the current epoch
        for destination in sorted({m.destination for m in plan.moves} & set(current.shards)):
            try:
                self._group_command(current, destination, ["drop", current.number])
            except KvsError as exc:
                log.error("could not clean shard %s: %s", destination, exc.message)
        self._meta(("abort", n))
        self._push_epochs(current, None, _all_nodes(current, plan.epoch))
        self.progress.phase = "rolled back"

    # -- taking over from a dead coordinator -------------------------------------------------

    def watch(self) -> None:
        """Watch the metadata group for a stalled change (a thread for the node's lifetime)."""
        threading.Thread(target=self._watch, name="kvs-view-change-watch", daemon=True).start()

    def _watch(self) -> None:
        me = self._node.settings.address
        seen, since = None, time.monotonic()
        stopped = threading.Event()
        while not stopped.wait(WATCH_PERIOD):
            if not self._node.has_metadata_replica:
                self._pull_epochs()
                continue
            change = self._node.change()
            mark = None if change is None else (change["number"], change["coordinator"], change["steps"])
            if mark != seen:
                seen, since = mark, time.monotonic()
                continue
            if change is None or time.monotonic() - since < TAKEOVER_SECONDS or self._busy.locked():
                continue
            if change["coordinator"] != me and self._alive(change["coordinator"]):
                continue                        # alive and stuck on a slow step: its own deadlines end it
            try:
                self._take_over(change)
            except KvsError as exc:
                log.error("taking over the view change to epoch %d failed: %s", change["number"], exc.message)

    def _take_over(self, change: dict) -> None:
        if not self._busy.acquire(blocking=False):
            return
        try:
            n, me = change["number"], self._node.settings.address
            if self._meta(("claim", n, change["coordinator"], change["steps"], me)) is not True:
                return
            log.warning("%s takes over the view change to epoch %d (phase %s) from %s",
                        me, n, change["phase"], change["coordinator"])
            plan = Plan.from_dict(change["plan"])
            self.progress = Progress(epoch=n, phase=change["phase"], moves_total=len(plan.moves))
            if change["phase"] == "committed":
                self._clean_up(plan, self._node.meta_epoch(n - 1) or plan.epoch)
                self.progress.phase = "done"
            else:
                self._roll_back(plan, self._node.epoch)
        finally:
            self._busy.release()

    def _pull_epochs(self) -> None:
        """A node outside the metadata group catches up with epochs it missed while it was down."""
        epoch = self._node.epoch
        if epoch is None:
            return                              # idle: it joins when a coordinator pushes to it
        for address in epoch.metadata_members:
            try:
                body = self._forwarder.send(address, "GET", "/internal/epochs", None, uuid.uuid4().hex,
                                            time.monotonic() + 2).body
            except PeerUnreachable:
                continue
            if body.get("metadata-member") and body.get("active"):
                # Only ever move forward: a newer active epoch, or a pending one this node lacks. A pending
                # epoch is never dropped by a pull (a member that lags could report none mid-change).
                newer = body["active"]["number"] > epoch.number
                pending = body.get("pending")
                if newer or (pending is not None and pending != self._node.pushed_pending):
                    self._node.learn(body["active"], pending)
                return

    def _alive(self, address: str) -> bool:
        try:
            self._forwarder.send(address, "GET", "/health", None, uuid.uuid4().hex, time.monotonic() + 2)
            return True
        except PeerUnreachable:
            return False

    # -- steps -------------------------------------------------------------------------------

    def _copy(self, move: Move, plan: Plan, current: ConfigEpoch, since: int | None) -> int:
        """Copy a move's keys into its destination: all of them (since=None, replacing any earlier
        partial copy), or only those written after change number `since`. Returns the change number
        the copy was read at."""
        request = {"source": move.source, "old_ring": current.ring.to_dict(),
                   "new_ring": plan.epoch.ring.to_dict(), "destination": move.destination}
        if since is None:
            exported = self._call_group(current, move.source, "export", request)
        else:
            exported = self._call_group(current, move.source, "changes", {**request, "since": since})
        n = plan.epoch.number
        if since is None:
            self.progress.keys_total += len(exported["items"])
        for i, (items, dedup, deleted) in enumerate(_batches(exported["items"], exported["dedup"],
                                                              exported["deleted"])):
            started = time.monotonic()
            self._group_command(plan.epoch, move.destination,
                                ["install", n, move.source, request["old_ring"], request["new_ring"], items,
                                 dedup, since is None and i == 0, deleted])
            self.progress.keys_moved += len(items) + len(deleted)
            copied = self._copied_keys.setdefault((n, move.source), set())
            copied.update(key for key, _ in items)
            copied.update(deleted)
            if since is None:
                # Pacing, not synchronisation: the bulk copy shares the cores and the destination's log with
                # client traffic, so it leaves them as much time as each install took.
                time.sleep((time.monotonic() - started) * COPY_PAUSE_RATIO)
        return exported["number"]

    def _advance(self, number: int, phase: str) -> None:
        self.progress.phase = phase
        result = self._meta(("advance", number, phase, self._node.settings.address))
        if isinstance(result, Invalid):
            raise Unavailable(f"cannot record phase {phase}: {result.reason}")

    def _meta(self, command: tuple) -> object:
        return self._node.propose_meta(command, time.monotonic() + STEP_SECONDS)

    def _group_command(self, epoch: ConfigEpoch, shard_id: str, command: list) -> object:
        return self._call_group(epoch, shard_id, "commands", {"command": command})["result"]

    def _call_group(self, epoch: ConfigEpoch, shard_id: str, what: str, payload: dict) -> dict:
        """POST to any replica of the group until one answers 200 (the step is idempotent)."""
        deadline = time.monotonic() + STEP_SECONDS
        last = "no replica tried"
        while time.monotonic() < deadline:
            for address in epoch.replicas(shard_id):
                try:
                    resp = self._forwarder.send(address, "POST", f"/internal/groups/{shard_id}/{what}", payload,
                                                uuid.uuid4().hex, min(deadline, time.monotonic() + 10))
                except PeerUnreachable as exc:
                    last = str(exc)
                    continue
                if resp.status == 200:
                    return resp.body
                last = f"{address}: {resp.status} {resp.body.get('error')}"
            time.sleep(0.1)
        raise Unavailable(f"shard {shard_id} did not take {what}: {last}")

    def _push_epochs(self, active: ConfigEpoch, pending: ConfigEpoch | None, nodes: list[str]) -> None:
        """Tell every node the epochs, all at once and best effort: a node that is down learns them when
        it is back (from the metadata group, or from its copy on disk and the next push). What the change
        needs, every new group electing a leader, is waited for separately."""
        payload = {"active": active.to_dict(), "pending": pending.to_dict() if pending else None}
        with ThreadPoolExecutor(max_workers=max(1, len(nodes)), thread_name_prefix="kvs-push") as pool:
            for address, learned in zip(nodes, pool.map(lambda a: self._push_to(a, payload), nodes)):
                if not learned:
                    log.warning("%s did not learn epoch %d", address, (pending or active).number)

    def _push_to(self, address: str, payload: dict) -> bool:
        deadline = time.monotonic() + PUSH_SECONDS
        while True:
            try:
                resp = self._forwarder.send(address, "POST", "/internal/epochs", payload, uuid.uuid4().hex,
                                            min(deadline, time.monotonic() + 2))
                if resp.status == 200:
                    return True
            except PeerUnreachable:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)                     # a pause between tries, bounded by the deadline

    def _status(self, address: str, deadline: float) -> dict:
        """GET /kvs/status of a node (PeerUnreachable if it does not answer in time)."""
        return self._forwarder.send(address, "GET", "/kvs/status", None, uuid.uuid4().hex,
                                    min(deadline, time.monotonic() + 2)).body

    def _until_any_status(self, addresses, seconds: float, satisfied) -> bool:
        """Poll the nodes' statuses until one satisfies `satisfied(status)`; False after `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for address in addresses:
                try:
                    if satisfied(self._status(address, deadline)):
                        return True
                except PeerUnreachable:
                    continue
            time.sleep(0.1)                     # a pause between polls, bounded by the deadline
        return False

    def _wait_for_leader(self, epoch: ConfigEpoch, shard_id: str) -> None:
        if not self._until_any_status(epoch.replicas(shard_id), SETTLE_SECONDS,
                                      lambda s: (s.get("groups", {}).get(f"shard-{shard_id}") or {}).get("leader")):
            raise Unavailable(f"new shard {shard_id} elected no leader within {SETTLE_SECONDS}s")

    def _wait_for_epoch(self, epoch: ConfigEpoch) -> None:
        """Until every node of the new view routes by the new epoch (bounded; stragglers are logged)."""
        deadline = time.monotonic() + SETTLE_SECONDS
        for address in epoch.view:
            while time.monotonic() < deadline:
                try:
                    body = self._status(address, deadline)
                except PeerUnreachable:
                    break                       # down: it learns the epoch when it comes back
                if (body.get("epoch") or 0) >= epoch.number:
                    break
                time.sleep(0.05)

    def _wait_for_metadata_members(self, epoch: ConfigEpoch) -> None:
        """Until the metadata group's members are the new epoch's (kvs.membership moves them one node at
        a time once the change is finished), so that nodes that left the view may be stopped right after
        the reply. Bounded: if it takes longer, the leader carries on after the reply."""
        s = self._node.settings
        target = sorted(s.raft_address(a, METADATA_SLOT) for a in epoch.metadata_members)

        def settled(status: dict) -> bool:
            meta = status.get("groups", {}).get("meta") or {}
            return meta.get("members") == target and bool(meta.get("leader"))

        if not self._until_any_status(epoch.metadata_members, MEMBERSHIP_SECONDS, settled):
            log.warning("the metadata group did not reach members %s within %ss", target, MEMBERSHIP_SECONDS)

    def _check_reachable(self, new: ConfigEpoch, current: ConfigEpoch) -> None:
        for address in new.view:
            if address in current.view:
                continue
            try:
                self._forwarder.send(address, "GET", "/health", None, uuid.uuid4().hex, time.monotonic() + 3)
            except PeerUnreachable:
                raise BadRequest(f"new node {address} is unreachable") from None

    def _shard_report(self, epoch: ConfigEpoch) -> list[dict]:
        shards = []
        for shard_id in epoch.shard_ids():
            body = self._call_group_read(epoch, shard_id)
            entry = {"shard-id": shard_id, "key-count": body.get("key-count", 0),
                     "replicas": list(epoch.replicas(shard_id))}
            if len(epoch.replicas(shard_id)) == 1:     # per shard: groups may differ in size
                entry["address"] = epoch.replicas(shard_id)[0]
            shards.append(entry)
        return shards

    def _call_group_read(self, epoch: ConfigEpoch, shard_id: str) -> dict:
        for address in epoch.replicas(shard_id):
            try:
                resp = self._forwarder.send(address, "GET", f"/kvs/shards/{shard_id}", None, uuid.uuid4().hex,
                                            time.monotonic() + 10)
            except PeerUnreachable:
                continue
            if resp.status == 200:
                return resp.body
        return {}


def _address_field(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("address must be a 'host:port' string")
    return normalize_address(value)


def _all_nodes(*epochs: ConfigEpoch) -> list[str]:
    seen: dict[str, None] = {}
    for epoch in epochs:
        for address in epoch.view:
            seen[address] = None
    return list(seen)


def _batches(items: list, dedup: list, deleted: list) -> list[tuple[list, list, list]]:
    """Cut a range's keys, dedup entries and deletions into install commands of about CHUNK_BYTES each."""
    batches: list[tuple[list, list, list]] = [([], [], [])]
    size = 0
    for kind, rows in ((0, items), (1, dedup), (2, deleted)):
        for row in rows:
            row_size = len(str(row)) + 8
            if size + row_size > CHUNK_BYTES and any(batches[-1]):
                batches.append(([], [], []))
                size = 0
            batches[-1][kind].append(row)
            size += row_size
    return batches
