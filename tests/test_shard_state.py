"""The shard state machine on its own: determinism, deduplication, never raising."""

import random

from kvs.raft.shard_state import Deleted, Invalid, ShardState, Written


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
    snapshot = s.snapshot()
    assert [rid for rid, _ in snapshot["dedup"]] == [f"id-{i}" for i in range(15, 25)]
    # an evicted id is applied again (the bound is the price of bounded memory)
    assert s.apply(("put", "id-0", "k0", "v")) == Written(replaced=True)


def test_malformed_commands_never_raise():
    s = ShardState()
    for command in [None, (), ("nope",), ("put",), ("put", "id", "k"), ("delete",), "put", 42]:
        assert isinstance(s.apply(command), Invalid)
    assert s.key_count() == 0
