"""The state machine of one shard group: keys, values and the deduplication table.

A plain class with the hashicorp/raft FSM contract and no Raft in it:
`apply(command) -> result`, `snapshot()`, `restore(snapshot)`. Every replica
applies the same committed commands in the same order and must reach the same
state, so `apply` is a pure function of the state and the command: no clock,
no randomness, no I/O. Whatever is random (request ids) is fixed by the
proposer before the command enters the log.

`apply` never raises: PySyncObj re-applies a raising entry on every tick and
the group stops for good. An unknown or malformed command yields an `Invalid`
result on every replica alike.

Exactly-once writes: a write carries a request id; its outcome is kept in a
bounded FIFO table, and a retry of the same id returns the first outcome
without being applied again. The table is part of the replicated state (and of
snapshots), so a retry that reaches a new leader after a failover is still
recognised. Each entry remembers its key, so a range of keys can later be
handed over with its slice of the table.

Commands are tuples, first element the operation:
    ("put", request_id, key, value)   -> Written(replaced: bool)
    ("delete", request_id, key)       -> Deleted(existed: bool)
    ("barrier",)                      -> None   (orders linearizable reads)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, NamedTuple

from .state_machine import Invalid, StateMachine

DEDUP_CAPACITY = 100_000


class Written(NamedTuple):
    replaced: bool


class Deleted(NamedTuple):
    existed: bool


class ShardState(StateMachine):
    """Keys and values of one shard, plus the outcomes of recent writes."""

    def __init__(self, dedup_capacity: int = DEDUP_CAPACITY):
        self._data: dict[str, str] = {}
        # request id -> (operation fingerprint, key, result)
        self._dedup: OrderedDict[str, tuple[tuple, str, Any]] = OrderedDict()
        self._dedup_capacity = dedup_capacity
        self._handlers = {
            "put": self._put,
            "delete": self._delete,
            "barrier": self._barrier,
        }

    # -- the FSM contract -------------------------------------------------

    def snapshot(self) -> dict:
        """Capture the state (shallow copies; the caller serialises them)."""
        return {"data": dict(self._data), "dedup": list(self._dedup.items())}

    def restore(self, snapshot: dict) -> None:
        """Discard everything, then take the snapshot's state."""
        self._data = dict(snapshot["data"])
        self._dedup = OrderedDict(snapshot["dedup"])

    # -- reads (never replicated; callers order them with a barrier) -------

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def key_count(self) -> int:
        return len(self._data)

    def digest(self) -> str:
        """A fingerprint of the data, equal on replicas that hold the same keys and values."""
        data = dict(self._data)     # one C-level copy: the tick thread may be applying meanwhile
        h = hashlib.sha256()
        for key in sorted(data):
            h.update(key.encode())
            h.update(b"\0")
            h.update(data[key].encode())
            h.update(b"\1")
        return h.hexdigest()

    # -- commands ----------------------------------------------------------

    def _put(self, request_id: str, key: str, value: str) -> Any:
        fingerprint = ("put", key, value)
        seen = self._seen(request_id, fingerprint)
        if seen is not None:
            return seen
        result = Written(replaced=key in self._data)
        self._data[key] = value
        self._remember(request_id, fingerprint, key, result)
        return result

    def _delete(self, request_id: str, key: str) -> Any:
        fingerprint = ("delete", key)
        seen = self._seen(request_id, fingerprint)
        if seen is not None:
            return seen
        result = Deleted(existed=self._data.pop(key, None) is not None)
        self._remember(request_id, fingerprint, key, result)
        return result

    def _barrier(self) -> None:
        return None

    # -- deduplication -----------------------------------------------------

    def _seen(self, request_id: str, fingerprint: tuple) -> Any:
        entry = self._dedup.get(request_id)
        if entry is None:
            return None
        if entry[0] != fingerprint:
            return Invalid("request id reused for a different operation")
        return entry[2]

    def _remember(self, request_id: str, fingerprint: tuple, key: str, result: Any) -> None:
        self._dedup[request_id] = (fingerprint, key, result)
        while len(self._dedup) > self._dedup_capacity:
            self._dedup.popitem(last=False)
