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

Export in pages (`export_page_rows`): a copy is read as a sequence of rows in
one order, that of the keys they belong to (`kvs.fsm.batch.key_order`), a
key's own row (its value, or in a catch-up its deletion) before its
deduplication entries, those by request id. A page is the rows after a cursor,
the position (key, request id or None for the key's own row) of the last row
already sent, so every row belongs to exactly one page, also a dedup entry
whose key no longer exists. The reader (`kvs.http.internal`) stops at its byte
budget, so no reply, and no coordinator, holds more than a page. Each page is a
separate read, after its own read index: why the change number of a pass is its
first page's, see `kvs.reconfig.copy`. Stateless, a page costs a scan of the
shard's keys (and of the dedup table): sorted in short runs, merged only as far
as the page reads.

It works on ShardState's attributes (`_data`, `_versions`, `_revision`, `_dedup` with its entries'
`_packed_entry` and `_public_entry` forms, `_ownership`,
`_frozen`, `_tracking`, ...), changes keys only through its `_set` and `_unset` (the readers'
seqlock), and uses its fencing (`_ring`, `_refuse`, `epoch`); like the rest of the
state machine it is deterministic and never raises into the log.
"""

from __future__ import annotations

import heapq
from typing import Iterator

from kvs.config.ring import key_hash

PAGE_SCAN_ROWS = 2000      # keys (or dedup entries) a page's reader scans between two of its pauses (None rows)


class KeyHandover:
    """Export, tracking, freezing, installation and ownership of the keys a view change moves."""

    def export(self, source: str, old_ring: dict, new_ring: dict, destination: str) -> tuple[list, list, int]:
        """(items, dedup entries, change number) of the keys moving from `source` to `destination`,
        all at once (tests; the endpoints read pages); items are (key, value, version), in key order."""
        number, _, rows = self.export_page_rows(source, old_ring, new_ring, destination, None, None)
        items, _, dedup = _split(rows)
        return items, dedup, number

    def export_changes(self, source: str, old_ring: dict, new_ring: dict, destination: str,
                       since: int) -> tuple[list, list, list, int]:
        """(items, deleted keys, dedup entries, change number): the tracked writes numbered above
        `since` of keys moving from `source` to `destination`, with their current values, all at once."""
        number, _, rows = self.export_page_rows(source, old_ring, new_ring, destination, since, None)
        return (*_split(rows), number)

    def export_page_rows(self, source: str, old_ring: dict, new_ring: dict, destination: str, since: int | None,
                         after: tuple | None) -> tuple[int, int, Iterator]:
        """(change number, revision, rows): the rows of the keys moving from `source` to `destination`
        (all of them, or with `since` those of the tracked writes numbered above it) that come after the
        cursor `after` ((key, request id | None); None: from the start), lazily, in the export order (see
        "Export in pages"). A row is ("item", (key, value, version), position), ("deleted", key,
        position) or ("dedup", (request id, entry), position); None now and then, between slices of
        PAGE_SCAN_ROWS keys scanned: the reader may pause there (the scans are pure Python).

        Called after a read index. The change number is read first: a write applied while the page is
        read (reads run beside the tick thread) is numbered above it, so a catch-up since the number
        of a pass's first page carries it. Only C-level copies are taken here; the rows read the
        values lazily, each as of its own moment (value and version together: the seqlock), never
        older than the number."""
        number, revision = self._change_number, self._revision
        moving = self._mover(source, old_ring, new_ring, destination)
        if since is None:                   # request ids only: a tuple each would be garbage to collect, per page
            keys, requests = list(self._data), list(self._dedup)
        else:
            keys, requests = list(self._changed_keys.items()), list(self._changed_requests.items())
        return number, revision, self._page_rows(keys, requests, moving, since, after)

    def _page_rows(self, keys: list, requests: list, moving, since: int | None, after: tuple | None) -> Iterator:
        start, start_rid = after if after is not None else (None, None)
        dedup = self._dedup
        first_rid: dict = {}                # key -> a request id of its dedup rows (one, mostly)
        more_rids: dict = {}                # key -> all of them, for the keys with several
        for first in range(0, len(requests), PAGE_SCAN_ROWS):
            for rid in requests[first:first + PAGE_SCAN_ROWS]:
                if since is not None:
                    rid, number = rid
                    if number <= since:
                        continue
                entry = dedup.get(rid)
                if entry is not None:
                    seen = first_rid.setdefault(entry[1], rid)
                    if seen is not rid:
                        more_rids.setdefault(entry[1], [seen]).append(rid)
            yield None
        # The keys after the cursor, and those with dedup rows at or after it (the cursor's own may have some
        # left), sorted in runs of PAGE_SCAN_ROWS (a short step each), then merged lazily: a page pays the
        # merge only for the keys it reads. str keys before bytes keys (key_order).
        runs: tuple[list, list] = ([], [])
        changed: set = set()                # a catch-up's keys whose own row comes after the cursor
        for first in range(0, len(keys), PAGE_SCAN_ROWS):
            part = keys[first:first + PAGE_SCAN_ROWS]
            if since is not None:
                part = [k for k, n in part if n > since]
            part = _after(part, start, False)
            if since is not None:
                changed.update(part)
            _add_runs(runs, part)
            yield None
        with_dedup = _after(list(first_rid), start, True)
        for first in range(0, len(with_dedup), PAGE_SCAN_ROWS):
            _add_runs(runs, with_dedup[first:first + PAGE_SCAN_ROWS])
            yield None
        looked = 0
        for same_type in runs:
            previous = None
            for key in heapq.merge(*same_type):
                if key == previous:         # a key in both kinds of run comes twice, in a row
                    continue
                previous, looked = key, looked + 1
                if looked % PAGE_SCAN_ROWS == 0:
                    yield None              # a range with few moving keys may take many steps per row
                if not moving(key):
                    continue
                if key != start and (since is None or key in changed):
                    row = self._current(key)
                    if row is not None:
                        yield "item", row, (key, None)
                    elif since is not None:
                        yield "deleted", key, (key, None)
                rids = more_rids.get(key) or ([first_rid[key]] if key in first_rid else ())
                for rid in sorted(rids):
                    entry = dedup.get(rid)          # None: forgotten meanwhile (the table is a FIFO)
                    if entry is not None and entry[1] == key and (key != start or start_rid is None or rid > start_rid):
                        yield "dedup", (rid, self._public_entry(entry)), (key, rid)

    def _current(self, key) -> tuple | None:
        """(key, value, version) as of one moment (the readers' seqlock), moving or frozen alike; None if
        the key does not exist."""
        while True:
            before = self._writes
            value, version = self._data.get(key), self._versions.get(key, 0)
            if before == self._writes and not before & 1:
                return None if value is None else (key, value, version)

    def _mover(self, source: str, old_ring: dict, new_ring: dict, destination: str):
        old, new = self._ring(old_ring).group_for_hash, self._ring(new_ring).group_for_hash

        def moving(key) -> bool:
            h = key_hash(key)               # once for both rings
            return old(h) == source and new(h) == destination
        return moving

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
            self._dedup.setdefault(request_id, self._packed_entry(*entry))
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


def _after(keys: list, start, inclusive: bool) -> list:
    """Those of `keys` at (if inclusive) or after `start` in key order (None: all), by native comparisons
    (key_order's tuples would cost an allocation per key of the shard, per page)."""
    if start is None:
        return keys
    if isinstance(start, bytes):            # only bytes keys come after a bytes key
        if inclusive:
            return [k for k in keys if k.__class__ is bytes and k >= start]
        return [k for k in keys if k.__class__ is bytes and k > start]
    if inclusive:                           # every bytes key comes after a str key
        return [k for k in keys if k.__class__ is bytes or k >= start]
    return [k for k in keys if k.__class__ is bytes or k > start]


def _add_runs(runs: tuple[list, list], keys: list) -> None:
    """Add `keys` to the sorted runs of their type: runs[0] str, runs[1] bytes."""
    strs = [k for k in keys if k.__class__ is not bytes]
    if strs:
        runs[0].append(sorted(strs))
    if len(strs) < len(keys):
        runs[1].append(sorted(k for k in keys if k.__class__ is bytes))


def _split(rows: Iterator) -> tuple[list, list, list]:
    """(items, deleted keys, dedup entries) of every row."""
    out: dict[str, list] = {"item": [], "deleted": [], "dedup": []}
    for row in rows:
        if row is not None:
            out[row[0]].append(row[1])
    return out["item"], out["deleted"], out["dedup"]
