"""Linearizability checker for key-value store histories (WGL, one key at a time).

A history is linearizable if each operation can be given one instant between
its call and its return such that, replayed in that order on a sequential
register, every operation returns what its client saw. That is NP-complete in
general, so we run the Wing & Gong search as refined by Lowe: walk the time-
ordered call/return events, place any operation whose call precedes the first
pending return (it is minimal in real-time order), and back off on reaching
the return of an unplaced one. Events sit in a doubly linked list so placing
(lift) and undoing (unlift) are O(1); the search is iterative, so long
histories never hit the recursion limit.

The search is affordable because linearizability is local (Horn & Kroening's
P-compositionality): a history is linearizable iff each key's sub-history is,
so many small searches replace one huge one. Lowe's cache explores each
(placed set as an int bitset, register value) pair once; values nobody read
share one model state so orderings of unobserved puts merge; register-specific
prunings (see _Search) tame ~16+ clients on one key; and a cheap pre-check
catches reads of long-overwritten values, which the search could only refute
by exhausting every ordering of everything before them.

An operation with an unknown outcome (timeout) may take effect at any instant
after its call, or never: it gets no return event (ret = +infinity), may be
placed with any result whenever it is minimal, and a history is accepted once
every *ok* operation is placed. Unknown gets (no effect) and failed operations
(no effect) are dropped. At equal times a return precedes a call: an operation
that returned at t happened before one invoked at t.

Compare-and-set ("cas", `expected` -> `value`) is a write that takes effect
only if the register holds `expected` (None: absent), atomically; its result is
whether it did. A failed cas changes nothing and is a free move like a get;
every value a cas expects counts as observed (it is never merged into
_UNREAD), since the cas observed it.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from kvs.testing.history import FAIL, OK, UNKNOWN, Operation, describe, history_from_json, history_to_json

__all__ = ["FAIL", "OK", "UNKNOWN", "Operation", "describe", "history_from_json", "history_to_json",
           "KeyResult", "CheckResult", "check_key", "check_history"]

_ANY = object()  # expected result of an op nobody observed: anything goes
_UNREAD = object()  # model state standing for every put value no get returned
_GET, _PUT, _DELETE, _CAS = 0, 1, 2, 3
_KIND_CODES = {"get": _GET, "put": _PUT, "delete": _DELETE, "cas": _CAS}


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


def _validate(op: Operation) -> None:
    if op.kind not in _KIND_CODES or op.outcome not in (OK, FAIL, UNKNOWN):
        raise ValueError(f"unknown operation kind or outcome: {op}")
    if op.kind in ("put", "cas") and op.value is None:
        raise ValueError(f"{op.kind} without a value: {op}")
    if op.kind == "cas" and op.outcome == OK and not isinstance(op.result, bool):
        raise ValueError(f"an ok cas records whether it applied (True or False): {op}")
    if op.outcome == OK and (op.ret is None or op.ret < op.call):
        raise ValueError(f"ok operation without a return time at or after its call: {op}")


def _expected_result(op: Operation) -> object:
    if op.outcome != OK:
        return _ANY
    if op.kind == "get":
        return op.result
    return _ANY if op.result is None else bool(op.result)  # None: flag not recorded


class _OpTable:
    """What the search consults about each relevant operation, as parallel lists."""

    def __init__(self, ops: list[Operation]) -> None:
        read_values = {op.result for op in ops if op.kind == "get" and op.outcome == OK} \
            | {op.expected for op in ops if op.kind == "cas"}
        self.kind = [_KIND_CODES[op.kind] for op in ops]
        # put/cas: the value written, or _UNREAD if no get returned it (and no cas expected it); delete/get: None
        self.writes = [(op.value if op.value in read_values else _UNREAD)
                       if op.kind in ("put", "cas") else None for op in ops]
        self.cas_expects = [op.expected if op.kind == "cas" else None for op in ops]
        self.expected = [_expected_result(op) for op in ops]
        self.completed = [op.outcome == OK for op in ops]  # ok ops must be placed
        self.bit = [1 << i for i in range(len(ops))]
        # ok get that returned a value: that value; else None
        self.reads = [op.result if k == _GET and c else None
                      for op, k, c in zip(ops, self.kind, self.completed)]
        # ops that change nothing wherever they are legal: a get, a delete of nothing
        self.never_changes = [k == _GET or (k in (_DELETE, _CAS) and e is False)
                              for k, e in zip(self.kind, self.expected)]
        # puts that leave the model state _UNREAD if it already is (not a free move once a failed cas
        # may be placed: it tells apart the unread values, one of which it may expect)
        failed_cas = any(k == _CAS and e is False for k, e in zip(self.kind, self.expected))
        self.overwrites_unread = [w is _UNREAD and e is True and k == _PUT and not failed_cas
                                  for w, e, k in zip(self.writes, self.expected, self.kind)]
        # unknown op: the previous unknown op (by call) with the same effect, or -1
        self.predecessor, last_of_class = [-1] * len(ops), {}
        for i in sorted(range(len(ops)), key=lambda i: ops[i].call):
            if not self.completed[i]:
                effect = (self.kind[i], self.writes[i], self.cas_expects[i])
                self.predecessor[i] = last_of_class.get(effect, -1)
                last_of_class[effect] = i

    def transition(self, i: int, state: object, linearized: int) -> tuple[bool, object]:
        """Whether op i may be placed now, and the model state after it."""
        want = self.expected[i]
        if self.kind[i] == _GET:
            return want is _ANY or want == state, state
        if self.kind[i] == _CAS:
            holds = state == self.cas_expects[i]       # _UNREAD equals no expected value
            if want is False:
                return not holds, state
            if not holds:
                return False, state
            if self.completed[i]:
                return True, self.writes[i]
        new_state = self.writes[i]
        if self.completed[i]:
            return want is _ANY or want == (state is not None), new_state
        # Unknown op: a no-op now can just as well wait, and unknown ops with the
        # same effect are interchangeable once called, so they go in call order.
        before = self.predecessor[i]
        return new_state != state and (before < 0 or bool(linearized & self.bit[before])), new_state


class _Entries:
    """Call/return events in time order, as arrays forming a doubly linked list."""

    def __init__(self, ops: list[Operation]) -> None:
        # At equal times returns sort before calls, except that an instantaneous
        # op's call must precede its own return: such ops sit between the two
        # groups, so instantaneous ops sharing a timestamp overlap each other.
        events: list[tuple[float, int, int]] = []  # (time, rank: odd = call, op index)
        for i, op in enumerate(ops):
            instant = op.outcome == OK and op.ret == op.call
            events.append((op.call, 1 if instant else 3, i))
            if op.outcome == OK:
                events.append((op.ret, 2 if instant else 0, i))  # type: ignore[arg-type]
        events.sort()
        n = len(events)
        self.head, self.tail = n, n + 1
        self.op_of = [i for _, _, i in events] + [-1, -1]
        self.is_call = [rank % 2 == 1 for _, rank, _ in events] + [False, False]
        self.return_of = [-1] * (n + 2)  # call entry -> its return entry; -1: unknown op
        call_entry: dict[int, int] = {}
        for e, (_, rank, i) in enumerate(events):
            if rank % 2:
                call_entry[i] = e
            else:
                self.return_of[call_entry[i]] = e
        self.nxt, self.prev = [-1] * (n + 2), [-1] * (n + 2)
        order = [self.head, *range(n), self.tail]
        for before, after in zip(order, order[1:]):
            self.nxt[before], self.prev[after] = after, before

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


class _Search:
    """WGL depth-first search over one key's events, with exact prunings:

    * Free moves: an op that changes nothing wherever it is legal (a get, a delete
      that found nothing), or a put of an unread value while the state is already
      _UNREAD, can go first whenever it is minimal and legal -- any linearization
      of the rest can be rearranged to start with it. So no alternative is tried
      ("forced"), and if it leads to a known dead end, so does the current state.
    * Locked values: if the register holds v, every writer of v is placed and a
      completed get of v is not, then v must not be overwritten yet.
    * Unknown ops are placed only when that changes the value, and
      interchangeable ones only in call order (_OpTable.transition).
    """

    def __init__(self, ops: list[Operation], deadline: float) -> None:
        self.ops, self.deadline = ops, deadline
        self.table, self.entries = _OpTable(ops), _Entries(ops)
        self.linearized = 0  # bitset of placed ops
        self.state: object = None  # model state: None (absent), a value, or _UNREAD
        self.stack: list[tuple[int, object, bool]] = []  # (call entry, state before, forced)
        self.cache: set[tuple[int, object]] = set()  # (bitset, state) already explored
        self.ok_remaining = sum(self.table.completed)
        self.unplaced_readers = Counter(v for v in self.table.reads if v is not None)
        self.unplaced_writers = Counter(w for w in self.table.writes if w in self.unplaced_readers)
        # deepest dead end: (placed op indices in order, op that could not be placed, bitset)
        self.deepest: tuple[list[int], int, int] | None = None
        self.steps = 0

    def run(self) -> bool | None:
        """True if linearizable, False if not, None if the budget ran out."""
        t, op_of, is_call, nxt = self.table, self.entries.op_of, self.entries.is_call, self.entries.nxt
        entry, candidate, locked = nxt[self.entries.head], None, False
        while self.ok_remaining:
            self.steps += 1
            if not self.steps & 1023 and time.monotonic() > self.deadline:
                return None
            forced = False
            if is_call[entry]:  # still inside the window of minimal ops
                i = op_of[entry]
                legal, new_state = t.transition(i, self.state, self.linearized)
                free = t.never_changes[i] or (t.overwrites_unread[i] and self.state is _UNREAD)
                if legal and not free and candidate is None and not locked and (
                        self.linearized | t.bit[i], new_state) not in self.cache:
                    candidate = (entry, new_state)  # first untried choice; keep looking
                if not (legal and free):  # for a free move, which comes first
                    entry = nxt[entry]
                    continue
                forced = True
                dead = (self.linearized | t.bit[i], new_state) in self.cache
                candidate = None if dead else (entry, new_state)
            elif candidate is None:  # reached the return of an op that cannot be placed
                self._note_dead_end(entry)
            if candidate is not None:
                self._place(*candidate, forced)
                entry, candidate, locked = nxt[self.entries.head], None, self._locked()
                continue
            entry = self._backtrack()
            if entry < 0:
                return False
            candidate, locked = None, self._locked()
        return True

    def _locked(self) -> bool:
        v = self.state
        return (v is not None and v is not _UNREAD and self.unplaced_readers[v] > 0
                and not self.unplaced_writers[v])

    def _place(self, entry: int, new_state: object, forced: bool) -> None:
        i = self.entries.op_of[entry]
        self.linearized |= self.table.bit[i]
        self.cache.add((self.linearized, new_state))
        self.stack.append((entry, self.state, forced))
        self.state = new_state
        self._count(i, -1)
        self.entries.lift(entry)

    def _backtrack(self) -> int:
        """Undo placements down to the last real choice; the entry to resume at, or -1."""
        while self.stack:
            entry, self.state, forced = self.stack.pop()
            i = self.entries.op_of[entry]
            self.linearized ^= self.table.bit[i]
            self._count(i, +1)
            self.entries.unlift(entry)
            if not forced:
                return self.entries.nxt[entry]
        return -1

    def _count(self, i: int, delta: int) -> None:
        t = self.table
        self.ok_remaining += delta * t.completed[i]
        if t.reads[i] is not None:
            self.unplaced_readers[t.reads[i]] += delta
        elif t.writes[i] in self.unplaced_writers:
            self.unplaced_writers[t.writes[i]] += delta

    def _note_dead_end(self, entry: int) -> None:
        if self.entries.op_of[entry] >= 0 and (
                self.deepest is None or len(self.stack) > len(self.deepest[0])):
            prefix = [self.entries.op_of[e] for e, *_ in self.stack]
            self.deepest = (prefix, self.entries.op_of[entry], self.linearized)

    def explain(self, key: str) -> str:
        prefix, blocked, linearized = self.deepest or ([], -1, 0)
        t, placed = self.table, [self.ops[i] for i in prefix]
        writers = [op for op in placed if op.kind != "get" and not (op.kind == "cas" and op.result is False)]
        value = writers[-1].value if writers else None
        waiting = [op for i, op in enumerate(self.ops)
                   if value is not None and t.reads[i] == value and not linearized & t.bit[i]]
        return (f"key {key!r} is not linearizable: the longest linearizable prefix places "
                f"{len(placed)} ops ({sum(op.outcome == OK for op in placed)} of "
                f"{sum(t.completed)} completed), ending with "
                f"[{'; '.join(describe(op) for op in placed[-3:]) or 'nothing'}]; "
                f"the register then holds {value!r}"
                + (f", yet {describe(waiting[0])} still has to read it" if waiting else "")
                + (f", and {describe(self.ops[blocked])} cannot be placed" if blocked >= 0 else ""))


def _precedes(a: Operation, b: Operation) -> bool:
    """Whether a returned before b was invoked, so a must be linearized first."""
    if a.outcome != OK or a.ret is None:
        return False
    both_instant = a.ret == a.call and b.outcome == OK and b.ret == b.call
    return a.ret < b.call or (a.ret == b.call and not both_instant)


def _obvious_violation(ops: list[Operation]) -> str | None:
    """Cheap necessary condition: if v has a single writer w, no read of v may
    precede w, and only reads of v may be forced between w and a read of v."""
    readers: dict[object, list[Operation]] = {}
    writers: dict[object, list[Operation]] = {}
    for op in ops:
        if op.kind == "get" and op.outcome == OK and op.result is not None:
            readers.setdefault(op.result, []).append(op)
        elif op.kind == "put" or (op.kind == "cas" and op.result is not False):
            writers.setdefault(op.value, []).append(op)
    by_call = sorted(ops, key=lambda op: op.call)
    calls = [op.call for op in by_call]
    for value, reads in readers.items():
        if not writers.get(value):
            return f"{describe(reads[0])} reads a value that was never written"
        if len(writers[value]) > 1:
            continue
        w, last = writers[value][0], max(reads, key=lambda r: r.call)
        early = [r for r in reads if _precedes(r, w)]
        if early:
            return f"{describe(early[0])} returns before {describe(w)} was invoked"
        if w.outcome != OK:
            continue
        for o in by_call[bisect_left(calls, w.ret):bisect_right(calls, last.call)]:
            if _changes_nothing(o, value):
                continue
            if _precedes(w, o) and _precedes(o, last):
                return (f"{describe(o)} happens after {describe(w)} and before "
                        f"{describe(last)}, which still reads {value!r}")
    return None


def _changes_nothing(op: Operation, value: object) -> bool:
    """An op that leaves the register at `value`: a read of it, or a cas that did not apply."""
    return (op.kind == "get" and op.result == value) or (op.kind == "cas" and op.outcome == OK and op.result is False)


def check_key(ops: list[Operation], key: str | None = None,
              budget_seconds: float = 10.0) -> KeyResult:
    """Check the ops on one key (key=None: all ops must be on the same key)."""
    if key is None:
        keys = {op.key for op in ops}
        if len(keys) > 1:
            raise ValueError(f"ops on several keys {sorted(keys)!r}: pass key= or use check_history")
        key = next(iter(keys), "")
    mine = [op for op in ops if op.key == key]
    for op in mine:
        _validate(op)
    relevant = [op for op in mine if op.outcome == OK or (op.outcome == UNKNOWN and op.kind != "get")]
    search = _Search(relevant, time.monotonic() + budget_seconds)
    obvious = _obvious_violation(relevant)
    verdict = False if obvious else search.run()
    if obvious:
        explanation = f"key {key!r} is not linearizable: {obvious}"
    elif verdict is None:
        explanation = f"key {key!r}: undecided, search budget of {budget_seconds}s exhausted"
    elif verdict:
        explanation = f"key {key!r}: linearizable ({len(relevant)} ops that may have taken effect)"
    else:
        explanation = search.explain(key)
    return KeyResult(key=key, ok=bool(verdict), operations=len(mine),
                     explanation=explanation, timed_out=verdict is None)


def check_history(ops: Iterable[Operation], budget_seconds_per_key: float = 10.0) -> CheckResult:
    """Check a multi-key history key by key (linearizability is compositional)."""
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    results = [check_key(by_key[key], key, budget_seconds_per_key) for key in sorted(by_key)]
    return CheckResult(ok=all(r.ok for r in results), keys=results)
