"""The shard state machine on its own: determinism, deduplication, never raising."""

import gc
import random

from kvs.fsm.shard import Deleted, Invalid, Mismatch, ShardState, Written


def random_commands(seed: int, count: int = 2000) -> list[tuple]:
    rng = random.Random(seed)
    commands = []
    for i in range(count):
        key = f"k{rng.randrange(50)}"
        request_id = f"r{rng.randrange(count)}"      # collisions on purpose: retries
        roll = rng.random()
        if roll < 0.6:
            commands.append(("put", request_id, key, f"v{i}"))
        elif roll < 0.9:
            commands.append(("delete", request_id, key))
        else:
            commands.append(("barrier",))
    return commands


def test_replicas_applying_the_same_log_reach_the_same_state():
    a, b = ShardState(dedup_capacity=300), ShardState(dedup_capacity=300)
    commands = random_commands(seed=7)
    results_a = [a.apply(c) for c in commands]
    results_b = [b.apply(c) for c in commands]
    assert results_a == results_b
    assert a.digest() == b.digest()
    assert a.snapshot() == b.snapshot()
    assert a.key_count() > 0


def test_snapshot_restore_continues_identically():
    commands = random_commands(seed=11)
    whole = ShardState(dedup_capacity=300)
    for c in commands:
        whole.apply(c)
    first, restored = ShardState(dedup_capacity=300), ShardState(dedup_capacity=300)
    for c in commands[:1000]:
        first.apply(c)
    restored.apply(("put", "junk", "junk", "junk"))      # restore must discard this
    restored.restore(first.snapshot())
    for c in commands[1000:]:
        restored.apply(c)
    assert restored.digest() == whole.digest()
    assert restored.snapshot() == whole.snapshot()


def test_a_retried_write_returns_its_first_outcome_and_is_not_applied_twice():
    s = ShardState()
    assert s.apply(("put", "id-1", "k", "v1")) == Written(replaced=False)
    assert s.apply(("put", "id-2", "k", "v2")) == Written(replaced=True)
    # id-1 retried after id-2 was applied: first outcome, and v2 must survive
    assert s.apply(("put", "id-1", "k", "v1")) == Written(replaced=False)
    assert s.get("k") == "v2"
    assert s.apply(("delete", "id-3", "k")) == Deleted(existed=True)
    assert s.apply(("delete", "id-3", "k")) == Deleted(existed=True)
    assert s.apply(("put", "id-4", "k", "v4")) == Written(replaced=False)
    assert s.apply(("delete", "id-3", "k")) == Deleted(existed=True)     # still the first outcome
    assert s.get("k") == "v4"


def test_a_request_id_reused_for_another_operation_is_refused():
    s = ShardState()
    s.apply(("put", "id-1", "k", "v1"))
    assert isinstance(s.apply(("put", "id-1", "k", "other")), Invalid)
    assert s.get("k") == "v1"


def test_the_deduplication_table_is_bounded_first_in_first_out():
    s = ShardState(dedup_capacity=10)
    for i in range(25):
        s.apply(("put", f"id-{i}", f"k{i}", "v"))
    assert [rid for rid, _ in s.dedup_rows()] == [f"id-{i}" for i in range(15, 25)]
    assert s.snapshot()["dedup-ids"] == [f"id-{i}" for i in range(15, 25)]
    # an evicted id is applied again (the bound is the price of bounded memory)
    assert s.apply(("put", "id-0", "k0", "v")) == Written(replaced=True)


def test_malformed_commands_never_raise():
    s = ShardState()
    for command in [None, (), ("nope",), ("put",), ("put", "id", "k"), ("delete",), "put", 42]:
        assert isinstance(s.apply(command), Invalid)
    assert s.key_count() == 0


# -- fencing and view changes -------------------------------------------------------------------

from kvs.fsm.shard import NotOwned  # noqa: E402
from kvs.config.ring import HashRing  # noqa: E402

OLD_RING, NEW_RING = HashRing(["1", "2"]), HashRing(["1", "2", "3"])
OLD, NEW = OLD_RING.to_dict(), NEW_RING.to_dict()


def keys_moving(source: str, destination: str, count: int) -> list[str]:
    return [k for k in (f"k{i}" for i in range(2000))
            if OLD_RING.group_for(k) == source and NEW_RING.group_for(k) == destination][:count]


def test_a_group_refuses_keys_it_does_not_own():
    s = ShardState(ownership=(1, "1", OLD))
    mine = next(k for k in (f"k{i}" for i in range(100)) if OLD_RING.group_for(k) == "1")
    other = next(k for k in (f"k{i}" for i in range(100)) if OLD_RING.group_for(k) == "2")
    assert s.apply(("put", "a", mine, "v")) == Written(False)
    assert s.apply(("put", "b", other, "v")) == NotOwned(1)
    assert s.read(other) == NotOwned(1) and s.read(mine) == "v"


def a_move(moving_count: int, staying_count: int) -> tuple[ShardState, ShardState, list[str], list[str]]:
    """Shard 1 (epoch 1) loaded with keys that move to the new shard 3 and keys that stay; shard 3, empty."""
    source, destination = ShardState(ownership=(1, "1", OLD)), ShardState(ownership=(2, "3", NEW))
    moving, staying = keys_moving("1", "3", moving_count), keys_moving("1", "1", staying_count)
    for i, k in enumerate(moving + staying):
        source.apply(("put", f"id-{i}", k, f"v-{k}"))
    return source, destination, moving, staying


def test_a_move_from_freeze_to_drop():
    source, destination, moving, staying = a_move(5, 5)
    # bulk copy while the source serves, then a write the final catch-up must carry
    items, dedup, _ = source.export("1", OLD, NEW, "3")
    destination.apply(("install", 2, "1", OLD, NEW, items, dedup, True))
    source.apply(("put", "late", moving[0], "late-value"))
    source.apply(("delete", "gone", moving[1]))
    assert source.apply(("freeze", 2, NEW)) is True
    assert source.apply(("put", "refused", moving[2], "x")) == NotOwned(2)      # moving: frozen
    assert source.apply(("put", "fine", staying[0], "y")) == Written(True)     # not moving: served
    items, dedup, _ = source.export("1", OLD, NEW, "3")
    destination.apply(("install", 2, "1", OLD, NEW, items, dedup, True))
    assert destination.read(moving[0]) == "late-value"
    assert destination.read(moving[1]) is None                                 # the delete carried over
    # the dedup slice moved too: a retry of the first write is recognised at the destination
    retried = destination.apply(("put", "id-0", moving[0], f"v-{moving[0]}"))
    assert retried == Written(False) and type(retried) is Written
    assert destination.read(moving[0]) == "late-value"
    assert source.apply(("own", 2, "1", NEW)) is True
    assert source.read(moving[0]) == NotOwned(2)
    dropped = source.apply(("drop", 2))
    assert dropped == len(moving) - 1, (dropped, source.snapshot()["data"])
    assert source.key_count() == len(staying)
    assert all(entry[1] not in moving for _, entry in source.dedup_rows())


def test_thaw_undoes_a_freeze_and_commands_are_idempotent():
    s = ShardState(ownership=(1, "1", OLD))
    k = keys_moving("1", "3", 1)[0]
    assert s.apply(("freeze", 2, NEW)) is True
    assert s.apply(("put", "a", k, "v")) == NotOwned(2)
    assert s.apply(("thaw", 2)) is True and s.apply(("thaw", 2)) is False
    assert s.apply(("put", "a", k, "v")) == Written(False)
    assert s.apply(("own", 2, "1", NEW)) is True and s.apply(("own", 2, "1", NEW)) is False
    assert s.apply(("freeze", 2, NEW)) is False          # an old epoch cannot freeze again


def test_ownership_survives_snapshot_and_restore():
    s = ShardState(ownership=(1, "1", OLD))
    s.apply(("freeze", 2, NEW))
    restored = ShardState()
    restored.restore(s.snapshot())
    k = keys_moving("1", "3", 1)[0]
    assert restored.apply(("put", "a", k, "v")) == NotOwned(2)


def test_a_tracked_move_catches_up_with_only_the_changes():
    source, destination, moving, staying = a_move(6, 3)
    assert source.apply(("track", 2, NEW)) is True and source.apply(("track", 2, NEW)) is False
    source.apply(("put", "before-copy", moving[0], "seen-by-the-copy"))
    items, dedup, number = source.export("1", OLD, NEW, "3")
    assert number == 1                                  # only the write of a moving key is numbered
    destination.apply(("install", 2, "1", OLD, NEW, items, dedup, True))
    source.apply(("put", "after-copy", moving[1], "new"))
    source.apply(("delete", "deleted", moving[2]))
    source.apply(("put", "stays", staying[0], "not tracked"))
    items, deleted, dedup, number2 = source.export_changes("1", OLD, NEW, "3", since=number)
    assert items == [(moving[1], "new", 0)] and deleted == [moving[2]] and number2 == 3
    assert sorted(rid for rid, _ in dedup) == ["after-copy", "deleted"]
    destination.apply(("install", 2, "1", OLD, NEW, items, dedup, False, deleted))
    assert source.export_changes("1", OLD, NEW, "3", since=number2)[:3] == ([], [], [])
    # the destination now holds exactly the source's moving keys, and their request ids
    expected, _, _ = source.export("1", OLD, NEW, "3")
    assert sorted((k, v, 0) for k, v in destination.snapshot()["data"].items()) == expected
    assert destination.apply(("put", "after-copy", moving[1], "new")) == Written(True)   # a retry, not re-applied


def test_tracking_survives_a_snapshot_and_ends_with_thaw_or_own():
    s = ShardState(ownership=(1, "1", OLD))
    k = keys_moving("1", "3", 1)[0]
    s.apply(("track", 2, NEW))
    s.apply(("put", "a", k, "v"))
    restored = ShardState()
    restored.restore(s.snapshot())
    assert restored.export_changes("1", OLD, NEW, "3", since=0)[0] == [(k, "v", 0)]
    assert restored.apply(("thaw", 2)) is False         # nothing was frozen, but tracking stops
    restored.apply(("put", "b", k, "w"))
    assert restored.export_changes("1", OLD, NEW, "3", since=0)[0] == []
    s.apply(("own", 2, "1", NEW))
    assert s.export_changes("1", OLD, NEW, "3", since=0)[0] == []


def test_tracking_for_a_different_ring_under_the_same_number_restarts():
    s = ShardState(ownership=(1, "1", OLD))
    s.apply(("track", 2, OLD))                          # a rolled-back change whose thaw was lost
    assert s.apply(("track", 2, NEW)) is True
    k = keys_moving("1", "3", 1)[0]
    s.apply(("put", "a", k, "v"))
    assert s.export_changes("1", OLD, NEW, "3", since=0)[0] == [(k, "v", 0)]


def test_drop_keys_forgets_only_keys_no_longer_owned():
    s = ShardState(ownership=(1, "1", OLD))
    moving, staying = keys_moving("1", "3", 4), keys_moving("1", "1", 2)
    for i, k in enumerate(moving + staying):
        s.apply(("put", f"id-{i}", k, "v"))
    assert s.apply(("drop-keys", 2, moving)) == 0       # not at epoch 2 yet: nothing goes
    s.apply(("own", 2, "1", NEW))
    assert s.apply(("drop-keys", 2, moving[:2] + staying + ["never-here"])) == 2
    assert s.apply(("drop-keys", 2, moving)) == 2 and s.apply(("drop-keys", 2, moving)) == 0
    assert s.key_count() == len(staying)


def test_an_install_that_starts_over_clears_only_after_an_unfinished_copy():
    destination = ShardState(ownership=(2, "3", NEW))
    arriving = keys_moving("1", "3", 3)
    destination.apply(("install", 2, "1", OLD, NEW, [(k, "partial") for k in arriving], [], True))
    # the coordinator died mid-copy and the next one starts the copy of the same move over
    destination.apply(("install", 2, "1", OLD, NEW, [(arriving[0], "again")], [], True))
    assert sorted(destination.snapshot()["data"].items()) == [(arriving[0], "again")]


def test_the_deduplication_table_keeps_a_digest_of_a_value_not_the_value():
    state = ShardState()
    big = "x" * (1 << 20)
    for i in range(5):
        assert state.apply(("put", f"rid-{i}", "k", big + str(i))) in (Written(False), Written(True))
    state.apply(("delete", "rid-d", "k"))
    assert state.key_count() == 0
    held = sum(len(part) for _, (fingerprint, _, _) in state.dedup_rows() for part in fingerprint)
    assert held < 1000                              # five 1 MiB values once took 5 MiB here
    # a retry is still recognised, and a different value under the same id still refused
    assert state.apply(("put", "rid-0", "k", big + "0")) == Written(False)
    assert isinstance(state.apply(("put", "rid-0", "k", big + "9")), Invalid)


def test_the_deduplication_table_keeps_a_digest_of_each_value_not_the_value():
    """Issue 11 defect 3: 50 PUTs of 1 MiB to one key, then a DELETE, left 0 keys and 50 MiB per replica
    in the deduplication table (and in every snapshot). A retry must still be recognised by its value."""
    import pickle

    s = ShardState()
    big = "é" * (1 << 19)                                    # 1 MiB of UTF-8
    for i in range(50):
        assert isinstance(s.apply(("put", f"r{i}", "k", big + str(i))), Written)
        assert isinstance(s.apply(("set-batch", f"b{i}", ((0, f"p{i}", big + str(i)),))), tuple)
    for i in range(50):
        s.apply(("delete", f"d{i}", f"p{i}"))
    assert isinstance(s.apply(("delete", "d", "k")), Deleted) and s.key_count() == 0
    assert len(pickle.dumps(s.snapshot())) < 100 * 1024           # 100 entries of a few hundred bytes each
    # the digest still tells a retry (same id, same value: the first answer) from a reused id
    assert s.apply(("put", "r0", "k", big + "0")) == Written(replaced=False, version=0)
    assert isinstance(s.apply(("put", "r0", "k", big + "other")), Invalid)


def test_remembered_outcomes_are_kept_untracked_by_the_collector_and_a_retry_gets_its_typed_outcome():
    s = ShardState()
    first = [s.apply(("put", "r1", "a", "x", None)), s.apply(("delete", "r2", "a", None)),
             s.apply(("put", "r3", "b", "y", ("match", 7)))]
    assert [type(r) for r in first] == [Written, Deleted, Mismatch]
    # CPython stops tracking a tuple once a collection finds only untracked objects in it: the inner
    # tuples at one collection, the entry that holds them at the next (a NamedTuple result, never)
    gc.collect()
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in s._dedup.values())
    again = [s.apply(("put", "r1", "a", "x", None)), s.apply(("delete", "r2", "a", None)),
             s.apply(("put", "r3", "b", "y", ("match", 7)))]
    assert again == first and [type(r) for r in again] == [Written, Deleted, Mismatch]
    assert s.read("a") is None and s.read("b") is None          # none of the retries was applied


def test_a_snapshot_in_the_older_form_of_the_table_restores_and_its_retries_are_recognised():
    s = ShardState()
    first = [s.apply(("put", "r1", "a", "x", None)), s.apply(("put", "r2", "b", "y", ("absent",)))]
    older = {k: v for k, v in s.snapshot().items() if not k.startswith("dedup-")}
    older["dedup"] = s.dedup_rows()             # (request id, (fingerprint, key, result)), as before
    restored = ShardState()
    restored.restore(older)
    assert restored.dedup_rows() == s.dedup_rows()
    assert [restored.apply(("put", "r1", "a", "x", None)),
            restored.apply(("put", "r2", "b", "y", ("absent",)))] == first
    assert restored.read_versioned("a") == ("x", 1) and restored.read_versioned("b") == ("y", 2)
