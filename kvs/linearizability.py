"""Linearizability checker for key-value store histories (WGL with per-key decomposition).

A history is linearizable when every operation can be given a single instant
between its invocation and its response such that, replayed in that order
against a sequential register, every operation returns what the client really
saw. Deciding this is NP-complete in general, so we use the Wing & Gong search
as refined by Lowe: walk the time-ordered list of call/return events, try to
"linearize" any operation whose call is reachable before the first pending
return (i.e. an operation that is minimal in the real-time order), and back
off when we reach a return event whose operation has not been placed yet. The
events live in a doubly linked list so that placing an operation (lift) and
undoing it (unlift) are O(1); the search is iterative so long histories never
hit Python's recursion limit.

Two things keep the search cheap. First, P-compositionality (Horn & Kroening):
linearizability is local, so a multi-key history is linearizable iff each
per-key sub-history is; checking keys separately turns one huge search into
many small ones. Second, Lowe's cache: the future of the search depends only on
*which* operations are already placed (a bitset, stored as a Python int) and
the register value, so each (bitset, value) pair is explored at most once.
With unique put values the reads pin the order down and the search is close to
linear in the common case.

Operations whose outcome is unknown (client timeout) may have taken effect at
any instant after their call, or never. We model them as having no return
event (return time +infinity): they are candidates whenever they are minimal,
may be placed with any result (nobody observed it), and the history is
accepted once every *ok* operation is placed, so unknown ones may stay out.
An unknown get has no effect and is dropped; failed operations are dropped.
Events at equal times are ordered return-before-call: an operation that
returned at t precedes one invoked at t.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

OK = "ok"
FAIL = "fail"
UNKNOWN = "unknown"

_KINDS = ("put", "get", "delete")
_OUTCOMES = (OK, FAIL, UNKNOWN)
_ANY = object()  # sentinel: result not observed, any result is acceptable
_UNREAD = object()  # stands for every put value that no completed get ever returned
_GET, _PUT, _DELETE = 0, 1, 2
_KIND_CODES = {"get": _GET, "put": _PUT, "delete": _DELETE}


@dataclass(frozen=True)
class Operation:
    client: str  # who issued it
    kind: str  # "put" | "get" | "delete"
    key: str
    value: str | None  # put: the value written; get/delete: None
    call: float  # invocation time (seconds, monotonic)
    ret: float | None  # response time; None when the outcome is unknown
    outcome: str  # "ok" | "fail" | "unknown"
    result: object = None  # get: value read or None; put/delete: whether a value existed


@dataclass
class KeyResult:
    key: str
    ok: bool
    operations: int
    explanation: str
    timed_out: bool = False


@dataclass
class CheckResult:
    ok: bool
    keys: list[KeyResult] = field(default_factory=list)

    def failures(self) -> list[KeyResult]:
        return [k for k in self.keys if not k.ok]

    def summary(self) -> str:
        operations = sum(k.operations for k in self.keys)
        timeouts = sum(1 for k in self.keys if k.timed_out)
        violations = sum(1 for k in self.keys if not k.ok and not k.timed_out)
        verdict = "linearizable" if self.ok else "NOT linearizable"
        return (f"{verdict}: {len(self.keys)} keys checked, {operations} operations, "
                f"{violations} violations, {timeouts} timeouts")


def describe(op: Operation) -> str:
    """Short human-readable form of one operation."""
    arg = repr(op.value) if op.kind == "put" else ""
    ret = "?" if op.outcome != OK or op.ret is None else f"{op.ret:.6f}"
    res = f" -> {op.result!r}" if op.outcome == OK else f" ({op.outcome})"
    return f"{op.client}: {op.kind}({op.key!r}{', ' + arg if arg else ''}){res} [{op.call:.6f}, {ret}]"


def _validate(op: Operation) -> None:
    if op.kind not in _KINDS:
        raise ValueError(f"unknown operation kind {op.kind!r}: {op}")
    if op.outcome not in _OUTCOMES:
        raise ValueError(f"unknown outcome {op.outcome!r}: {op}")
    if op.kind == "put" and op.value is None:
        raise ValueError(f"put without a value: {op}")
    if op.outcome == OK:
        if op.ret is None:
            raise ValueError(f"ok operation without a return time: {op}")
        if op.ret < op.call:
            raise ValueError(f"operation returns before it is called: {op}")


def _relevant(op: Operation) -> bool:
    """Failed ops never took effect; an unknown get has no effect either."""
    if op.outcome == FAIL:
        return False
    return not (op.outcome == UNKNOWN and op.kind == "get")


def _expected_result(op: Operation) -> object:
    if op.outcome != OK:
        return _ANY
    if op.kind == "get":
        return op.result
    if op.result is None:
        return _ANY  # put/delete whose "existed" flag was not recorded
    return bool(op.result)


@dataclass
class _Entries:
    """Call/return events in time order, as arrays forming a doubly linked list."""
    op_of: list[int]  # entry -> operation index
    is_call: list[bool]
    return_of: list[int]  # call entry -> its return entry, or -1 (unknown op)
    nxt: list[int]
    prev: list[int]
    head: int
    tail: int

    def lift(self, call_entry: int) -> None:
        """Unlink a call entry and its return entry (the op is now placed)."""
        nxt, prev = self.nxt, self.prev
        for e in (call_entry, self.return_of[call_entry]):
            if e >= 0:
                nxt[prev[e]], prev[nxt[e]] = nxt[e], prev[e]

    def unlift(self, call_entry: int) -> None:
        """Relink in reverse order of removal: each entry still knows its neighbours."""
        nxt, prev = self.nxt, self.prev
        for e in (self.return_of[call_entry], call_entry):
            if e >= 0:
                nxt[prev[e]] = prev[nxt[e]] = e


def _build_entries(ops: list[Operation]) -> _Entries:
    # At equal times returns sort before calls (ret == call means happened-before),
    # except that an instantaneous op's call must precede its own return; such
    # ops sit between the two groups, so those sharing a timestamp overlap.
    events: list[tuple[float, int, int]] = []  # (time, rank, op index)
    for i, op in enumerate(ops):
        instantaneous = op.outcome == OK and op.ret == op.call
        events.append((op.call, 1 if instantaneous else 3, i))
        if op.outcome == OK:
            events.append((op.ret, 2 if instantaneous else 0, i))  # type: ignore[arg-type]
    events.sort()
    n = len(events)
    head, tail = n, n + 1
    op_of = [e[2] for e in events] + [-1, -1]
    is_call = [e[1] in (1, 3) for e in events] + [False, False]
    return_of = [-1] * (n + 2)
    call_entry = {}
    for idx, (_, _, i) in enumerate(events):
        if is_call[idx]:
            call_entry[i] = idx
        else:
            return_of[call_entry[i]] = idx
    nxt, prev = [-1] * (n + 2), [-1] * (n + 2)
    order = [head, *range(n), tail]
    for before, after in zip(order, order[1:]):
        nxt[before], prev[after] = after, before
    return _Entries(op_of, is_call, return_of, nxt, prev, head, tail)


def _explain_failure(key: str, ops: list[Operation], prefix: list[int],
                     blocked: int, state: object, ok_total: int) -> str:
    placed = [ops[i] for i in prefix]
    placed_ok = sum(1 for op in placed if op.outcome == OK)
    shown = "a value no get returned" if state is _UNREAD else repr(state)
    tail = "; ".join(describe(op) for op in placed[-3:]) or "nothing"
    return (f"key {key!r} is not linearizable: longest linearizable prefix places "
            f"{len(placed)} ops ({placed_ok} of {ok_total} completed ops), ending with "
            f"[{tail}]; register then holds {shown} and "
            f"{describe(ops[blocked])} cannot be placed")


def _search(key: str, ops: list[Operation], deadline: float) -> tuple[bool, bool, str]:
    """WGL search on one key. Returns (linearizable, timed_out, explanation).

    Pruning beyond the cache: some completed ops can never change the register
    (a get, a delete that reported the key absent). When such an op is minimal and
    legal now, it can be placed first: any linearization of the rest can be
    rearranged to start with it. So these are placed eagerly, without trying
    alternatives ("forced" frames), and if that successor state is already known to
    fail, the current state fails too. (An unknown delete or a put of the current
    value is effect-free *here* but not everywhere, so it stays a choice point.)
    """
    entries = _build_entries(ops)
    op_of, is_call, nxt, head = entries.op_of, entries.is_call, entries.nxt, entries.head
    kinds = [_KIND_CODES[op.kind] for op in ops]
    # Values nobody read are interchangeable (no get can match them), so they share
    # one model state; this lets the cache merge orderings of unobserved puts.
    read_values = {op.result for op in ops if op.kind == "get" and op.outcome == OK}
    values = [op.value if op.value in read_values else _UNREAD for op in ops]
    expected = [_expected_result(op) for op in ops]
    completed = [op.outcome == OK for op in ops]
    # Unknown ops with the same effect are interchangeable once called: only place
    # them in call order (each may follow only its predecessor in its class).
    predecessor, last_of_class = [-1] * len(ops), {}
    for i in sorted(range(len(ops)), key=lambda i: ops[i].call):
        if not completed[i]:
            effect_class = (kinds[i], values[i])
            predecessor[i] = last_of_class.get(effect_class, -1)
            last_of_class[effect_class] = i
    read_only = [k == _GET or (k == _DELETE and want is False) for k, want in zip(kinds, expected)]
    bits = [1 << i for i in range(len(ops))]
    ok_total = ok_remaining = sum(completed)

    linearized = 0  # bitset of placed operations
    state: object = None  # register value: None = absent, str, or _UNREAD
    stack: list[tuple[int, object, bool]] = []  # (call entry, state before, forced)
    cache: set[tuple[int, object]] = set()  # visited (placed set, state): all dead ends
    best_depth, best_prefix, best_blocked, best_state = -1, [], -1, None
    entry, candidate, candidate_state = nxt[head], -1, None
    steps = 0
    while ok_remaining:
        steps += 1
        if not steps & 1023 and time.monotonic() > deadline:
            return False, True, (f"key {key!r}: search budget exhausted after {steps} steps "
                                 f"(deepest prefix {max(best_depth, len(stack))} ops)")
        dead = False
        if is_call[entry]:  # still inside the window of minimal ops
            i = op_of[entry]
            kind, want = kinds[i], expected[i]
            if kind == _GET:
                legal, new_state = want is _ANY or want == state, state
            else:
                legal = want is _ANY or want == (state is not None)
                new_state = values[i] if kind == _PUT else None
                if not completed[i]:  # skip a no-op now (it can wait) or an out-of-turn one
                    before = predecessor[i]
                    legal = new_state != state and (before < 0 or linearized & bits[before])
            if not legal:
                entry = nxt[entry]
                continue
            if not read_only[i]:  # may change the register: remember as a choice point
                if candidate < 0 and (linearized | bits[i], new_state) not in cache:
                    candidate, candidate_state = entry, new_state
                entry = nxt[entry]
                continue
            if (linearized | bits[i], state) in cache:
                dead = True
            else:
                candidate, candidate_state, forced = entry, state, True
        else:
            forced = False
        if not dead and candidate >= 0:  # place the chosen op
            i = op_of[candidate]
            linearized |= bits[i]
            cache.add((linearized, candidate_state))
            stack.append((candidate, state, forced))
            state = candidate_state
            ok_remaining -= completed[i]
            entries.lift(candidate)
            entry, candidate = nxt[head], -1
            continue
        # Dead end: the return of an unplaced op was reached, or a known-dead state.
        if not dead and len(stack) > best_depth and op_of[entry] >= 0:
            best_depth, best_blocked, best_state = len(stack), op_of[entry], state
            best_prefix = [op_of[e] for e, _, _ in stack]
        forced = True
        while forced and stack:
            placed, state, forced = stack.pop()
            linearized ^= bits[op_of[placed]]
            ok_remaining += completed[op_of[placed]]
            entries.unlift(placed)
        if forced:  # popped everything: no linearization exists
            break
        entry, candidate = nxt[placed], -1  # try the next alternative after it
    if ok_remaining == 0:
        return True, False, f"key {key!r}: {len(ops)} relevant ops linearizable"
    return False, False, _explain_failure(key, ops, best_prefix, best_blocked, best_state, ok_total)


def check_key(ops: list[Operation], key: str | None = None,
              budget_seconds: float = 10.0) -> KeyResult:
    """Check the sub-history of one key. With key=None all ops must share one key."""
    if key is None:
        keys = {op.key for op in ops}
        if len(keys) > 1:
            raise ValueError(f"check_key got ops for several keys {sorted(keys)!r}; "
                             "pass key= or use check_history")
        key = next(iter(keys), "")
    mine = [op for op in ops if op.key == key]
    for op in mine:
        _validate(op)
    relevant = [op for op in mine if _relevant(op)]
    deadline = time.monotonic() + budget_seconds
    linearizable, timed_out, explanation = _search(key, relevant, deadline)
    return KeyResult(key=key, ok=linearizable, operations=len(mine),
                     explanation=explanation, timed_out=timed_out)


def check_history(ops: Iterable[Operation], budget_seconds_per_key: float = 10.0) -> CheckResult:
    """Check a multi-key history key by key (linearizability is compositional)."""
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    results = [check_key(by_key[key], key, budget_seconds_per_key) for key in sorted(by_key)]
    return CheckResult(ok=all(r.ok for r in results), keys=results)


def _json_time(t: float | None) -> float | None:
    return None if t is None or math.isinf(t) else t


def history_to_json(ops: Iterable[Operation]) -> list[dict]:
    """JSON-safe rows (infinite times become None) that history_from_json replays."""
    rows = []
    for op in ops:
        row = asdict(op)
        row["ret"] = _json_time(op.ret)
        rows.append(row)
    return rows


def history_from_json(rows: Iterable[dict]) -> list[Operation]:
    return [Operation(client=str(row["client"]), kind=row["kind"], key=str(row["key"]),
                      value=row.get("value"), call=float(row["call"]),
                      ret=None if row.get("ret") is None else float(row["ret"]),
                      outcome=row["outcome"], result=row.get("result"))
            for row in rows]
