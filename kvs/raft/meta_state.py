"""The state machine of the metadata group: the cluster configuration as numbered epochs.

Same contract as `kvs.raft.shard_state`: pure, deterministic, never raises.
Epochs are stored as the plain dicts of `ConfigEpoch.to_dict()`.

The initial configuration is committed by whichever node gets there first:
every node of the initial view proposes `("init", epoch_dict)` until it sees
an epoch, and only the first `init` that reaches an empty state takes effect,
so the proposals are idempotent.

Commands:
    ("init", epoch_dict)  -> the number of the active epoch after the command
"""

from __future__ import annotations

from .state_machine import Invalid, StateMachine


class MetadataState(StateMachine):
    def __init__(self) -> None:
        self._epochs: dict[int, dict] = {}
        self._active: int = 0
        self._handlers = {"init": self._init}

    # -- the FSM contract -------------------------------------------------

    def snapshot(self) -> dict:
        return {"epochs": dict(self._epochs), "active": self._active}

    def restore(self, snapshot: dict) -> None:
        self._epochs = dict(snapshot["epochs"])
        self._active = int(snapshot["active"])

    # -- reads -------------------------------------------------------------

    @property
    def active_number(self) -> int:
        return self._active

    def active_epoch(self) -> dict | None:
        return self._epochs.get(self._active)

    # -- commands ----------------------------------------------------------

    def _init(self, epoch: dict) -> int:
        if self._active:
            return self._active
        if not isinstance(epoch, dict) or int(epoch["number"]) != 1:
            return Invalid("the initial epoch must be number 1")
        self._epochs[1] = epoch
        self._active = 1
        return self._active
