"""RangeCopy: moving one range of keys from its source group into its destination group.

A copy is read from the source page by page (`Remote.export`, each page after
its own read index: the rows after a cursor, up to PAGE_BYTES, the source
capping it) and each page is installed into the destination through the
destination's own log before the next is read, in `Install` commands of about
CHUNK_BYTES each (with the keys' slice of the deduplication table, so a retried
write is still recognised after the move): the coordinator holds one page, not
the range. The first copy of a move replaces any earlier partial one (`clear`,
on its first install only); later copies carry only the keys written (or
deleted) at the source since the change number the previous copy was read at.

The copier remembers which keys it moved away from each source: after the
commit, the coordinator drops exactly those keys there, in slices, instead of
one command that scans the whole shard.
"""

from __future__ import annotations

import time
from dataclasses import replace

from kvs.config.epoch import ConfigEpoch
from kvs.fsm.commands import Install
from kvs.reconfig.planner import Move, Plan
from kvs.reconfig.protocol import ExportRequest
from kvs.reconfig.remote import Remote

CHUNK_BYTES = 64 * 1024   # one install command carries about this much (one log entry, applied in one go)
# An export page carries about this much at most (the source may cap it lower, KVS_EXPORT_PAGE_BYTES).
# A page is encoded, sent and decoded in one piece, each step holding the GIL of a node that also
# serves keys (json alone: ~6 ms to encode 1 MiB, 2 to decode): the smaller the page, the shorter the
# wait it puts on the requests around it. With 1 MiB pages, the p99 of writes to keys that did not move
# was 2.1-2.4x its baseline during a 2 -> 3 node change; with 128 KiB 1.4-1.6x, with 64 KiB no better
# than that and the change took half as long again (benchmarks/results/view-change-pages-2026-12-05).
PAGE_BYTES = 128 << 10
COPY_PAUSE_RATIO = 3.0    # the bulk copy pauses this long, relative to each install, between installs


class RangeCopy:
    def __init__(self, remote: Remote, progress):
        self._remote = remote
        self._progress = progress             # the coordinator's Progress: keys counted as they move
        self.copied_keys: dict[tuple[int, str], set[str]] = {}     # (epoch, source) -> keys copied away

    def copy(self, move: Move, plan: Plan, current: ConfigEpoch, since: int | None) -> int:
        """Copy a move's keys into its destination: all of them (since=None, replacing any earlier
        partial copy), or only those written after change number `since`. Returns the change number
        the copy was read at: its first page's.

        Why the first page's: each page is a separate read, at a later moment than the one before. The
        first page reads the source's change number N before any of its rows, so every write of a
        moving key applied after that read is numbered above N (`kvs.fsm.handover`, "Change
        tracking"); a later page reads each row as of its own, later, moment. A key whose row a page
        sent may be written again before the last page, and a key of a later page may be deleted
        before that page is read: either way the write is numbered above N, and the next catch-up,
        `since` N, carries the key's current value or its deletion, as it carries the writes made
        while a one-shot export was read. A later page's number would skip writes to keys already
        sent. (Rows read after N and also numbered above it travel twice: installs are idempotent.)"""
        old_ring, new_ring = current.ring.to_dict(), plan.epoch.ring.to_dict()
        n = plan.epoch.number
        copied = self.copied_keys.setdefault((n, move.source), set())
        request = ExportRequest(move.source, old_ring, new_ring, move.destination, since, budget=PAGE_BYTES)
        first_number, installs = None, 0
        while True:
            page = self._remote.export(current, move.source, request)
            if first_number is None:
                first_number = page.number
            if since is None:
                self._progress.keys_total += len(page.items)
            # An empty page (an empty range) is still one install: the first one clears. Each install carries
            # the source's revision as its page read it, and the destination's counter goes past it (and
            # past every version installed): what matters is that after the last catch-up, read after the
            # freeze, the destination is past every version a moving key had at the source, so a key
            # deleted there (not copied) never gets a version it had (`kvs.fsm.handover` `_install`).
            # The revision only grows, so each page's own is the newest known when it is installed, and
            # the destination ends past the last page's of the last round, as past the one-shot
            # export's before.
            for items, dedup, deleted in batches(page.items, page.dedup, page.deleted):
                started = time.monotonic()
                self._remote.command(plan.epoch, move.destination,
                                     Install(n, move.source, old_ring, new_ring, items, dedup,
                                             clear=since is None and installs == 0, deleted=deleted,
                                             revision=page.revision))
                installs += 1
                self._progress.keys_moved += len(items) + len(deleted)
                copied.update(row[0] for row in items)
                copied.update(deleted)
                if since is None:
                    # Pacing, not synchronisation: the bulk copy shares the cores and the destination's log
                    # with client traffic, so it leaves them as much time as each install took.
                    time.sleep((time.monotonic() - started) * COPY_PAUSE_RATIO)
            if not page.more:
                return first_number
            request = replace(request, after=page.cursor)


def batches(items: list, dedup: list, deleted: list) -> list[tuple[list, list, list]]:
    """Cut a range's keys, dedup entries and deletions into install commands of about CHUNK_BYTES each."""
    cut: list[tuple[list, list, list]] = [([], [], [])]
    size = 0
    for kind, rows in ((0, items), (1, dedup), (2, deleted)):
        for row in rows:
            row_size = len(str(row)) + 8
            if size + row_size > CHUNK_BYTES and any(cut[-1]):
                cut.append(([], [], []))
                size = 0
            cut[-1][kind].append(row)
            size += row_size
    return cut
