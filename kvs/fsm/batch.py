"""A shard's part of a seed-004 batch: many writes in one log entry, and reads of many keys.

`kvs.routing.batches` groups a batch's pairs by shard; each shard's part is
one command, so it is applied atomically in that shard (every pair or none:
a part with a key the group does not own changes nothing and returns
NotOwned, and the router sends it again by the newer epoch). The batch as a
whole is not atomic across shards.

    ("set-batch", request_id, ((index, key, value), ...))  -> (Written, ...) | NotOwned | Invalid

Keys and values are `str` or `bytes` (binary data stays bytes in the log,
snapshots and view-change copies; a binary key that is valid UTF-8 arrives as
the same `str` a REST request names, one keyspace). `index` is the pair's
place in the client's batch: each pair is remembered in the deduplication
table under "<request id>#<index>" with its own key, so a retried batch is
applied once per pair even if a view change regroups its pairs into other
parts (the table's rows travel with their keys).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from kvs.config.ring import HashRing
from kvs.fsm.base import Invalid

MAX_BATCH_PAIRS = 1000      # pairs in one command (the HTTP layer refuses bigger batches first)


def is_data(x: object) -> bool:
    """A key or value the state machine keeps: bytes, or a str that UTF-8 can encode."""
    if isinstance(x, bytes):
        return True
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def data_bytes(x: str | bytes) -> bytes:
    return x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass")


def key_order(key: str | bytes) -> tuple:
    """Sort order of keys of both types (Python cannot compare str with bytes): strings, then bytes."""
    return (isinstance(key, bytes), key)


def pair_fingerprint(key: str | bytes, value: str | bytes) -> tuple:
    """What a remembered pair is compared with on a retry: a digest of key, value and their types."""
    h = hashlib.sha256()
    for x in (key, value):
        data = data_bytes(x)
        h.update(b"b" if isinstance(x, bytes) else b"s")
        h.update(b"%d:" % len(data))
        h.update(data)
    return ("set", h.hexdigest())


class BatchWrites:
    """Mixed into `kvs.fsm.shard.ShardState` (its `_refuse`, `_seen`, `_remember`, `_set` ...)."""

    def _set_batch(self, request_id: object, pairs: object) -> Any:
        if not isinstance(request_id, str) or not isinstance(pairs, (tuple, list)) \
                or not 0 < len(pairs) <= MAX_BATCH_PAIRS:
            return Invalid("malformed 'set-batch' command")
        for row in pairs:
            if not (isinstance(row, (tuple, list)) and len(row) == 3 and type(row[0]) is int and row[0] >= 0
                    and is_data(row[1]) and is_data(row[2]) and len(row[1]) > 0):
                return Invalid("malformed pair in a 'set-batch' command")
        if len({row[0] for row in pairs}) != len(pairs):
            return Invalid("a pair index repeats in a 'set-batch' command")
        # All or nothing: refuse the whole part before anything changes.
        for _, key, _ in pairs:
            refused = self._refuse(key)
            if refused is not None:
                return refused
        ids = [f"{request_id}#{index}" for index, _, _ in pairs]
        prints = [pair_fingerprint(key, value) for _, key, value in pairs]
        seen = [self._seen(rid, fp) for rid, fp in zip(ids, prints)]
        if any(isinstance(s, Invalid) for s in seen):
            return Invalid("request id reused for a different batch")
        results = []
        for (_, key, value), rid, fp, earlier in zip(pairs, ids, prints, seen):
            if earlier is not None:
                results.append(earlier)
                continue
            result = self._written(key)
            self._set(key, value, result.version)
            self._remember(rid, fp, key, result)
            self._track_write(rid, key)
            results.append(result)
        return tuple(results)

    # -- reads (never replicated; callers order them with a read index) -----------------------------

    def read_many(self, keys: list, budget: int) -> list:
        """(value, version), None (missing) or NotOwned for each key, as `read_versioned` gives them; once
        the values read add up to `budget` bytes, the rest are Skipped (the reply would be too big)."""
        found, used = [], 0
        for key in keys:
            if used >= budget:
                found.append(SKIPPED)
                continue
            result = self.read_versioned(key)
            if result is not None and not self._refused(result):
                used += len(result[0])
            found.append(result)
        return found

    def exist_many(self, keys: list) -> list:
        """True, False or NotOwned for each key (no values: a query's answer is small whatever they hold)."""
        found = (self.read_versioned(key) for key in keys)
        return [r if self._refused(r) else r is not None for r in found]

    def consistent_rows(self, attempts: int = 100) -> list | None:
        """(key, value, version) of every key owned here, all as of one moment (a backup): C-level copies
        taken between two writes of the tick thread (the seqlock of `read_versioned`, over the whole
        state); None if writes never left room for one within `attempts`."""
        for _ in range(attempts):
            before = self._writes
            if before & 1:
                continue
            data, versions = dict(self._data), dict(self._versions)
            if self._writes == before:
                return [(k, data[k], versions.get(k, 0)) for k in owned_by(list(data), self._ownership)]
        return None

    def key_list(self) -> tuple[list, tuple | None]:
        """Every key held here (a C-level copy, cheap while the tick thread applies) and the ownership it
        is filtered by (`owned_by`); the caller filters and sorts off the event loop."""
        return list(self._data), self._ownership

    def rows(self, keys: list, budget: int) -> tuple[list, object]:
        """(key, value) of each of `keys` that still exists, in order, until the values add up to `budget`
        bytes; and the last key looked at. NotOwned if one of them is no longer served here (moving
        away, or moved): a listing must not silently leave it out."""
        rows, used, last = [], 0, None
        for key in keys:
            if used >= budget:
                break
            found = self.read_versioned(key)
            if self._refused(found):
                return found, None
            last = key
            if found is not None:
                rows.append((key, found[0]))
                used += len(found[0]) + len(key)
        return rows, last


class Skipped(NamedTuple):
    """A key a batched read did not read: the reply had reached its size budget."""


SKIPPED = Skipped()


def owned_by(keys: list, ownership: tuple | None) -> list:
    """Those of `keys` the ownership (epoch, shard id, ring dict) gives its shard (pure; any thread)."""
    if ownership is None:
        return keys
    _, shard_id, ring = ownership
    group_for = HashRing.from_dict(ring).group_for
    return [k for k in keys if group_for(k) == shard_id]
