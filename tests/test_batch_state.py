"""A shard's part of a seed-004 batch in the state machine (issue 13): one command, applied all or
nothing, exactly once per pair (also after the pairs moved to another shard), bytes kept as bytes
through snapshots, the Raft codec and view-change copies."""

from __future__ import annotations

import json
import pickle

from kvs.config.ring import HashRing
from kvs.fsm.base import Invalid
from kvs.fsm.commands import Install, command_from_json, dedup_from_json, dedup_to_json
from kvs.fsm.shard import NotOwned, ShardState, Written
from kvs.raft import codec

OLD, NEW = HashRing(["1", "2"]).to_dict(), HashRing(["1", "2", "3"]).to_dict()
EVERY_BYTE = bytes(range(256))


def owned_by(ring: dict, shard: str, count: int, prefix: str = "k") -> list[str]:
    r = HashRing.from_dict(ring)
    return [k for k in (f"{prefix}{i}" for i in range(5000)) if r.group_for(k) == shard][:count]


def test_a_part_is_applied_whole_and_gives_each_pair_its_own_version():
    s = ShardState()
    result = s.apply(("set-batch", "r1", ((0, "a", "1"), (1, b"\xff\x00", EVERY_BYTE), (2, "a", b"2"))))
    assert result == (Written(False, 1), Written(False, 2), Written(True, 3))
    assert s.read_versioned("a") == (b"2", 3) and s.read_versioned(b"\xff\x00") == (EVERY_BYTE, 2)
    assert s.read_many(["a", "nope"], 1 << 20) == [(b"2", 3), None]


def test_a_part_with_one_key_the_group_does_not_own_changes_nothing():
    s = ShardState(ownership=(1, "1", OLD))
    mine, theirs = owned_by(OLD, "1", 2), owned_by(OLD, "2", 1)
    assert s.apply(("set-batch", "r", ((0, mine[0], "v"), (1, theirs[0], "v"), (2, mine[1], "v")))) == NotOwned(1)
    assert s.key_count() == 0 and s.revision == 0


def test_malformed_parts_are_refused_on_every_replica_alike():
    s = ShardState()
    for bad in ((), ((0, "k"),), ((0, "", "v"),), ((-1, "k", "v"),), ((0, 5, "v"),), ((0, "k", None),),
                ((0, "\ud800", "v"),), ((True, "k", "v"),), "not pairs", tuple((i, f"k{i}", "v") for i in range(1001))):
        assert isinstance(s.apply(("set-batch", "r", bad)), Invalid), bad
    assert isinstance(s.apply(("set-batch", 7, ((0, "k", "v"),))), Invalid)
    assert s.key_count() == 0


def test_a_retried_part_is_applied_once_per_pair_even_regrouped():
    s = ShardState()
    first = s.apply(("set-batch", "r", ((0, "a", "1"), (3, "b", "2"))))
    # the same batch again, its pairs now in two parts (a view change regrouped them): no new version
    assert s.apply(("set-batch", "r", ((3, "b", "2"),))) == (first[1],)
    assert s.apply(("set-batch", "r", ((0, "a", "1"), (5, "c", "3")))) == (first[0], Written(False, 3))
    # the same id with another value for a pair: refused whole, nothing applied
    assert isinstance(s.apply(("set-batch", "r", ((0, "a", "other"), (9, "d", "4")))), Invalid)
    assert s.read("a") == "1" and s.read("d") is None


def test_bytes_survive_a_snapshot_the_raft_codec_and_a_move_with_their_deduplication_rows():
    source, destination = ShardState(ownership=(1, "1", OLD)), ShardState(ownership=(2, "3", NEW))
    moving = [k for k in owned_by(OLD, "1", 400) if HashRing.from_dict(NEW).group_for(k) == "3"][:3]
    binary = next(k for k in (bytes([i, 0xFF]) for i in range(256))
                  if HashRing.from_dict(OLD).group_for(k) == "1" and HashRing.from_dict(NEW).group_for(k) == "3")
    pairs = tuple((i, k, EVERY_BYTE + k.encode()) for i, k in enumerate(moving)) + ((9, binary, "text"),)
    results = source.apply(("set-batch", "moved", pairs))
    assert codec.loads(pickle.dumps(source.snapshot(), protocol=2)) == source.snapshot()
    restored = ShardState()
    restored.restore(codec.loads(pickle.dumps(source.snapshot(), protocol=2)))
    assert restored.digest() == source.digest()
    items, dedup, _ = source.export("1", OLD, NEW, "3")
    wire = json.loads(json.dumps(Install(2, "1", OLD, NEW, items, dedup, True).to_json()))
    install = command_from_json(wire)
    assert sorted(install.items, key=repr) == sorted(items, key=repr) and dedup_from_json(dedup_to_json(dedup)) == dedup
    destination.apply(install.as_entry())
    assert destination.read_versioned(binary) == ("text", results[-1].version)
    assert destination.read_versioned(moving[0]) == (EVERY_BYTE + moving[0].encode(), results[0].version)
    # the batch retried at the destination: the rows moved with the keys, nothing applied again
    again = destination.apply(("set-batch", "moved", pairs))
    assert again == results and all(type(r) is Written for r in again)


def test_the_digest_tells_types_and_boundaries_apart():
    def digest(*pairs) -> str:
        s = ShardState()
        s.apply(("set-batch", "r", tuple((i, k, v) for i, (k, v) in enumerate(pairs))))
        return s.digest()

    assert digest(("k", "bX")) != digest((b"k", "X"))
    assert digest(("x\0b", "v")) != digest((b"x", "v"))
    assert digest(("k", "v")) != digest((b"k", "v")) != digest(("k", b"v"))
    assert digest(("ab", "c")) != digest(("a", "bc"))


def test_reads_of_many_keys_stop_at_their_byte_budget_and_a_listing_page_refuses_a_moving_key():
    from kvs.fsm.batch import SKIPPED

    s = ShardState(ownership=(1, "1", OLD))
    keys = owned_by(OLD, "1", 6)
    s.apply(("set-batch", "r", tuple((i, k, "x" * 100) for i, k in enumerate(keys))))
    assert s.read_many(keys, 250) == [("x" * 100, 1), ("x" * 100, 2), ("x" * 100, 3), SKIPPED, SKIPPED, SKIPPED]
    rows, last = s.rows(keys, 250)
    assert [k for k, _ in rows] == keys[:3] and last == keys[2]
    moving = next(k for k in keys if HashRing.from_dict(NEW).group_for(k) != "1")
    s.apply(("freeze", 2, NEW))
    assert s.rows(keys, 10_000) == (NotOwned(2), None)
    assert NotOwned(2) in s.read_many(keys, 10_000) and moving in keys


def test_a_consistent_copy_is_taken_between_writes_or_not_at_all():
    s = ShardState(ownership=(1, "1", OLD))
    mine = owned_by(OLD, "1", 3)
    s.apply(("set-batch", "r", tuple((i, k, f"v{i}") for i, k in enumerate(mine))))
    assert sorted(s.consistent_rows()) == sorted((k, f"v{i}", i + 1) for i, k in enumerate(mine))
    s._writes += 1                  # a write that never ends: no moment between two writes
    assert s.consistent_rows(attempts=5) is None
