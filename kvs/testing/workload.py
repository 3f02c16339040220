"""Workload: concurrent clients that record a history for the linearizability checker.

Each client thread issues GET, PUT (with a value no other operation writes)
and DELETE requests on a small set of keys, through nodes chosen at random,
and records invocation and response times and the outcome:

* ok       the store answered with a definite result (200, 201, 404);
* fail     the store answered that it did not do it (400) or a read failed (no effect);
* unknown  a write timed out or got 503: it may still take effect later.

Runs are bounded in time and seeded, so a schedule can be replayed.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote

import requests

from kvs.testing.linearizability import FAIL, OK, UNKNOWN, Operation


@dataclass(frozen=True)
class WorkloadSpec:
    addresses: tuple[str, ...]    # nodes to send to (HTTP addresses, or names `resolve` maps to them)
    keys: tuple[str, ...]
    clients: int = 8
    duration: float = 10.0
    seed: int = 1
    timeout: float = 7.0          # client-side; longer than the store's 5 s so 503s arrive first
    put_share: float = 0.5
    delete_share: float = 0.1
    # Where to reach a node right now (containers may move to a new host port when restarted).
    resolve: Callable[[str], str] | None = None
    # Set: the clients stop at their next operation (before `duration`), e.g. once a change under test
    # has ended, so that the history covers the whole change however long it took.
    stop: threading.Event | None = None


def _interpret(kind: str, status: int, body: dict) -> tuple[str, object]:
    if kind == "get":
        if status == 200:
            return OK, body.get("value")
        if status == 404:
            return OK, None
        return FAIL, None
    if kind == "put":
        if status in (200, 201):
            return OK, status == 200
    elif kind == "delete":
        if status in (200, 404):
            return OK, status == 200
    if status in (400, 404, 405, 413):
        return FAIL, None
    return UNKNOWN, None


def _client(spec: WorkloadSpec, name: str, seed: int, stop_at: float, out: list[tuple[Operation, str]]) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    n = 0
    while time.monotonic() < stop_at and not (spec.stop is not None and spec.stop.is_set()):
        n += 1
        key = rng.choice(spec.keys)
        address = rng.choice(spec.addresses)
        roll = rng.random()
        kind = "put" if roll < spec.put_share else "delete" if roll < spec.put_share + spec.delete_share else "get"
        value = f"{name}-{n}" if kind == "put" else None
        body = {"causal-context": {}} if value is None else {"value": value, "causal-context": {}}
        method = {"get": "GET", "put": "PUT", "delete": "DELETE"}[kind]
        call = time.monotonic()
        try:
            target = spec.resolve(address) if spec.resolve else address
            resp = session.request(method, f"http://{target}/kvs/keys/{quote(key, safe='')}", json=body,
                                   timeout=spec.timeout)
            status, data = resp.status_code, resp.json()
        except Exception:       # unreachable, bad JSON, or a node that cannot be resolved right now
            status, data = 0, {}
        ret = time.monotonic()
        outcome, result = _interpret(kind, status, data)
        out.append((Operation(client=name, kind=kind, key=key, value=value, call=call,
                              ret=None if outcome == UNKNOWN else ret, outcome=outcome, result=result), address))
        if outcome == UNKNOWN:
            time.sleep(rng.uniform(0.01, 0.05))    # back off: the store is failing over


def run_workload(spec: WorkloadSpec) -> list[Operation]:
    """Run every client until `spec.duration` has passed; return the whole history."""
    return [op for op, _ in run_recorded_workload(spec)]


def run_recorded_workload(spec: WorkloadSpec) -> list[tuple[Operation, str]]:
    """Like `run_workload`, with the address each operation was sent to."""
    stop_at = time.monotonic() + spec.duration
    histories: list[list[tuple[Operation, str]]] = [[] for _ in range(spec.clients)]
    threads = [threading.Thread(target=_client, args=(spec, f"c{i}", spec.seed * 1000 + i, stop_at, histories[i]),
                                daemon=True) for i in range(spec.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(spec.duration + spec.timeout + 5)
    return [record for history in histories for record in history]


def summarize(history: list[Operation]) -> dict[str, int]:
    counts = {OK: 0, FAIL: 0, UNKNOWN: 0}
    for op in history:
        counts[op.outcome] += 1
    return counts
