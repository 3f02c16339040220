"""Histories of key-value operations as clients saw them: what the linearizability checker
(`kvs.testing.linearizability`) judges, and their JSON form for saved runs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

OK = "ok"
FAIL = "fail"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Operation:
    client: str  # who issued it
    kind: str  # "put" | "get" | "delete" | "cas"
    key: str
    value: str | None  # put/cas: the value written; get/delete: None
    call: float  # invocation time (seconds, monotonic)
    ret: float | None  # response time; None when the outcome is unknown (timeout)
    outcome: str  # "ok" | "fail" | "unknown"
    result: object = None  # ok get: value read (None: absent); ok put/delete: key existed; ok cas: applied
    expected: str | None = None  # cas: the value it required (None: the key absent)


def describe(op: Operation) -> str:
    """Short human-readable form of one operation."""
    args = f"{op.key!r}, {op.value!r}" if op.kind == "put" else \
        f"{op.key!r}, {op.expected!r} -> {op.value!r}" if op.kind == "cas" else repr(op.key)
    outcome = f"-> {op.result!r}" if op.outcome == OK else f"({op.outcome})"
    ret = f"{op.ret:.6f}" if op.outcome == OK and op.ret is not None else "?"
    return f"{op.client}: {op.kind}({args}) {outcome} [{op.call:.6f}, {ret}]"


def history_to_json(ops: Iterable[Operation]) -> list[dict]:
    """JSON-safe rows (an infinite ret becomes None) that history_from_json replays."""
    return [{**asdict(op), "ret": None if op.ret is None or math.isinf(op.ret) else op.ret}
            for op in ops]


def history_from_json(rows: Iterable[dict]) -> list[Operation]:
    return [Operation(client=str(row["client"]), kind=row["kind"], key=str(row["key"]),
                      value=row.get("value"), call=float(row["call"]),
                      ret=None if row.get("ret") is None else float(row["ret"]),
                      outcome=row["outcome"], result=row.get("result"), expected=row.get("expected"))
            for row in rows]
