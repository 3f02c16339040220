import json
import random
from dataclasses import replace

import pytest

from kvs.testing.linearizability import (
    FAIL,
    OK,
    UNKNOWN,
    CheckResult,
    Operation,
    check_history,
    check_key,
    history_from_json,
    history_to_json,
)

K = "k"


def put(client, value, call, ret, result=None, outcome=OK, key=K):
    return Operation(client, "put", key, value, call, ret, outcome, result)


def get(client, result, call, ret, outcome=OK, key=K):
    return Operation(client, "get", key, None, call, ret, outcome, result)


def delete(client, result, call, ret, outcome=OK, key=K):
    return Operation(client, "delete", key, None, call, ret, outcome, result)


def cas(client, expected, value, call, ret, result=None, outcome=OK, key=K):
    return Operation(client, "cas", key, value, call, ret, outcome, result, expected)


def assert_ok(ops):
    res = check_key(ops)
    assert res.ok, res.explanation
    assert not res.timed_out


def assert_violation(ops):
    res = check_key(ops)
    assert not res.ok
    assert not res.timed_out
    return res


# --- basics -----------------------------------------------------------------

def test_empty_history_accepted():
    assert check_key([]).ok
    result = check_history([])
    assert result.ok and result.keys == [] and result.failures() == []


def test_sequential_valid_history_accepted():
    ops = [
        get("a", None, 0, 1),
        put("a", "x", 2, 3, result=False),
        get("b", "x", 4, 5),
        put("b", "y", 6, 7, result=True),
        get("a", "y", 8, 9),
        delete("a", True, 10, 11),
        get("b", None, 12, 13),
        delete("b", False, 14, 15),
    ]
    assert_ok(ops)


def test_concurrent_overlapping_puts_read_either_value():
    for seen in ("a", "b"):
        ops = [
            put("c0", "z", -2, -1, result=False),
            put("c1", "a", 0, 10, result=True),
            put("c2", "b", 1, 9, result=True),
            get("c3", seen, 11, 12),
        ]
        assert_ok(ops)
    # a put whose flag was not recorded (result None) is not checked
    assert_ok([put("c1", "a", 0, 10), put("c2", "b", 1, 9, result=False), get("c3", "a", 11, 12)])
    # ...but a recorded flag is: both cannot have created the key
    assert_violation([put("c1", "a", 0, 10, result=False), put("c2", "b", 1, 9, result=False)])


def test_read_during_puts_may_see_either_but_not_after_both_fixed():
    # c3 reads a then c4 reads b then c5 reads a: impossible with two writes
    ops = [
        put("c1", "a", 0, 10),
        put("c2", "b", 0, 10),
        get("c3", "a", 1, 2),
        get("c4", "b", 3, 4),
        get("c5", "a", 5, 6),
    ]
    assert_violation(ops)


# --- violations -------------------------------------------------------------

def test_stale_read_rejected_and_explanation_mentions_key():
    ops = [
        put("c1", "a", 0, 1, result=False, key="user:42"),
        put("c1", "b", 2, 3, result=True, key="user:42"),
        get("c2", "a", 4, 5, key="user:42"),
    ]
    res = check_key(ops)
    assert not res.ok and not res.timed_out
    assert "user:42" in res.explanation
    assert "get" in res.explanation


def test_read_of_value_never_written_rejected():
    ops = [put("c1", "a", 0, 1, result=False), get("c2", "zzz", 2, 3)]
    assert_violation(ops)


def test_read_after_completed_delete():
    base = [put("c1", "a", 0, 1, result=False), delete("c1", True, 2, 3)]
    assert_violation(base + [get("c2", "a", 4, 5)])
    assert_ok(base + [get("c2", None, 4, 5)])


def test_put_result_flags_checked():
    first = put("c1", "a", 0, 1, result=False)
    assert_violation([first, put("c2", "b", 2, 3, result=False)])
    assert_ok([first, put("c2", "b", 2, 3, result=True)])
    # creating a fresh key cannot report "replaced"
    assert_violation([put("c1", "a", 0, 1, result=True)])


def test_delete_result_flags_checked():
    assert_violation([delete("c1", True, 0, 1)])
    assert_ok([delete("c1", False, 0, 1)])
    assert_violation([put("c1", "a", 0, 1, result=False), delete("c2", False, 2, 3)])


def test_equal_times_mean_happened_before():
    # put returns at t=1, get is called at t=1: the put precedes the get
    assert_violation([put("c1", "a", 0, 1, result=False), get("c2", None, 1, 2)])
    assert_ok([put("c1", "a", 0, 1.5, result=False), get("c2", None, 1, 2)])


# --- unknown and failed operations ------------------------------------------

def test_unknown_put_may_take_effect_later():
    unknown = put("c1", "x", 1, None, outcome=UNKNOWN)
    assert_ok([unknown, get("c2", None, 2, 3), get("c2", "x", 10, 11)])
    assert_ok([unknown, get("c2", None, 2, 3), get("c2", None, 10, 11)])


def test_unknown_put_cannot_take_effect_before_its_call():
    ops = [get("c2", "x", 0, 0.5), put("c1", "x", 1, None, outcome=UNKNOWN)]
    assert_violation(ops)


def test_unknown_put_effect_is_permanent_once_seen():
    ops = [
        put("c0", "a", 0, 0.5, result=False),
        put("c1", "x", 1, None, outcome=UNKNOWN),
        get("c2", "x", 2, 3),
        get("c2", "a", 4, 5),  # x took effect once; a cannot come back
    ]
    assert_violation(ops)


def test_unknown_ret_time_is_ignored():
    # a recorded ret on an unknown op does not bound its effect
    assert_ok([put("c1", "x", 1, 2, outcome=UNKNOWN), get("c2", "x", 10, 11)])


def test_failed_ops_ignored():
    ops = [put("c1", "x", 0, 1, outcome=FAIL), get("c2", "x", 2, 3)]
    assert_violation(ops)
    assert_ok([put("c1", "x", 0, 1, outcome=FAIL), get("c2", None, 2, 3)])


def test_unknown_get_is_dropped():
    assert_ok([get("c1", "nonsense", 0, None, outcome=UNKNOWN)])


def test_invalid_operations_raise():
    with pytest.raises(ValueError):
        check_key([put("c1", "a", 0, None)])  # ok but no return time
    with pytest.raises(ValueError):
        check_key([Operation("c1", "incr", K, "a", 0, 1, OK)])
    with pytest.raises(ValueError):
        check_key([cas("c1", "a", None, 0, 1, True)])      # a cas writes a value
    with pytest.raises(ValueError):
        check_key([put("c1", "a", 0, 1, key="x"), put("c1", "a", 0, 1, key="y")])


# --- compare-and-set -----------------------------------------------------------

def test_a_sequence_of_compare_and_sets_is_accepted():
    assert_ok([cas("a", None, "0", 0, 1, True), cas("b", None, "x", 2, 3, False), get("b", "0", 4, 5),
               cas("a", "0", "1", 6, 7, True), cas("b", "0", "2", 8, 9, False), get("a", "1", 10, 11)])


def test_two_compare_and_sets_from_the_same_value_cannot_both_apply():
    assert_violation([put("w", "0", 0, 1), cas("a", "0", "1", 2, 5, True), cas("b", "0", "2", 3, 6, True)])


def test_a_failed_compare_and_set_while_the_value_matched_is_a_violation():
    assert_violation([put("w", "0", 0, 1), cas("a", "0", "1", 2, 3, False), get("b", "0", 4, 5)])


def test_a_failed_compare_and_set_between_a_write_and_its_read_is_no_violation():
    assert_ok([put("w", "0", 0, 1), cas("a", "7", "1", 2, 3, False), get("b", "0", 4, 5)])


def test_a_compare_and_set_may_read_a_value_only_it_observed_and_a_timed_out_one_may_have_applied():
    # "1" is never returned by a get: only the cas that expects it observed it
    assert_ok([put("w", "0", 0, 1), cas("a", "0", "1", 2, 3, True), cas("a", "1", "2", 4, 5, True),
               cas("b", "2", "3", 6, None, outcome=UNKNOWN), cas("c", "3", "4", 7, 8, True), get("c", "4", 9, 10)])
    assert_violation([put("w", "0", 0, 1), cas("a", "0", "1", 2, 3, True), put("x", "q", 4, 5),
                      cas("a", "1", "2", 6, 7, True)])


def test_a_counter_of_compare_and_sets_under_concurrency_is_checked():
    rng, ops, value, t = random.Random(7), [], 0, 0.0
    for i in range(200):
        client = f"c{i % 8}"
        call, ret = t, t + rng.uniform(0.5, 2)
        if rng.random() < 0.5:       # a winner: the value moves on
            ops.append(cas(client, str(value), str(value + 1), call, ret, True))
            value += 1
        else:                        # a loser that read an older value
            ops.append(cas(client, str(max(0, value - 1)) if value else "x", "lost", call, ret, False))
        t = ret + 0.01
    assert_ok([put("init", "0", -2, -1)] + ops)
    # the same history with one loser claiming to have won
    loser = next(i for i, op in enumerate(ops) if op.result is False and op.expected != "x")
    broken = ops[:loser] + [replace(ops[loser], result=True, value="won")] + ops[loser + 1:]
    assert_violation([put("init", "0", -2, -1)] + broken)


# --- multi-key API ------------------------------------------------------------

def test_check_history_is_per_key():
    ops = [
        put("c1", "a", 0, 1, result=False, key="good"),
        get("c2", "a", 2, 3, key="good"),
        put("c1", "a", 0, 1, result=False, key="bad"),
        get("c2", "b", 2, 3, key="bad"),
        get("c2", "a", 2, 3, outcome=FAIL, key="bad"),
    ]
    result = check_history(ops)
    assert isinstance(result, CheckResult)
    assert not result.ok
    assert [k.key for k in result.failures()] == ["bad"]
    assert {k.key: k.operations for k in result.keys} == {"bad": 3, "good": 2}
    summary = result.summary()
    assert "2 keys" in summary and "5 operations" in summary and "1 violations" in summary
    assert check_key(ops, key="good").ok


# --- randomized -------------------------------------------------------------

def simulate(seed, clients, ops_per_client, keys, unknown_rate=0.03, fail_rate=0.03):
    """Linearizable history from a real register with random overlapping intervals."""
    rng = random.Random(seed)
    planned = []  # (linearization point or None, client, kind, key, value, call, ret, outcome)
    counter = 0
    for c in range(clients):
        t = rng.uniform(0, 0.01)
        for _ in range(ops_per_client):
            call = t + rng.expovariate(1000)
            ret = call + rng.expovariate(200)
            kind = rng.choices(["put", "get", "delete"], [4, 5, 1])[0]
            counter += 1
            value = f"v{counter}" if kind == "put" else None
            roll = rng.random()
            outcome = UNKNOWN if roll < unknown_rate else FAIL if roll < unknown_rate + fail_rate else OK
            point = rng.uniform(call, ret)
            if outcome == FAIL or (outcome == UNKNOWN and rng.random() < 0.5):
                point = None  # never took effect
            elif outcome == UNKNOWN:
                point = call + rng.expovariate(50)  # may land far after the timeout
            planned.append((point, f"c{c}", kind, rng.choice(keys), value, call, ret, outcome))
            t = ret
    register: dict[str, str | None] = {}
    ops = []
    effective = sorted((p for p in planned if p[0] is not None), key=lambda p: p[0])
    for point, client, kind, key, value, call, ret, outcome in effective:
        before = register.get(key)
        if kind == "get":
            result = before
        else:
            result = before is not None
            register[key] = value if kind == "put" else None
        ops.append(Operation(client, kind, key, value, call,
                             ret if outcome == OK else None, outcome, result))
    for point, client, kind, key, value, call, ret, outcome in planned:
        if point is None:
            ops.append(Operation(client, kind, key, value, call,
                                 ret if outcome == FAIL else None, outcome, None))
    rng.shuffle(ops)
    return ops


def stale_read_corruption(ops):
    """Make a get that starts after two sequential completed puts return the older value."""
    done = [op for op in ops if op.outcome == OK]
    puts = sorted((op for op in done if op.kind == "put"), key=lambda op: op.call)
    gets = [op for op in done if op.kind == "get"]
    for older in puts:
        for newer in puts:
            if newer.key != older.key or newer.call <= older.ret:
                continue
            for g in gets:
                if g.key == older.key and g.call > newer.ret:
                    return older, newer, g
    raise AssertionError("no corruptible triple in the generated history")


def created_flag_corruption(ops):
    """A put that reported "replaced" although no delete can fall between it and an
    earlier completed put; claiming "created" instead needs an absent key there."""
    done_puts = [op for op in ops if op.outcome == OK and op.kind == "put"]
    deletes = [op for op in ops if op.kind == "delete" and op.outcome != FAIL]
    for p in sorted(done_puts, key=lambda op: op.call):
        for q in done_puts:
            if p.result is True and q.key == p.key and q.ret < p.call and not any(
                    d.key == p.key and d.call < p.ret and (d.outcome == UNKNOWN or d.ret > q.call)
                    for d in deletes):
                return p
    raise AssertionError("no corruptible put in the generated history")


def assert_single_violation(ops, key):
    result = check_history(ops)
    assert not result.ok
    assert [k.key for k in result.failures()] == [key]
    assert not result.failures()[0].timed_out
    assert repr(key) in result.failures()[0].explanation


@pytest.mark.parametrize("seed", range(5))
def test_randomized_history_accepted_then_corruption_rejected(seed):
    ops = simulate(seed, clients=8, ops_per_client=40, keys=["a", "b", "c"])
    assert len(ops) >= 200
    result = check_history(ops)
    assert result.ok, [k.explanation for k in result.failures()]

    older, newer, victim = stale_read_corruption(ops)
    assert_single_violation(
        [replace(op, result=older.value) if op is victim else op for op in ops], victim.key)

    # a corrupted flag is invisible to the read/write pre-check: only the search sees it
    victim = created_flag_corruption(ops)
    assert_single_violation(
        [replace(op, result=False) if op is victim else op for op in ops], victim.key)


@pytest.mark.parametrize("unknown_rate", [0.002, 0.05])
def test_performance_sanity_single_key_16_clients(unknown_rate):
    ops = simulate(99, clients=16, ops_per_client=94, keys=["hot"], unknown_rate=unknown_rate)
    assert len(ops) >= 1400
    res = check_key(ops)
    assert not res.timed_out, res.explanation
    assert res.ok, res.explanation


def test_gross_violation_among_many_unknown_ops_is_decided():
    # the search alone would have to exhaust every way the ~70 unknown ops before
    # the bad read could have taken effect; the pre-check proves it at once
    ops = simulate(1, clients=16, ops_per_client=94, keys=["hot"], unknown_rate=0.05)
    by_call = sorted(ops, key=lambda op: op.call)
    writer = next(op for op in by_call[len(by_call) * 2 // 3:] if op.kind == "put" and op.outcome == OK)
    reader = next(op for op in reversed(by_call) if op.kind == "get" and op.outcome == OK)
    res = check_key([replace(op, result=writer.value) if op is reader else op for op in ops],
                    budget_seconds=2.0)
    assert not res.ok and not res.timed_out, res.explanation
    assert repr(writer.value) in res.explanation


def test_budget_exhaustion_reports_timeout():
    ops = simulate(7, clients=16, ops_per_client=94, keys=["hot"], unknown_rate=0.002)
    res = check_key(ops, budget_seconds=-1.0)
    assert res.timed_out and not res.ok
    assert not check_history(ops, budget_seconds_per_key=-1.0).ok


# --- JSON -------------------------------------------------------------------

def test_json_round_trip():
    ops = simulate(3, clients=4, ops_per_client=20, keys=["a", "b"])
    ops.append(put("c9", "inf", 5, float("inf"), outcome=UNKNOWN))
    text = json.dumps(history_to_json(ops), allow_nan=False)
    back = history_from_json(json.loads(text))
    expected = [replace(op, ret=None) if op.ret == float("inf") else op for op in ops]
    assert back == expected
    assert any(op.ret is None for op in back)
    assert check_history(back).ok == check_history(ops).ok
