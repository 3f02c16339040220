"""KeyHandover: the shard state machine's part in view changes (a mixin of `kvs.fsm.shard.ShardState`).

Commands, all idempotent, sent by a view change's coordinator (kvs.reconfig.coordinator):
    ("track", epoch, new_ring)        number every later write of a key that moves away under
                                      `new_ring`, so a copy can be caught up with only the changes
    ("freeze", epoch, new_ring)       stop serving keys that move away under `new_ring`
    ("thaw", epoch)                   undo a freeze and tracking (the change was rolled back)
    ("install", epoch, source, old_ring, new_ring, items, dedup, clear[, deleted[, revision]])
                                      receive keys moving here from `source` (with their slice
                                      of the deduplication table); `clear` first empties that set;
                                      `deleted` keys were deleted at the source since the last copy;
                                      `revision` is the source's counter (versions go past it)
    ("own", epoch, shard_id, ring)    take the ownership of `epoch`
    ("drop", epoch)                   forget keys (and dedup entries) no longer owned
    ("drop-keys", epoch, keys)        forget those of `keys` no longer owned: the same, in slices the
                                      coordinator knows, so no single entry scans the whole shard
Rings travel as `HashRing.to_dict()`. Moving keys carry their versions.

Change tracking: between "track" and the end of the change, every applied
write of a moving key gets the next number of a counter that is part of the
replicated state, as does its deduplication entry. A copy reads the counter
before the keys, so "everything numbered above what the last copy saw" is a
superset of what changed since: the final catch-up after the freeze moves
only those keys, and the write pause no longer grows with the range.

It works on ShardState's attributes (`_data`, `_versions`, `_revision`, `_dedup`, `_ownership`,
`_frozen`, `_tracking`, ...), changes keys only through its `_set` and `_unset` (the readers'
seqlock), and uses its fencing (`_ring`, `_refuse`, `epoch`); like the rest of the
state machine it is deterministic and never raises into the log.
"""

from __future__ import annotations

from typing import Any

from kvs.fsm.batch import key_order


class KeyHandover:
    """Export, tracking, freezing, installation and ownership of the keys a view change moves."""

    def export(self, source: str, old_ring: dict, new_ring: dict, destination: str) -> tuple[list, list, int]:
        """(items, dedup entries, change number) of the keys moving from `source` to `destination`;
        items are (key, value, version)."""
        number, items, versions, dedup, moving = self.export_rows(source, old_ring, new_ring, destination)
        return sorted(((k, v, versions.get(k, 0)) for k, v in items if moving(k)), key=lambda row: key_order(row[0])), \
            [e for e in dedup if moving(e[1][1])], number

    def export_rows(self, source: str, old_ring: dict, new_ring: dict,
                    destination: str) -> tuple[int, list, dict, list, Any]:
        """(change number, every (key, value), the versions, every dedup entry, is-moving predicate): the raw
        material of `export`, taken with C-level copies so the caller can filter it in slices.

        The change number is read first: a write applied while the copy is taken (reads run beside
        the tick thread) is numbered above it, so `export_changes(since=it)` catches it up."""
        number = self._change_number
        moving = self._mover(source, old_ring, new_ring, destination)
        return number, list(self._data.items()), dict(self._versions), list(self._dedup.items()), moving

    def export_changes(self, source: str, old_ring: dict, new_ring: dict, destination: str,
                       since: int) -> tuple[list, list, list, int]:
        """(items, deleted keys, dedup entries, change number): the tracked writes numbered above
        `since` of keys moving from `source` to `destination`, with their current values."""
        number = self._change_number
        moving = self._mover(source, old_ring, new_ring, destination)
        keys = [k for k, n in list(self._changed_keys.items()) if n > since and moving(k)]
        data, versions = self._data, self._versions
        items, deleted = [], []
        for key in sorted(keys, key=key_order):
            value = data.get(key)
            if value is None:
                deleted.append(key)
            else:
                items.append((key, value, versions.get(key, 0)))
        dedup = []
        for rid, n in list(self._changed_requests.items()):
            entry = self._dedup.get(rid)
            if n > since and entry is not None and moving(entry[1]):
                dedup.append((rid, entry))
        return items, deleted, dedup, number

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
                 clear: bool, deleted: list = (), source_revision: int = 0) -> int:
        if epoch < self.epoch:
            return 0
        destination = self._ownership[1] if self._ownership else None
        if clear and self._installing:
            moving = self._mover(source, old_ring, new_ring, destination)
            for key in [k for k in self._data if moving(k)]:
                self._unset(key)
        for row in items:                   # (key, value, version); (key, value) from older nodes
            version = row[2] if len(row) > 2 else 0
            self._set(row[0], row[1], version)
            self._revision = max(self._revision, version)
        for key in deleted:
            self._unset(key)
        # Past the source's counter too: a key deleted there (so not copied) may come back here, and
        # must not get a version it had there.
        self._revision = max(self._revision, source_revision)
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
            self._unset(key)
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
            self._unset(key)
        return len(gone)
