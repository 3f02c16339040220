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

Fencing: a group knows which keys it owns, as (epoch, its shard id, the ring
of that epoch). A data command or read for a key it does not own, or for a key
frozen because it is moving away, gets `NotOwned(epoch)`: retryable, naming the
epoch the caller must reach before routing again. Ownership changes only
through this group's own log, so it is ordered with every read and write.

Commands are tuples, first element the operation:
    ("put", request_id, key, value)   -> Written(replaced) | NotOwned
    ("delete", request_id, key)       -> Deleted(existed) | NotOwned
    ("barrier",)                      -> None   (a no-op: older versions ordered reads with it)
  view changes (kvs.reconfig.coordinator), all idempotent:
    ("track", epoch, new_ring)        number every later write of a key that moves away under
                                      `new_ring`, so a copy can be caught up with only the changes
    ("freeze", epoch, new_ring)       stop serving keys that move away under `new_ring`
    ("thaw", epoch)                   undo a freeze and tracking (the change was rolled back)
    ("install", epoch, source, old_ring, new_ring, items, dedup, clear[, deleted])
                                      receive keys moving here from `source` (with their slice
                                      of the deduplication table); `clear` first empties that set;
                                      `deleted` keys were deleted at the source since the last copy
    ("own", epoch, shard_id, ring)    take the ownership of `epoch`
    ("drop", epoch)                   forget keys (and dedup entries) no longer owned
    ("drop-keys", epoch, keys)        forget those of `keys` no longer owned: the same, in slices the
                                      coordinator knows, so no single entry scans the whole shard
Rings travel as `HashRing.to_dict()`.

Change tracking: between "track" and the end of the change, every applied
write of a moving key gets the next number of a counter that is part of the
replicated state, as does its deduplication entry. A copy reads the counter
before the keys, so "everything numbered above what the last copy saw" is a
superset of what changed since: the final catch-up after the freeze moves
only those keys, and the write pause no longer grows with the range.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, NamedTuple

from kvs.config.ring import HashRing
from kvs.fsm.base import Invalid, StateMachine

DEDUP_CAPACITY = 100_000


class Written(NamedTuple):
    replaced: bool


class Deleted(NamedTuple):
    existed: bool


class NotOwned(NamedTuple):
    epoch: int


class ShardState(StateMachine):
    """Keys and values of one shard, plus the outcomes of recent writes."""

    detached_snapshot = True        # snapshot() takes C-level copies; values and rings are never edited

    def __init__(self, ownership: tuple[int, str, dict] | None = None, dedup_capacity: int = DEDUP_CAPACITY):
        """`ownership` = (epoch, shard id, ring dict) the group was created for; None owns every key."""
        self._data: dict[str, str] = {}
        # request id -> (operation fingerprint, key, result)
        self._dedup: OrderedDict[str, tuple[tuple, str, Any]] = OrderedDict()
        self._dedup_capacity = dedup_capacity
        self._ownership = ownership
        self._frozen: tuple[int, dict] | None = None       # (epoch, ring the moving keys go by)
        self._tracking: tuple[int, dict] | None = None     # (epoch, ring) whose moving keys are tracked
        self._change_number = 0                             # numbers tracked writes; never goes back
        self._changed_keys: dict[str, int] = {}            # key -> number of its last tracked write
        self._changed_requests: dict[str, int] = {}        # request id -> number of its tracked write
        # True from an install until "own" or "drop": only then can keys this group does not own be
        # here, so only then must an install that starts a copy over scan for them
        self._installing = False
        self._rings: dict[tuple, HashRing] = {}             # derived cache, never snapshotted
        self._handlers = {
            "put": self._put,
            "delete": self._delete,
            "barrier": self._barrier,
            "track": self._track,
            "freeze": self._freeze,
            "thaw": self._thaw,
            "install": self._install,
            "own": self._own,
            "drop": self._drop,
            "drop-keys": self._drop_keys,
        }

    # -- the FSM contract -------------------------------------------------

    def snapshot(self) -> dict:
        """Capture the state (shallow copies; the caller serialises them)."""
        return {"data": dict(self._data), "dedup": list(self._dedup.items()),
                "ownership": self._ownership, "frozen": self._frozen,
                "tracking": (self._tracking, self._change_number, dict(self._changed_keys),
                             dict(self._changed_requests)),
                "installing": self._installing}

    def restore(self, snapshot: dict) -> None:
        """Discard everything, then take the snapshot's state."""
        self._data = dict(snapshot["data"])
        self._dedup = OrderedDict(snapshot["dedup"])
        if "ownership" in snapshot:         # snapshots older than fencing keep the constructor's
            self._ownership = snapshot["ownership"]
        self._frozen = snapshot.get("frozen")
        tracking, number, keys, requests = snapshot.get("tracking") or (None, 0, {}, {})
        self._tracking, self._change_number = tracking, number
        self._changed_keys, self._changed_requests = dict(keys), dict(requests)
        self._installing = snapshot.get("installing", True)

    # -- reads (never replicated; callers order them with a read index) ----

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def read(self, key: str) -> str | None | NotOwned:
        """The value of a key this group serves, or NotOwned."""
        refused = self._refuse(key)
        return refused if refused is not None else self._data.get(key)

    @property
    def epoch(self) -> int:
        return self._ownership[0] if self._ownership else 0

    def export(self, source: str, old_ring: dict, new_ring: dict, destination: str) -> tuple[list, list, int]:
        """(items, dedup entries, change number) of the keys moving from `source` to `destination`."""
        number, items, dedup, moving = self.export_rows(source, old_ring, new_ring, destination)
        return sorted(kv for kv in items if moving(kv[0])), [e for e in dedup if moving(e[1][1])], number

    def export_rows(self, source: str, old_ring: dict, new_ring: dict, destination: str) -> tuple[int, list, list, Any]:
        """(change number, every (key, value), every dedup entry, is-moving predicate on a key): the raw
        material of `export`, taken with C-level copies so the caller can filter it in slices.

        The change number is read first: a write applied while the copy is taken (reads run beside
        the tick thread) is numbered above it, so `export_changes(since=it)` catches it up."""
        number = self._change_number
        moving = self._mover(source, old_ring, new_ring, destination)
        return number, list(self._data.items()), list(self._dedup.items()), moving

    def export_changes(self, source: str, old_ring: dict, new_ring: dict, destination: str,
                       since: int) -> tuple[list, list, list, int]:
        """(items, deleted keys, dedup entries, change number): the tracked writes numbered above
        `since` of keys moving from `source` to `destination`, with their current values."""
        number = self._change_number
        moving = self._mover(source, old_ring, new_ring, destination)
        keys = [k for k, n in list(self._changed_keys.items()) if n > since and moving(k)]
        data = self._data
        items, deleted = [], []
        for key in sorted(keys):
            value = data.get(key)
            if value is None:
                deleted.append(key)
            else:
                items.append((key, value))
        dedup = []
        for rid, n in list(self._changed_requests.items()):
            entry = self._dedup.get(rid)
            if n > since and entry is not None and moving(entry[1]):
                dedup.append((rid, entry))
        return items, deleted, dedup, number

    def key_count(self) -> int:
        return len(self._data)

    def digest(self) -> str:
        """A fingerprint of the data, equal on replicas that hold the same keys and values."""
        data = dict(self._data)     # one C-level copy: the tick thread may be applying meanwhile
        h = hashlib.sha256()
        for key in sorted(data):
            h.update(key.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
            h.update(data[key].encode("utf-8", "surrogatepass"))
            h.update(b"\1")
        return h.hexdigest()

    # -- commands ----------------------------------------------------------

    def _put(self, request_id: str, key: str, value: str) -> Any:
        refused = self._refuse(key)
        if refused is not None:
            return refused
        # A digest, not the value: the table keeps 100,000 entries, and values may be 1 MiB each.
        fingerprint = ("put", key, hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest())
        seen = self._seen(request_id, fingerprint)
        if seen is not None:
            return seen
        result = Written(replaced=key in self._data)
        self._data[key] = value
        self._remember(request_id, fingerprint, key, result)
        self._track_write(request_id, key)
        return result

    def _delete(self, request_id: str, key: str) -> Any:
        refused = self._refuse(key)
        if refused is not None:
            return refused
        fingerprint = ("delete", key)
        seen = self._seen(request_id, fingerprint)
        if seen is not None:
            return seen
        result = Deleted(existed=self._data.pop(key, None) is not None)
        self._remember(request_id, fingerprint, key, result)
        self._track_write(request_id, key)
        return result

    def _barrier(self) -> None:
        return None

    # -- fencing and view changes ---------------------------------------------

    def _ring(self, ring: dict) -> HashRing:
        key = (tuple(ring["groups"]), ring["vnodes"])
        cached = self._rings.get(key)
        if cached is None:
            cached = self._rings[key] = HashRing.from_dict(ring)
        return cached

    def _refuse(self, key: str) -> NotOwned | None:
        if self._ownership is None:
            return None
        epoch, shard_id, ring = self._ownership
        if self._ring(ring).group_for(key) != shard_id:
            return NotOwned(epoch)
        if self._frozen is not None and self._ring(self._frozen[1]).group_for(key) != shard_id:
            return NotOwned(self._frozen[0])
        return None

    def _mover(self, source: str, old_ring: dict, new_ring: dict, destination: str):
        old, new = self._ring(old_ring), self._ring(new_ring)
        return lambda key: old.group_for(key) == source and new.group_for(key) == destination

    def _track(self, epoch: int, new_ring: dict) -> bool:
        # Equal rings, not just equal epochs: a rolled-back change whose thaw never arrived may have
        # left tracking for another ring under the same number, and that would miss keys.
        if epoch <= self.epoch or self._tracking == (epoch, new_ring):
            return False
        self._tracking = (epoch, new_ring)
        self._changed_keys.clear()
        self._changed_requests.clear()
        return True

    def _track_write(self, request_id: str, key: str) -> None:
        if self._tracking is None or self._ownership is None:
            return
        if self._ring(self._tracking[1]).group_for(key) == self._ownership[1]:
            return                                  # stays here: no copy needs it
        self._change_number += 1
        self._changed_keys[key] = self._change_number
        self._changed_requests[request_id] = self._change_number

    def _stop_tracking(self) -> None:
        self._tracking = None
        self._changed_keys.clear()
        self._changed_requests.clear()

    def _freeze(self, epoch: int, new_ring: dict) -> bool:
        if epoch <= self.epoch:
            return False
        self._frozen = (epoch, new_ring)
        return True

    def _thaw(self, epoch: int) -> bool:
        if self._tracking is not None and self._tracking[0] == epoch:
            self._stop_tracking()
        if self._frozen is None or self._frozen[0] != epoch:
            return False
        self._frozen = None
        return True

    def _install(self, epoch: int, source: str, old_ring: dict, new_ring: dict, items: list, dedup: list,
                 clear: bool, deleted: list = ()) -> int:
        if epoch < self.epoch:
            return 0
        destination = self._ownership[1] if self._ownership else None
        if clear and self._installing:
            moving = self._mover(source, old_ring, new_ring, destination)
            for key in [k for k in self._data if moving(k)]:
                del self._data[key]
        for key, value in items:
            self._data[key] = value
        for key in deleted:
            self._data.pop(key, None)
        self._installing = True
        for request_id, entry in dedup:
            self._dedup.setdefault(request_id, tuple(entry))
        while len(self._dedup) > self._dedup_capacity:
            self._dedup.popitem(last=False)
        return len(items)

    def _own(self, epoch: int, shard_id: str, ring: dict) -> bool:
        if epoch <= self.epoch:
            return False
        self._ownership = (epoch, shard_id, ring)
        if self._frozen is not None and self._frozen[0] <= epoch:
            self._frozen = None
        if self._tracking is not None and self._tracking[0] <= epoch:
            self._stop_tracking()
        self._installing = False            # what was installed for `epoch` is owned now
        return True

    def _drop(self, epoch: int) -> int:
        if self._ownership is None or epoch != self.epoch:
            return 0
        gone = [k for k in self._data if self._refuse(k) is not None]
        for key in gone:
            del self._data[key]
        for request_id in [rid for rid, entry in self._dedup.items() if self._refuse(entry[1]) is not None]:
            del self._dedup[request_id]
        self._installing = False
        return len(gone)

    def _drop_keys(self, epoch: int, keys: list) -> int:
        # Dedup entries of these keys stay until the table's FIFO evicts them: harmless, since a retry
        # of a key this group does not own is refused before the table is consulted.
        if self._ownership is None or epoch != self.epoch:
            return 0
        gone = [k for k in keys if k in self._data and self._refuse(k) is not None]
        for key in gone:
            del self._data[key]
        return len(gone)

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
            forgotten, _ = self._dedup.popitem(last=False)
            self._changed_requests.pop(forgotten, None)
