from collections import Counter

import pytest

from kvs.config.ring import (
    DEFAULT_VNODES,
    RING_SIZE,
    HashRange,
    HashRing,
    key_hash,
    moved_ranges,
)

KEYS = ["key-%d" % i for i in range(10_000)]


def owners(ring: HashRing) -> dict[str, str]:
    return {k: ring.group_for(k) for k in KEYS}


# -- determinism --------------------------------------------------------------


def test_key_hash_is_a_fixed_function():
    # Computed once (also equals `printf hello | b2sum -l 64`). Fails if the
    # hash function, digest size, byte order or encoding ever changes, or if
    # Python's salted hash() sneaks in.
    assert key_hash("hello") == 0xA7B6EDA801E5347D
    assert key_hash("hello") == 12085107955937391741
    assert 0 <= key_hash("") < RING_SIZE


def test_group_order_does_not_matter():
    a = HashRing(["1", "2", "3", "4"])
    b = HashRing(["3", "1", "4", "2"])
    assert a.groups == b.groups == ("1", "2", "3", "4")
    assert a == b and hash(a) == hash(b)
    assert all(a.group_for(k) == b.group_for(k) for k in KEYS[:1000])
    assert a.ranges() == b.ranges()


def test_vnode_tokens_are_group_hash_index():
    ring = HashRing(["1", "2"], vnodes=4)
    for g in ring.groups:
        for i in range(4):
            assert ring.group_for_hash(key_hash(f"{g}#{i}")) == g


# -- balance ------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_balance(n):
    ring = HashRing([str(i) for i in range(1, n + 1)])
    counts = Counter(owners(ring).values())
    mean = len(KEYS) / n
    assert set(counts) == set(ring.groups)
    for g, c in counts.items():
        assert abs(c - mean) <= 0.10 * mean, (g, c, mean)


# -- movement -----------------------------------------------------------------


def test_adding_a_group_moves_few_keys_and_only_to_it():
    before = owners(HashRing(["1", "2", "3"]))
    after = owners(HashRing(["1", "2", "3", "4"]))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "4" for k in moved)
    assert 0.15 <= len(moved) / len(KEYS) <= 0.35


def test_removing_a_group_moves_only_its_keys():
    before = owners(HashRing(["1", "2", "3", "4"]))
    after = owners(HashRing(["1", "2", "4"]))
    for k in KEYS:
        if before[k] != "3":
            assert after[k] == before[k], k
        else:
            assert after[k] != "3"


# -- ranges -------------------------------------------------------------------


# (2, 4): the first and last tokens belong to the same group, so the arc that
# wraps around 0 must be merged with the last arc.
@pytest.mark.parametrize(
    "n, vnodes", [(1, DEFAULT_VNODES), (2, DEFAULT_VNODES), (5, DEFAULT_VNODES), (2, 4), (3, 1)]
)
def test_ranges_cover_the_ring_exactly_once(n, vnodes):
    ring = HashRing([str(i) for i in range(1, n + 1)], vnodes)
    ranges = ring.ranges()
    assert sum(r.length for r in ranges) == RING_SIZE
    assert ranges[0].contains(0)
    ends = [r.end for r in ranges]
    assert ends == sorted(ends)
    for prev, cur in zip([ranges[-1]] + ranges, ranges):
        assert prev.end == cur.start  # contiguous, no gap, no overlap
        if len(ranges) > 1:
            assert prev.group != cur.group  # adjacent same-group arcs are merged
    for k in KEYS[:2000]:
        h = key_hash(k)
        holders = [r for r in ranges if r.contains(h)]
        assert len(holders) == 1
        assert holders[0].group == ring.group_for(k)
    for g in ring.groups:
        assert ring.ranges_of(g) == [r for r in ranges if r.group == g]
    if n == 1:
        assert len(ranges) == 1 and ranges[0].length == RING_SIZE


def test_hash_range_contains():
    plain = HashRange(10, 20, "1")
    assert not plain.contains(10) and plain.contains(11) and plain.contains(20)
    assert not plain.contains(21) and plain.length == 10
    wrap = HashRange(RING_SIZE - 5, 5, "1")
    assert wrap.contains(RING_SIZE - 1) and wrap.contains(0) and wrap.contains(5)
    assert not wrap.contains(RING_SIZE - 5) and not wrap.contains(6)
    assert wrap.length == 10
    assert HashRange(7, 7, "1").contains(123) and HashRange(7, 7, "1").length == RING_SIZE


def test_edges_of_the_ring():
    ring = HashRing(["1", "2", "3"], vnodes=8)
    first, last = ring._hashes[0], ring._hashes[-1]
    assert ring.group_for_hash(0) == ring.group_for_hash(first)
    assert ring.group_for_hash(last + 1) == ring.group_for_hash(first)
    assert ring.group_for_hash(RING_SIZE - 1) == ring.group_for_hash(first)


# -- moved_ranges -------------------------------------------------------------


def test_moved_ranges_match_key_movement():
    old, new = HashRing(["1", "2", "3"]), HashRing(["1", "2", "3", "4"])
    moved = moved_ranges(old, new)
    assert moved
    for arc, src, dst in moved:
        assert src != dst and dst == "4" == arc.group
    for k in KEYS:
        h = key_hash(k)
        hits = [(src, dst) for arc, src, dst in moved if arc.contains(h)]
        assert len(hits) <= 1
        if old.group_for(k) != new.group_for(k):
            assert hits == [(old.group_for(k), new.group_for(k))], k
        else:
            assert hits == [], k
    # Merged: no two arcs that touch carry the same (old, new) pair.
    for (a, sa, da), (b, sb, db) in zip(moved, moved[1:] + moved[:1]):
        if len(moved) > 1 and a.end == b.start:
            assert (sa, da) != (sb, db)
    share = sum(arc.length for arc, _, _ in moved) / RING_SIZE
    assert 0.15 <= share <= 0.35


def test_moved_ranges_of_removal_and_replacement():
    old, new = HashRing(["1", "2", "3"]), HashRing(["1", "3"])
    for arc, src, dst in moved_ranges(old, new):
        assert src == "2" and dst in ("1", "3")
    whole = moved_ranges(HashRing(["1"]), HashRing(["2"]))
    assert len(whole) == 1
    arc, src, dst = whole[0]
    assert (src, dst, arc.length) == ("1", "2", RING_SIZE)


def test_moved_ranges_of_identical_rings_is_empty():
    ring = HashRing(["1", "2", "3"])
    assert moved_ranges(ring, ring) == []
    assert moved_ranges(ring, HashRing(["3", "2", "1"])) == []


# -- serialisation and validation --------------------------------------------


def test_dict_round_trip():
    ring = HashRing(["2", "10", "1"], vnodes=64)
    d = ring.to_dict()
    assert d == {"groups": ["1", "10", "2"], "vnodes": 64}
    again = HashRing.from_dict(d)
    assert again == ring and again.ranges() == ring.ranges()
    assert HashRing(["1"]).to_dict()["vnodes"] == DEFAULT_VNODES
    assert HashRing(["1", "2"], vnodes=64) != HashRing(["1", "2"], vnodes=65)


@pytest.mark.parametrize(
    "groups, vnodes",
    [([], DEFAULT_VNODES), ((), 8), (["1", "1"], 8), ([""], 8), (["1"], 0), (["1"], -3)],
)
def test_invalid_rings_raise_value_error(groups, vnodes):
    with pytest.raises(ValueError):
        HashRing(groups, vnodes)


def test_a_bare_string_is_not_a_group_list():
    with pytest.raises(TypeError):
        HashRing("123")


def test_rings_of_many_groups_keep_to_the_token_budget_and_lowering_vnodes_moves_few_keys():
    from kvs.config.ring import TOKEN_BUDGET, ring_vnodes
    assert ring_vnodes(3) == DEFAULT_VNODES and ring_vnodes(64) == DEFAULT_VNODES
    assert ring_vnodes(1000) * 1000 <= TOKEN_BUDGET + 64 * 1000 and ring_vnodes(10**6) == 64
    groups = [str(i) for i in range(1, 71)]
    before, after = HashRing(groups, 1024), HashRing(groups, ring_vnodes(len(groups)))
    moved = sum(r.length for r, _, _ in moved_ranges(before, after)) / RING_SIZE
    dropped = 1 - after.vnodes / before.vnodes                   # the share of tokens that go away
    assert after.vnodes < 1024 and moved < 1.25 * dropped          # about their keys, no others
