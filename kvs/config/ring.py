"""Which shard group owns a key: a consistent-hash ring with virtual nodes.

Why a consistent-hash ring: keys and groups are placed on the same circle of
2**64 positions and a key belongs to the first group token at or after it,
clockwise. Adding a group to n groups therefore moves only about 1/(n+1) of the
keys, and only to the new group; removing a group moves only that group's keys.
(With `hash(key) % n`, nearly every key would move on every change.)

Why virtual nodes: one token per group would give very uneven arcs. Each group
instead places `vnodes` tokens, at key_hash(f"{group}#{i}") for i in
range(vnodes), so its share of the ring is the sum of many small arcs and stays
close to 1/n. DEFAULT_VNODES = 1024 keeps every group within a few percent of
the mean for small clusters, while building a ring stays in the milliseconds.

Why a stable hash: every node must compute the same ring from the same inputs,
in any process, on any machine. Python's built-in `hash()` of a str is salted
per process, so it is never used; key_hash is BLAKE2b with an 8-byte digest,
read as a big-endian unsigned 64-bit integer. The ring is a pure function of
(sorted groups, vnodes), which is all `to_dict` stores. Two tokens at the same
position (a 64-bit collision) are resolved in favour of the smallest group id.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from functools import lru_cache
from dataclasses import dataclass
from typing import Hashable, Iterable, TypeVar

L = TypeVar("L", bound=Hashable)

RING_SIZE = 2**64
DEFAULT_VNODES = 1024
TOKEN_BUDGET = 65536        # rings of many groups: about this many tokens in all (see ring_vnodes)


def ring_vnodes(groups: int, current: int = DEFAULT_VNODES) -> int:
    """Virtual nodes per group for a ring of `groups` groups: `current` (1024 by default) up to 64
    groups, then fewer, so that a ring never holds much more than TOKEN_BUDGET tokens and planning
    a change of 1,000 groups stays under a second. A group's tokens are "g#0" .. "g#(v-1)", so
    lowering v only drops a few tokens of every group: the keys near them move, no others."""
    return min(current, max(64, TOKEN_BUDGET // max(1, groups)))


@lru_cache(maxsize=4096)
def _tokens(group: str, vnodes: int) -> tuple[tuple[int, str], ...]:
    """A group's (position, group) tokens: a pure function of (group, vnodes), so cached (the planner
    builds the old and the new ring, which share most groups)."""
    blake = hashlib.blake2b
    return tuple((int.from_bytes(blake(f"{group}#{i}".encode("utf-8"), digest_size=8).digest(), "big"), group)
                 for i in range(vnodes))


def key_hash(key: str | bytes) -> int:
    """Position of `key` on the ring: BLAKE2b-64 of its UTF-8 bytes (a binary key: its bytes), big-endian."""
    digest = hashlib.blake2b(key if isinstance(key, bytes) else key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class HashRange:
    """The half-open arc (start, end] of the ring, owned by `group`.

    If start > end the arc wraps around 0. If start == end the arc is the whole
    ring (only possible when one group owns everything).
    """

    start: int
    end: int
    group: str

    def contains(self, h: int) -> bool:
        if self.start < self.end:
            return self.start < h <= self.end
        if self.start > self.end:
            return h > self.start or h <= self.end
        return True

    @property
    def length(self) -> int:
        """Number of ring positions in the arc (RING_SIZE for the whole ring)."""
        return (self.end - self.start) % RING_SIZE or RING_SIZE


class HashRing:
    """An immutable ring for a set of groups; see the module docstring."""

    def __init__(self, groups: Iterable[str], vnodes: int = DEFAULT_VNODES):
        if isinstance(groups, str):
            raise TypeError("groups must be an iterable of group ids, not a str")
        names = sorted(groups)
        if not names:
            raise ValueError("a ring needs at least one group")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate group ids: {names}")
        if not all(isinstance(g, str) and g for g in names):
            raise ValueError(f"group ids must be non-empty strings: {names}")
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"vnodes must be a positive int, not {vnodes!r}")
        self.groups: tuple[str, ...] = tuple(names)
        self.vnodes: int = vnodes

        tokens = sorted(t for g in names for t in _tokens(g, vnodes))
        # One entry per distinct position; on a collision the smallest group wins.
        self._hashes: list[int] = []
        self._owners: list[str] = []
        for h, g in tokens:
            if not self._hashes or self._hashes[-1] != h:
                self._hashes.append(h)
                self._owners.append(g)

    def group_for(self, key: str) -> str:
        return self.group_for_hash(key_hash(key))

    def group_for_hash(self, h: int) -> str:
        """Owner of position h: the first token at or after h, wrapping past the top."""
        i = bisect_left(self._hashes, h)
        return self._owners[i if i < len(self._owners) else 0]

    def ranges(self) -> list[HashRange]:
        """Every arc with its owner, in ring order (by end), adjacent same-group arcs merged.

        The arcs cover the ring exactly once; the first one contains position 0.
        """
        hashes = self._hashes
        arcs = [(hashes[i - 1], h, g) for i, (h, g) in enumerate(zip(hashes, self._owners))]
        return [HashRange(start, end, g) for start, end, g in _merge(arcs)]

    def ranges_of(self, group: str) -> list[HashRange]:
        return [r for r in self.ranges() if r.group == group]

    def to_dict(self) -> dict:
        return {"groups": list(self.groups), "vnodes": self.vnodes}

    @classmethod
    def from_dict(cls, d: dict) -> HashRing:
        return cls(d["groups"], d["vnodes"])

    def _key(self) -> tuple[tuple[str, ...], int]:
        return self.groups, self.vnodes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"HashRing(groups={list(self.groups)!r}, vnodes={self.vnodes})"


def moved_ranges(old: HashRing, new: HashRing) -> list[tuple[HashRange, str, str]]:
    """The arcs whose owner differs between `old` and `new`, as (arc, old_group, new_group).

    The ring is cut at every token of either ring, so each piece has a single
    owner in both; pieces that changed owner are kept and adjacent pieces with
    the same (old_group, new_group) are merged. `arc.group` is the new owner.
    Arcs are in ring order; a key moves iff its hash lies in one of them.
    One walk over both sorted token lists: the owner of a point is the first
    token at or after it, and the points only grow.
    """
    points = sorted(set(old._hashes) | set(new._hashes))
    oh, oo, nh, no = old._hashes, old._owners, new._hashes, new._owners
    i = j = 0
    pieces = []
    previous = points[-1]
    for end in points:
        while i < len(oh) and oh[i] < end:
            i += 1
        while j < len(nh) and nh[j] < end:
            j += 1
        src = oo[i] if i < len(oo) else oo[0]
        dst = no[j] if j < len(no) else no[0]
        if src != dst:
            pieces.append((previous, end, (src, dst)))
        previous = end
    return [(HashRange(start, end, dst), src, dst) for start, end, (src, dst) in _merge(pieces)]


def _merge(arcs: list[tuple[int, int, L]]) -> list[tuple[int, int, L]]:
    """Merge touching (start, end, label) arcs with equal labels, also across the top.

    `arcs` must be in ring order (by end) and must not overlap.
    """
    merged: list[tuple[int, int, L]] = []
    for start, end, label in arcs:
        if merged and merged[-1][1] == start and merged[-1][2] == label:
            merged[-1] = (merged[-1][0], end, label)
        else:
            merged.append((start, end, label))
    if len(merged) > 1:
        first, last = merged[0], merged[-1]
        if last[1] == first[0] and last[2] == first[2]:
            merged[0] = (last[0], first[1], first[2])
            merged.pop()
    return merged
