"""The state machine of the metadata group: the cluster configuration as numbered epochs.

Same contract as `kvs.fsm.shard`: pure, deterministic, never raises.
Epochs are stored as the plain dicts of `ConfigEpoch.to_dict()`.

The initial configuration is committed by whichever node gets there first:
every node of the initial view proposes `("init", epoch_dict)` until it sees
an epoch, and only the first `init` that reaches an empty state takes effect,
so the proposals are idempotent.

A view change is recorded here phase by phase, so that any node can tell how
far it got and finish it (or roll it back before commit) if its coordinator
dies. Phases, in order:

    prepared   the plan (epoch N+1, pending) is committed; new groups may start
    copying    moving ranges are being copied while their sources serve
    frozen     sources refuse the moving keys; the final catch-up runs
    caught-up  destinations hold everything the sources held at freeze time
    committed  epoch N+1 is active: ownership switched (cleanup follows)

and, instead of going on, before commit:

    unwinding  the change is being rolled back: kept shards' Raft members go back to the active
               epoch's replicas while the plan's replicas still run (the pending epoch is
               published with status "unwinding"); an abort follows once they are back

Commands (results are values; an impossible step returns Invalid):
    ("init", epoch_dict)                      -> active epoch number
    ("prepare", plan_dict, coordinator)       -> N+1
    ("advance", number, phase, coordinator)   -> phase now recorded
    ("commit", number)                        -> active epoch number
    ("abort", number)                         -> True (before commit only)
    ("finish", number)                        -> True (after commit: the change is over)
    ("claim", number, coordinator, steps, me) -> True if the change was still at (coordinator, steps):
                                                 a node taking over from a dead coordinator
"""

from __future__ import annotations

from kvs.fsm.base import Invalid, StateMachine

PHASES = ("prepared", "copying", "frozen", "caught-up", "committed")
UNWINDING = "unwinding"
EPOCHS_KEPT = 8


class MetadataState(StateMachine):
    def __init__(self) -> None:
        self._epochs: dict[int, dict] = {}
        self._active: int = 0
        self._change: dict | None = None       # {"plan", "number", "phase", "coordinator", "steps"}
        # The largest shard id any prepared plan used, committed or not: a plan rolled back left journals
        # of its new groups on their nodes, so their ids must not come back either.
        self._max_shard_id = 0
        # The log index of the last decision about epochs (init, prepare, commit, abort, finish): nodes
        # outside the group are told (active, pending) with it, and take only newer news, so a lagging
        # member or a late push can never bring back a plan that was rolled back (its groups would squat
        # on the Raft slots of the next plan's). A log index, not a count: the same on every replica
        # whatever snapshots each restored (a count restarts from a snapshot that predates it).
        self._revision = 0
        self.log_index = 0          # set by the Raft adapter to the index of the entry being applied
        self._decisions: tuple[int, dict | None, dict | None] = (0, None, None)
        self._handlers = {"init": self._init, "prepare": self._prepare, "advance": self._advance,
                          "commit": self._commit, "abort": self._abort, "finish": self._finish,
                          "claim": self._claim}

    # -- the FSM contract -------------------------------------------------

    def snapshot(self) -> dict:
        return {"epochs": dict(self._epochs), "active": self._active, "change": self._change,
                "max_shard_id": self._max_shard_id, "revision": self._revision}

    def restore(self, snapshot: dict) -> None:
        self._epochs = dict(snapshot["epochs"])
        self._active = int(snapshot["active"])
        self._change = snapshot.get("change")
        self._max_shard_id = int(snapshot.get("max_shard_id", 0))
        self._revision = int(snapshot.get("revision", 0))
        self._publish()

    # -- reads -------------------------------------------------------------

    @property
    def max_shard_id(self) -> int:
        return self._max_shard_id

    @property
    def active_number(self) -> int:
        return self._active

    def active_epoch(self) -> dict | None:
        return self._epochs.get(self._active)

    def epoch(self, number: int) -> dict | None:
        """A recent epoch by number (the last few are kept)."""
        return self._epochs.get(number)

    def decisions(self) -> tuple[int, dict | None, dict | None]:
        """(revision, active epoch, pending epoch): one consistent view, safe to read from any thread
        (it is replaced whole, in one assignment, after each decision)."""
        return self._decisions

    def _decided(self, result: object) -> object:
        # log_index is part of the log (the entry's position), so this stays a pure function of it; without
        # an adapter (tests) each decision still moves the revision on.
        self._revision = max(self._revision + 1, self.log_index)
        self._publish()
        return result

    def _publish(self) -> None:
        change = self._change
        pending = change["plan"]["epoch"] if change is not None and change["phase"] != "committed" else None
        if pending is not None and change["phase"] == UNWINDING:
            pending = dict(pending, status=UNWINDING)
        self._decisions = (self._revision, self._epochs.get(self._active), pending)

    def change(self) -> dict | None:
        """The view change in progress (plan, phase, coordinator, steps), if any."""
        change = self._change           # read once: the Raft thread may end the change meanwhile
        return None if change is None else dict(change)

    # -- commands ----------------------------------------------------------

    def _init(self, epoch: dict) -> int:
        if self._active:
            return self._active
        if not isinstance(epoch, dict) or int(epoch["number"]) != 1:
            return Invalid("the initial epoch must be number 1")
        self._epochs[1] = epoch
        self._active = 1
        self._max_shard_id = _max_shard_id(epoch)
        return self._decided(self._active)

    def _prepare(self, plan: dict, coordinator: str) -> int | Invalid:
        number = int(plan["epoch"]["number"])
        if self._change is not None:
            if self._change["number"] == number and self._change["plan"] == plan:
                return number                   # the same prepare, retried
            return Invalid(f"view change to epoch {self._change['number']} is in progress")
        if number != self._active + 1:
            return Invalid(f"stale plan: epoch {number} does not follow the active epoch {self._active}")
        reused = [sid for sid in plan.get("new_groups", ()) if str(sid).isdigit() and int(sid) <= self._max_shard_id]
        if reused:
            return Invalid(f"shard ids {reused} were used before (the largest so far is {self._max_shard_id})")
        self._max_shard_id = max(self._max_shard_id, _max_shard_id(plan["epoch"]))
        self._change = {"plan": plan, "number": number, "phase": "prepared", "coordinator": coordinator,
                        "steps": 0}
        return self._decided(number)

    def _advance(self, number: int, phase: str, coordinator: str) -> str | Invalid:
        change = self._change
        if change is None or change["number"] != number:
            return Invalid(f"no view change to epoch {number} in progress")
        if phase == UNWINDING:
            if change["phase"] == "committed":
                return Invalid("a committed view change cannot be rolled back")
            change.update(phase=phase, coordinator=coordinator, steps=change["steps"] + 1)
            return self._decided(phase)         # nodes must learn it: their shard leaders act on it
        if change["phase"] == UNWINDING:
            return Invalid(f"the view change to epoch {number} is being rolled back")
        if phase not in PHASES[1:-1] or PHASES.index(phase) < PHASES.index(change["phase"]):
            return Invalid(f"cannot go from {change['phase']} to {phase}")
        change.update(phase=phase, coordinator=coordinator, steps=change["steps"] + 1)
        return phase

    def _commit(self, number: int) -> int | Invalid:
        change = self._change
        if change is None or change["number"] != number:
            return self._active if self._active >= number else Invalid(f"no view change to epoch {number}")
        if change["phase"] == "committed":
            return self._active
        if change["phase"] != "caught-up":
            return Invalid(f"cannot commit from phase {change['phase']}")
        epoch = dict(change["plan"]["epoch"], status="active")
        self._epochs[number] = epoch
        self._active = number
        for old in sorted(self._epochs)[:-EPOCHS_KEPT]:
            del self._epochs[old]
        change.update(phase="committed", steps=change["steps"] + 1)
        return self._decided(number)

    def _abort(self, number: int) -> bool | Invalid:
        change = self._change
        if change is None or change["number"] != number:
            return False
        if change["phase"] == "committed":
            return Invalid("a committed view change cannot be rolled back")
        self._change = None
        return self._decided(True)

    def _finish(self, number: int) -> bool:
        change = self._change
        if change is None or change["number"] != number or change["phase"] != "committed":
            return False
        self._change = None
        return self._decided(True)

    def _claim(self, number: int, coordinator: str, steps: int, me: str) -> bool:
        change = self._change
        if change is None or change["number"] != number:
            return False
        if change["coordinator"] != coordinator or change["steps"] != steps:
            return False                        # someone else moved it on in the meantime
        change.update(coordinator=me, steps=steps + 1)
        return True


def _max_shard_id(epoch: dict) -> int:
    ids = [int(sid) for sid in epoch.get("shards", {}) if str(sid).isdigit()]
    return max([int(epoch.get("max_shard_id", 0) or 0)] + ids)
