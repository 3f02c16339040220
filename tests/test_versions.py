"""Versions and compare-and-set in the shard state machine (issue 13): every write gives its key the
next number of the shard's revision counter; a conditional write is applied atomically in the log or
not at all, and is exactly-once under retries like any write."""

from __future__ import annotations

import pickle
import sys
import threading

from kvs.config.ring import HashRing
from kvs.fsm.base import Invalid
from kvs.fsm.commands import dedup_from_json, dedup_to_json
from kvs.fsm.shard import Deleted, Mismatch, ShardState, Written
from kvs.raft import codec

OLD, NEW = HashRing(["1", "2"]).to_dict(), HashRing(["1", "2", "3"]).to_dict()


def test_every_write_takes_the_next_version_of_the_shard_and_a_read_returns_it():
    s = ShardState()
    assert s.apply(("put", "r1", "a", "x", None)) == Written(False, 1)
    assert s.apply(("put", "r2", "b", "y", None)) == Written(False, 2)
    assert s.apply(("put", "r3", "a", "z", None)) == Written(True, 3)
    assert s.read_versioned("a") == ("z", 3) and s.read_versioned("b") == ("y", 2)
    assert s.read_versioned("missing") is None


def test_a_key_deleted_and_created_again_never_gets_an_old_version_back():
    s = ShardState()
    s.apply(("put", "r1", "k", "first", None))
    s.apply(("delete", "r2", "k", None))
    assert s.apply(("put", "r3", "k", "second", None)) == Written(False, 2)
    # a client holding version 1 from before the delete cannot overwrite the new key
    assert s.apply(("put", "r4", "k", "stale", ("match", 1))) == Mismatch(2, True)
    assert s.read_versioned("k") == ("second", 2)


def test_a_conditional_write_applies_only_when_its_condition_holds():
    s = ShardState()
    assert s.apply(("put", "r1", "k", "v1", ("absent",))) == Written(False, 1)        # create-only
    assert s.apply(("put", "r2", "k", "again", ("absent",))) == Mismatch(1, True)
    assert s.apply(("put", "r3", "k", "v2", ("match", 1))) == Written(True, 2)
    assert s.apply(("put", "r4", "k", "lost", ("match", 1))) == Mismatch(2, True)
    assert s.apply(("put", "r5", "other", "x", ("exists",))) == Mismatch(0)
    assert s.apply(("put", "r6", "k", "v3", ("exists",))) == Written(True, 3)
    assert s.apply(("delete", "r7", "k", ("match", 2))) == Mismatch(3, True)
    assert s.read_versioned("k") == ("v3", 3) and s.read_versioned("other") is None
    assert s.apply(("delete", "r8", "k", ("match", 3))) == Deleted(True)
    assert s.apply(("delete", "r9", "k", ("match", 3))) == Mismatch(0)
    assert s.key_count() == 0


def test_a_retried_compare_and_set_returns_its_first_outcome_and_is_applied_once():
    s = ShardState()
    s.apply(("put", "r1", "k", "0", None))
    assert s.apply(("put", "cas", "k", "1", ("match", 1))) == Written(True, 2)
    s.apply(("put", "r3", "k", "other", None))                          # version 3 now
    # the retry (same request id) does not fail on the new version, nor write again
    assert s.apply(("put", "cas", "k", "1", ("match", 1))) == Written(True, 2)
    assert s.read_versioned("k") == ("other", 3)
    assert s.apply(("put", "lost", "k", "x", ("match", 2))) == Mismatch(3, True)
    s.apply(("put", "r5", "k", "y", None))
    assert s.apply(("put", "lost", "k", "x", ("match", 2))) == Mismatch(3, True)       # remembered as it was
    # the same id with another condition is another operation: refused
    assert isinstance(s.apply(("put", "cas", "k", "1", ("match", 4))), Invalid)


def test_malformed_conditions_are_refused_and_change_nothing():
    s = ShardState()
    s.apply(("put", "r1", "k", "v", None))
    for i, condition in enumerate([("match",), ("match", "1"), ("match", True), ("absent", 1), ("maybe",), (),
                                   ["match", 1], "absent", 7]):
        assert isinstance(s.apply(("put", f"bad-{i}", "k", "w", condition)), Invalid), condition
        assert isinstance(s.apply(("delete", f"bad-d{i}", "k", condition)), Invalid), condition
    assert s.read_versioned("k") == ("v", 1)
    assert s.apply(("put", "r2", "k", "w", None)) == Written(True, 2)       # the counter did not move


def test_versions_survive_a_snapshot_and_a_move_and_stay_increasing_where_the_key_lands():
    ring_old, ring_new = HashRing.from_dict(OLD), HashRing.from_dict(NEW)
    moving = [k for k in (f"k{i}" for i in range(500))
              if ring_old.group_for(k) == "1" and ring_new.group_for(k) == "3"][:3]
    source, destination = ShardState(ownership=(1, "1", OLD)), ShardState(ownership=(2, "3", NEW))
    for i in range(40):
        source.apply(("put", f"r{i}", moving[i % 3], f"v{i}", None))
    restored = ShardState()
    restored.restore(source.snapshot())
    assert restored.read_versioned(moving[0]) == source.read_versioned(moving[0]) == ("v39", 40)
    assert restored.apply(("put", "after", moving[1], "w", None)) == Written(True, 41)
    items, dedup, _ = source.export("1", OLD, NEW, "3")
    assert sorted(items) == sorted((k, *source.read_versioned(k)) for k in moving)
    destination.apply(("install", 2, "1", OLD, NEW, items, dedup, True))
    assert destination.read_versioned(moving[0]) == ("v39", 40)
    # a compare-and-set against the version read before the move still works after it
    assert destination.apply(("put", "cas", moving[0], "moved", ("match", 40))) == Written(True, 41)
    fresh = next(k for k in (f"n{i}" for i in range(500)) if ring_new.group_for(k) == "3")
    assert destination.apply(("put", "new", fresh, "x", None)) == Written(False, 42)      # past every moved version


def test_versions_and_mismatches_travel_with_the_deduplication_table():
    s = ShardState()
    s.apply(("put", "w", "k", "v", ("absent",)))
    s.apply(("put", "m", "k", "v2", ("match", 9)))
    s.apply(("delete", "d", "k", None))
    rows = s.dedup_rows()
    assert dedup_from_json(dedup_to_json(rows)) == rows
    assert [entry[2] for _, entry in rows] == [Written(False, 1), Mismatch(1, True), Deleted(True)]
    assert codec.loads(pickle.dumps(s.snapshot(), protocol=2)) == s.snapshot()      # a 412 in a snapshot


def test_writes_in_the_older_log_format_give_no_version_on_any_replica():
    # ("put", id, key, value) without the condition slot is what kvs logged before versions: a replica
    # that replays such entries and one that restored a snapshot taken after them agree (version 0)
    s = ShardState()
    assert s.apply(("put", "old", "k", "v")) == Written(False, 0)
    assert s.read_versioned("k") == ("v", 0) and s.revision == 0
    assert s.apply(("put", "r1", "k", "v", ("absent",))) == Mismatch(0, True)        # it exists, unversioned
    assert s.apply(("put", "r2", "k", "w", ("match", 0))) == Written(True, 1)
    assert s.apply(("delete", "old-d", "k")) == Deleted(True) and s.read_versioned("k") is None


def test_a_key_deleted_before_a_move_never_gets_its_old_version_at_the_destination():
    ring_old, ring_new = HashRing.from_dict(OLD), HashRing.from_dict(NEW)
    key = next(k for k in (f"k{i}" for i in range(500))
               if ring_old.group_for(k) == "1" and ring_new.group_for(k) == "3")
    source, destination = ShardState(ownership=(1, "1", OLD)), ShardState(ownership=(2, "3", NEW))
    for i in range(3):
        source.apply(("put", f"r{i}", key, f"v{i}", None))          # version 3
    source.apply(("delete", "gone", key, None))
    items, dedup, _ = source.export("1", OLD, NEW, "3")
    assert items == []
    destination.apply(("install", 2, "1", OLD, NEW, items, dedup, True, [], source.revision))
    destination.apply(("own", 2, "3", NEW))
    assert destination.apply(("put", "again", key, "new", None)) == Written(False, 4)
    assert destination.apply(("put", "stale", key, "x", ("match", 3))) == Mismatch(4, True)


def test_a_read_never_pairs_a_value_with_another_write_s_version():
    s, stop, torn = ShardState(), threading.Event(), []
    s.apply(("put", "r0", "k", "1", None))                         # each value names its own version

    def reader() -> None:
        while not stop.is_set():
            value, version = s.read_versioned("k")
            if value != str(version):
                torn.append((value, version))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                 # switch threads as often as possible
    try:
        thread = threading.Thread(target=reader)
        thread.start()
        for i in range(2, 30000):
            s.apply(("put", f"r{i}", "k", str(i), None))
        stop.set()
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not torn, f"{len(torn)} torn reads, e.g. {torn[:3]}"
