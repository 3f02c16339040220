"""Listings: `GET /fetch` reads every shard page by page, no node holding more than a page of values.

The node that serves a shard's pages (its replica: leader or follower, after a
read index each) sorts the shard's keys once per listing and keeps that list
while the listing runs (at most MAX_LISTINGS at once, each dropped after
IDLE_SECONDS without a page): the copy of the key list is taken on the event
loop (a C-level copy), the ownership filter and the sort run on a worker
thread, one listing's at a time. A page holds up to PAGE_KEYS pairs and
PAGE_BYTES of keys and values, and names the key to continue after: any
replica can continue from any key (a list built later is as good: it only
holds keys written since, which a listing may or may not show).

Every page also names the group's ownership epoch; a page with a key that is
moving away (frozen) or moved is refused (NotOwned), and a listing whose
shard changed epoch between pages is broken off by its caller: a view change
during a listing makes it fail, never silently skip or repeat keys.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import OrderedDict
from typing import Any

from kvs.errors import WrongGroup
from kvs.fsm.batch import key_order, owned_by
from kvs.fsm.shard import NotOwned

PAGE_KEYS = 1000
PAGE_BYTES = 4 << 20
MAX_LISTINGS = 8
IDLE_SECONDS = 60.0


def _owned_sorted(keys: list, ownership: tuple | None) -> list:
    return sorted(owned_by(keys, ownership), key=key_order)


class Listings:
    """The sorted key lists of the listings this node serves pages for (event-loop only)."""

    def __init__(self):
        # (shard id, listing id) -> (last used, the group object it was read from, sorted keys)
        self._lists: OrderedDict[tuple[str, str], tuple[float, object, list]] = OrderedDict()
        self._sorting = asyncio.Lock()      # one sort at a time: a burst of listings cannot pile them up

    async def page(self, replica, shard_id: str, listing: str, after: Any, deadline: float) -> tuple[list, Any, int]:
        """(rows, key to continue after or None, the group's ownership epoch) of the page after `after`."""
        keys = await self._sorted_keys(replica, shard_id, listing, deadline)
        start = 0 if after is None else bisect.bisect_right(keys, key_order(after), key=key_order)
        page = keys[start:start + PAGE_KEYS]
        rows, last, epoch = await replica.read(lambda state: (*state.rows(page, PAGE_BYTES), state.epoch), deadline)
        if isinstance(rows, NotOwned):
            raise WrongGroup("a key of the page is moving to another shard", rows.epoch)
        more = last is not None and (last != page[-1] or start + PAGE_KEYS < len(keys))
        return rows, last if more else None, epoch

    async def _sorted_keys(self, replica, shard_id: str, listing: str, deadline: float) -> list:
        now = time.monotonic()
        for name in [n for n, entry in self._lists.items() if now - entry[0] > IDLE_SECONDS]:
            del self._lists[name]
        entry = self._lists.get((shard_id, listing))
        if entry is not None and entry[1] is replica.group:
            self._lists[(shard_id, listing)] = (now, *entry[1:])
            self._lists.move_to_end((shard_id, listing))
            return entry[2]
        async with self._sorting:
            keys, ownership = await replica.read(lambda state: state.key_list(), deadline)
            ordered = await asyncio.to_thread(_owned_sorted, keys, ownership)
        self._lists[(shard_id, listing)] = (time.monotonic(), replica.group, ordered)
        while len(self._lists) > MAX_LISTINGS:
            self._lists.popitem(last=False)
        return ordered
