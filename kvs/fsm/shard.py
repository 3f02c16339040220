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
handed over with its slice of the table. An entry is kept as a plain tuple of
scalars, (fingerprint, key, kind, values), which CPython's garbage collector
stops tracking, not as (fingerprint, key, result) with a NamedTuple result,
which it tracks for ever: a full table made every full collection walk 200,000
more objects, 40-75 ms on a 2-vCPU machine, every request of the node waiting
(benchmarks/README.md, "The view change, 2026-12-05"). The result is rebuilt
when a retry is answered; exports carry the (fingerprint, key, result) form.
Snapshots keep the table as two lists, ids and entries: C-level copies, with no
new tuple per entry for a log compaction's capture to make (restore also takes
the older form, a list of (id, (fingerprint, key, result)) pairs).

Fencing: a group knows which keys it owns, as (epoch, its shard id, the ring
of that epoch). A data command or read for a key it does not own, or for a key
frozen because it is moving away, gets `NotOwned(epoch)`: retryable, naming the
epoch the caller must reach before routing again. Ownership changes only
through this group's own log, so it is ordered with every read and write.

Commands are tuples, first element the operation:
    ("put", request_id, key, value, condition)   -> Written(replaced, version) | Mismatch | NotOwned
    ("delete", request_id, key, condition)       -> Deleted(existed) | Mismatch | NotOwned
  a condition (compare-and-set, applied atomically with the write) is None or one of
    ("match", version)   the key exists at this version     ("exists",)   the key exists
    ("absent",)          the key does not exist
  and a write whose condition fails changes nothing and returns Mismatch(the key's version,
  whether it exists); that outcome is remembered for its request id like any other. Without the
  condition slot (("put", request_id, key, value), ("delete", request_id, key): what kvs
  wrote in the log before versions existed) a write gives no version: its key's version is 0.
    ("barrier",)                      -> None   (a no-op: older versions ordered reads with it)
  view changes (kvs.reconfig.coordinator), all idempotent: see `kvs.fsm.handover`.

Versions: every write of a key gives it the next number of the shard's
revision counter (replicated state, like etcd's mod revision), so a key's
version only grows, also across a delete and a re-creation (no ABA for a
compare-and-set). Keys moving in keep their versions, and the counter jumps
past them and past the source's own counter, so versions stay increasing
wherever a key lives. Whether a write gives a version is decided by the
command's format, not by the code that applies it: replicas that replay an
older log, or restore an older snapshot, agree on every key's version (0 for
what older versions wrote). Reads run beside the tick thread: a write changes
a key's value and version between two bumps of `_writes` (odd meanwhile), and
`read_versioned` retries until it saw neither half of one (a seqlock).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, NamedTuple

from kvs.config.ring import HashRing
from kvs.fsm.base import Invalid, StateMachine
from kvs.fsm.batch import BatchWrites, data_bytes, key_order
from kvs.fsm.handover import KeyHandover

DEDUP_CAPACITY = 100_000


class Written(NamedTuple):
    replaced: bool
    version: int = 0            # the key's version after the write (0: written before versions)


class Deleted(NamedTuple):
    existed: bool


class NotOwned(NamedTuple):
    epoch: int


class Mismatch(NamedTuple):
    """A conditional write whose condition did not hold: nothing changed."""
    version: int                # the key's current version (0: absent, or written before versions)
    exists: bool = False


CONDITIONS = ("match", "exists", "absent")


_KINDS = {Written: "w", Deleted: "d", Mismatch: "m"}       # the results a write may leave in the table
_RESULTS = {kind: result_type for result_type, kind in _KINDS.items()}


def packed_entry(fingerprint: tuple, key: str | bytes, result: Any) -> tuple:
    """A table entry as kept: (fingerprint, key, kind, the result's values), all scalars; a result of
    another type is kept as it is, under kind None."""
    kind = _KINDS.get(type(result))
    return (fingerprint, key, kind, tuple(result)) if kind is not None else (fingerprint, key, None, result)


def entry_result(entry: tuple) -> Any:
    """The result a kept entry stands for."""
    kind = entry[2]
    return _RESULTS[kind](*entry[3]) if kind is not None else entry[3]


def public_entry(entry: tuple) -> tuple:
    """(fingerprint, key, result): a kept entry as exports and tools see it."""
    return entry[0], entry[1], entry_result(entry)


class ShardState(BatchWrites, KeyHandover, StateMachine):
    """Keys and values of one shard, plus the outcomes of recent writes."""

    detached_snapshot = True        # snapshot() takes C-level copies; values and rings are never edited
    # for KeyHandover (which shard.py imports): the table's entries as kept and as exported
    _packed_entry = staticmethod(packed_entry)
    _public_entry = staticmethod(public_entry)

    def __init__(self, ownership: tuple[int, str, dict] | None = None, dedup_capacity: int = DEDUP_CAPACITY):
        """`ownership` = (epoch, shard id, ring dict) the group was created for; None owns every key."""
        self._data: dict[str | bytes, str | bytes] = {}     # seed 004's batches bring bytes
        self._versions: dict[str, int] = {}                 # key -> its version (see "Versions")
        self._revision = 0                                  # the last version given; never goes back
        self._writes = 0                                    # odd while a key's value and version change
        # request id -> (operation fingerprint, key, result kind, result values): see the module
        self._dedup: OrderedDict[str, tuple] = OrderedDict()
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
            "set-batch": self._set_batch,
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
        return {"data": dict(self._data), "versions": dict(self._versions), "revision": self._revision,
                # two copies that match: the capture runs on the thread that applies (kvs.raft.snapshots)
                "dedup-ids": list(self._dedup), "dedup-entries": list(self._dedup.values()),
                "ownership": self._ownership, "frozen": self._frozen,
                "tracking": (self._tracking, self._change_number, dict(self._changed_keys),
                             dict(self._changed_requests)),
                "installing": self._installing}

    def restore(self, snapshot: dict) -> None:
        """Discard everything, then take the snapshot's state."""
        self._data = dict(snapshot["data"])
        self._versions = dict(snapshot.get("versions") or {})      # older snapshots: version 0
        self._revision = snapshot.get("revision", 0)
        if "dedup-ids" in snapshot:
            self._dedup = OrderedDict(zip(snapshot["dedup-ids"], snapshot["dedup-entries"]))
        else:                               # written before the packed entries
            self._dedup = OrderedDict((rid, packed_entry(*entry)) for rid, entry in snapshot["dedup"])
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

    def read_versioned(self, key: str) -> tuple[str, int] | None | NotOwned:
        """(value, version) of a key this group serves, None if it does not exist, or NotOwned."""
        refused = self._refuse(key)
        if refused is not None:
            return refused
        while True:
            before = self._writes
            value, version = self._data.get(key), self._versions.get(key, 0)
            if before == self._writes and not before & 1:
                return None if value is None else (value, version)

    def read(self, key: str) -> str | None | NotOwned:
        """The value of a key this group serves, or NotOwned."""
        refused = self._refuse(key)
        return refused if refused is not None else self._data.get(key)

    @property
    def revision(self) -> int:
        """The last version this shard gave or took in (it never goes back)."""
        return self._revision

    @property
    def epoch(self) -> int:
        return self._ownership[0] if self._ownership else 0

    def key_count(self) -> int:
        return len(self._data)

    def dedup_size(self) -> int:
        """Request ids remembered (the exactly-once window; a metric)."""
        return len(self._dedup)

    def dedup_rows(self) -> list:
        """The table as (request id, (fingerprint, key, result)) rows, oldest first (tests, tools)."""
        return [(rid, public_entry(entry)) for rid, entry in list(self._dedup.items())]

    def digest(self) -> str:
        """A fingerprint of the data, equal on replicas that hold the same keys and values."""
        data = dict(self._data)     # C-level copies: the tick thread may be applying meanwhile
        versions = dict(self._versions)
        h = hashlib.sha256()
        for key in sorted(data, key=key_order):
            for field in (key, data[key]):      # typed and length-prefixed: no two states hash alike
                raw = data_bytes(field)
                h.update(b"%c%d:" % (98 if isinstance(field, bytes) else 115, len(raw)))
                h.update(raw)
            h.update(b"v%d;" % versions.get(key, 0))
        return h.hexdigest()

    # -- commands ----------------------------------------------------------

    def _put(self, request_id: str, key: str, value: str, *slot: tuple | None) -> Any:
        refused = self._refuse(key)
        if refused is not None:
            return refused
        if not isinstance(value, str) or len(slot) > 1:
            return Invalid("malformed 'put' command")
        condition = slot[0] if slot else None
        # A digest, not the value: the table keeps 100,000 entries, and values may be 1 MiB each.
        fingerprint = ("put", key, hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()) \
            + _flat(condition)
        seen = self._seen(request_id, fingerprint)
        if seen is not None:
            return seen
        result = self._unmet(key, condition)
        if result is None:
            result = self._written(key) if slot else Written(replaced=key in self._data, version=0)
            self._set(key, value, result.version)
        self._remember(request_id, fingerprint, key, result)
        self._track_write(request_id, key)
        return result

    def _delete(self, request_id: str, key: str, *slot: tuple | None) -> Any:
        refused = self._refuse(key)
        if refused is not None:
            return refused
        if len(slot) > 1:
            return Invalid("malformed 'delete' command")
        condition = slot[0] if slot else None
        fingerprint = ("delete", key) + _flat(condition)
        seen = self._seen(request_id, fingerprint)
        if seen is not None:
            return seen
        result = self._unmet(key, condition)
        if result is None:
            result = Deleted(existed=key in self._data)
            self._unset(key)
        self._remember(request_id, fingerprint, key, result)
        self._track_write(request_id, key)
        return result

    def _written(self, key: str | bytes) -> Written:
        """The outcome of an unconditional write of `key` about to happen: it takes the next version."""
        self._revision += 1
        return Written(replaced=key in self._data, version=self._revision)

    def _set(self, key: str, value: str, version: int) -> None:
        """Change a key's value and version as one step for readers (the seqlock; see "Versions")."""
        self._writes += 1
        self._data[key] = value
        if version:
            self._versions[key] = version
        else:
            self._versions.pop(key, None)
        self._writes += 1

    def _unset(self, key: str) -> None:
        self._writes += 1
        self._data.pop(key, None)
        self._versions.pop(key, None)
        self._writes += 1

    def _unmet(self, key: str, condition: tuple | None) -> Mismatch | Invalid | None:
        """None if the write may go ahead; else why not (the key's version, or a malformed condition)."""
        if condition is None:
            return None
        exists = key in self._data
        version = self._versions.get(key, 0) if exists else 0
        if not isinstance(condition, tuple) or not condition or condition[0] not in CONDITIONS:
            return Invalid("malformed condition")
        if condition[0] == "match":
            if len(condition) != 2 or type(condition[1]) is not int:
                return Invalid("malformed condition")
            return None if exists and version == condition[1] else Mismatch(version, exists)
        if len(condition) != 1:
            return Invalid("malformed condition")
        return None if exists == (condition[0] == "exists") else Mismatch(version, exists)

    def _barrier(self) -> None:
        return None

    # -- fencing ---------------------------------------------------------------

    def _ring(self, ring: dict) -> HashRing:
        key = (tuple(ring["groups"]), ring["vnodes"])
        cached = self._rings.get(key)
        if cached is None:
            cached = self._rings[key] = HashRing.from_dict(ring)
        return cached

    @staticmethod
    def _refused(result: object) -> bool:
        """Whether a read's result is a refusal (for `kvs.fsm.batch`, which cannot import NotOwned)."""
        return isinstance(result, NotOwned)

    def _refuse(self, key: str) -> NotOwned | None:
        if self._ownership is None:
            return None
        epoch, shard_id, ring = self._ownership
        if self._ring(ring).group_for(key) != shard_id:
            return NotOwned(epoch)
        if self._frozen is not None and self._ring(self._frozen[1]).group_for(key) != shard_id:
            return NotOwned(self._frozen[0])
        return None

    # -- deduplication -----------------------------------------------------

    def _seen(self, request_id: str, fingerprint: tuple) -> Any:
        entry = self._dedup.get(request_id)
        if entry is None:
            return None
        if entry[0] != fingerprint:
            return Invalid("request id reused for a different operation")
        return entry_result(entry)

    def _remember(self, request_id: str, fingerprint: tuple, key: str, result: Any) -> None:
        self._dedup[request_id] = packed_entry(fingerprint, key, result)
        while len(self._dedup) > self._dedup_capacity:
            forgotten, _ = self._dedup.popitem(last=False)
            self._changed_requests.pop(forgotten, None)


def _flat(condition: tuple | None) -> tuple:
    """A condition as scalars for a fingerprint (which travels as a flat JSON list): () for none."""
    return () if condition is None else tuple(condition) if isinstance(condition, tuple) else ("?",)
