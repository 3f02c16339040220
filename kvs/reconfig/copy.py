"""RangeCopy: moving one range of keys from its source group into its destination group.

A copy is read from the source after a read index (`Remote.export`) and
installed into the destination through the destination's own log, in
`Install` commands of about CHUNK_BYTES each (with the keys' slice of the
deduplication table, so a retried write is still recognised after the move).
The first copy of a move replaces any earlier partial one (`clear`); later
copies carry only the keys written (or deleted) at the source since the change
number the previous copy was read at.

The copier remembers which keys it moved away from each source: after the
commit, the coordinator drops exactly those keys there, in slices, instead of
one command that scans the whole shard.
"""

from __future__ import annotations

import time

from kvs.config.epoch import ConfigEpoch
from kvs.fsm.commands import Install
from kvs.reconfig.planner import Move, Plan
from kvs.reconfig.protocol import ExportRequest
from kvs.reconfig.remote import Remote

CHUNK_BYTES = 64 * 1024   # one install command carries about this much (requests are capped at 1 MiB)
COPY_PAUSE_RATIO = 3.0    # the bulk copy pauses this long, relative to each install, between installs


class RangeCopy:
    def __init__(self, remote: Remote, progress):
        self._remote = remote
        self._progress = progress             # the coordinator's Progress: keys counted as they move
        self.copied_keys: dict[tuple[int, str], set[str]] = {}     # (epoch, source) -> keys copied away

    def copy(self, move: Move, plan: Plan, current: ConfigEpoch, since: int | None) -> int:
        """Copy a move's keys into its destination: all of them (since=None, replacing any earlier
        partial copy), or only those written after change number `since`. Returns the change number
        the copy was read at."""
        old_ring, new_ring = current.ring.to_dict(), plan.epoch.ring.to_dict()
        exported = self._remote.export(current, move.source,
                                       ExportRequest(move.source, old_ring, new_ring, move.destination, since))
        n = plan.epoch.number
        if since is None:
            self._progress.keys_total += len(exported.items)
        copied = self.copied_keys.setdefault((n, move.source), set())
        for i, (items, dedup, deleted) in enumerate(batches(exported.items, exported.dedup, exported.deleted)):
            started = time.monotonic()
            self._remote.command(plan.epoch, move.destination,
                                 Install(n, move.source, old_ring, new_ring, items, dedup,
                                         clear=since is None and i == 0, deleted=deleted,
                                         revision=exported.revision))
            self._progress.keys_moved += len(items) + len(deleted)
            copied.update(row[0] for row in items)
            copied.update(deleted)
            if since is None:
                # Pacing, not synchronisation: the bulk copy shares the cores and the destination's log with
                # client traffic, so it leaves them as much time as each install took.
                time.sleep((time.monotonic() - started) * COPY_PAUSE_RATIO)
        return exported.number


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
