"""Measure a view change under steady load: the write pause of moving keys, and what other keys feel.

Setup: 2 nodes with repl-factor 1 (two shards) and one idle node; `--keys` keys are loaded, then
the view grows to 3 nodes, which moves about a third of the keys to the new shard.

Load, one of two kinds, on keys that move and as many keys that stay, for the whole change. First
the same load runs for `--baseline` seconds without a change (the baseline), then again while the
change runs.
  * closed loop (the default): `--writers` client threads per key set, each with its own pooled HTTP
    session, each writing as soon as its last write was answered. On two vCPUs this saturates the
    machine (the Python clients take much of it): latencies are mostly queueing, in both phases.
  * fixed rate (`--rate N`): N writes/s per key set, sent on schedule whether or not earlier ones
    were answered (an open loop, from one asyncio thread with kvs's own HTTP client; at most
    `--max-outstanding` in flight per key set), each write's latency counted from the moment it was
    due, not from when it could be sent: a stall counts for every write it delayed (no coordinated
    omission). Below saturation, this is what a client at a steady rate feels.

Reported:
  * the change's duration;
  * the write pause of moving keys: the longest time a moving-key writer waited for one write during
    the change, and the p99 of moving-key write latencies during the change (target p99 <= 100 ms);
  * non-moving keys: errors and p99 latency during the change, against the baseline (target 0
    errors, p99 <= 1.2x baseline).
This is a measurement, not a test. Usage: python benchmarks/view_change.py [--keys 100000] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from kvs.testing.cluster import LocalCluster, find_free_base_port  # noqa: E402
from kvs.config.ring import HashRing  # noqa: E402
from kvs.http.aio.client import HttpClient  # noqa: E402
from kvs.routing.peers import PeerUnreachable  # noqa: E402


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def load(address: str, count: int, value: str) -> None:
    local = threading.local()

    def put(i: int) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        local.session.put(f"http://{address}/kvs/keys/load-{i}", json={"value": value}, timeout=30)

    with ThreadPoolExecutor(16) as pool:
        for n, _ in enumerate(pool.map(put, range(count))):
            if n and n % 10000 == 0:
                progress(f"  loaded {n} keys")


def writer(address: str, keys: list[str], stop: threading.Event, out: list) -> None:
    session = requests.Session()
    i = 0
    while not stop.is_set():
        key = keys[i % len(keys)]
        i += 1
        start = time.monotonic()
        try:
            status = session.put(f"http://{address}/kvs/keys/{key}", json={"value": str(i)}, timeout=30).status_code
        except requests.RequestException:
            status = 0
        out.append((start, time.monotonic() - start, status))


class Stop(threading.Event):
    """The end of a load: an event that remembers when it was set (time.monotonic())."""
    at = float("inf")

    def set(self) -> None:
        self.at = time.monotonic()
        super().set()


async def fixed_rate(address: str, keys: list[str], rate: float, max_outstanding: int, stop: Stop,
                     out: list) -> None:
    """Write `keys` in turn at `rate` writes/s until `stop`, whatever the answers' pace: each write gets
    (when it was due, its latency from then, its status; 0: no answer) in `out`. A write that could not
    leave on time (all `max_outstanding` in flight) still counts from when it was due, and every write
    due before the stop is sent, also those the stop found waiting for room."""
    client = HttpClient(max_idle_per_address=max_outstanding)
    room = asyncio.Semaphore(max_outstanding)
    in_flight: set = set()

    async def write(key: str, n: int, due: float) -> None:
        try:
            status, _, _ = await client.request(address, "PUT", f"/kvs/keys/{key}",
                                                {"Content-Type": "application/json"},
                                                json.dumps({"value": str(n)}).encode(), time.monotonic() + 30)
        except PeerUnreachable:     # refused, reset, timed out: an error of the run (others are the tool's)
            status = 0
        finally:
            room.release()
        out.append((due, time.monotonic() - due, status))

    interval, due, n = 1.0 / rate, time.monotonic(), 0
    while due < stop.at:
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await room.acquire()
        task = asyncio.ensure_future(write(keys[n % len(keys)], n, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        n, due = n + 1, due + interval
    if in_flight:
        await asyncio.wait(in_flight)
    client.close()


def run_fixed_rate(address: str, key_sets: list[list[str]], rate: float, max_outstanding: int,
                   stop: Stop, outs: list[list], failures: list) -> threading.Thread:
    """The fixed-rate load of every key set on one event loop in a thread of its own (started); an
    exception that ends it goes to `failures`."""
    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(asyncio.gather(*(fixed_rate(address, keys, rate, max_outstanding, stop, out)
                                                     for keys, out in zip(key_sets, outs))))
        except BaseException as exc:        # reported by run_load: the run's figures would be partial
            failures.append(exc)
        finally:
            loop.close()
    thread = threading.Thread(target=run, name="fixed-rate load", daemon=True)
    thread.start()
    return thread


def run_load(address: str, moving: list[str], staying: list[str], args: argparse.Namespace,
             action) -> tuple[list, list, float]:
    """Load both key sets (closed loop, or at `args.rate`) while `action()` runs; returns (moving ops,
    staying ops, action time), the ops of those that started, or were due, once the action had begun."""
    stop = Stop()
    moving_ops: list = []
    staying_ops: list = []
    failures: list = []
    if args.rate:
        threads = [run_fixed_rate(address, [moving, staying], args.rate, args.max_outstanding, stop,
                                  [moving_ops, staying_ops], failures)]
    else:
        threads = [threading.Thread(target=writer, args=(address, moving[i::args.writers], stop, moving_ops),
                                    daemon=True) for i in range(args.writers)]
        threads += [threading.Thread(target=writer, args=(address, staying[i::args.writers], stop, staying_ops),
                                     daemon=True) for i in range(args.writers)]
        for t in threads:
            t.start()
    try:
        time.sleep(1.0)                       # steady state before the measured action
        started = time.monotonic()
        action()
        took = time.monotonic() - started
    finally:
        stop.set()                            # also when the action failed: no load left on a stopped cluster
        for t in threads:
            t.join(60)
    if failures or any(t.is_alive() for t in threads):
        raise RuntimeError(f"the load did not end cleanly ({failures or 'still running 60 s after the stop'}): "
                           "its figures would be partial")
    window = [op for op in moving_ops if op[0] >= started], [op for op in staying_ops if op[0] >= started]
    return window[0], window[1], took


def summarize(ops: list) -> dict:
    ok = [lat for _, lat, status in ops if status in (200, 201)]
    return {"ops": len(ops), "errors": sum(status not in (200, 201) for _, _, status in ops),
            "p50_ms": round(percentile(ok, 50) * 1000, 1), "p99_ms": round(percentile(ok, 99) * 1000, 1),
            "max_ms": round(max(ok) * 1000, 1) if ok else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=4, help="closed loop: threads per key set")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="writes/s per key set at a fixed rate (an open loop) instead of the closed loop")
    parser.add_argument("--max-outstanding", type=int, default=256, help="fixed rate: writes in flight per key set")
    parser.add_argument("--baseline", type=float, default=8.0, help="seconds of load without a change")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "view_change.json"))
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="kvs-vc-bench-")
    base = find_free_base_port(4)
    cluster = LocalCluster(2, 1, root, base_port=base, secret=secrets.token_hex(8),
                           env={"PYTHONPATH": REPO_ROOT})
    try:
        cluster.start()
        cluster.wait_healthy(timeout=60)
        idle = cluster.add_idle_node(base + 2)
        entry = cluster.view[0]
        progress(f"loading {args.keys} keys")
        load(entry, args.keys, "x" * 100)
        old, new = HashRing(["1", "2"]), HashRing(["1", "2", "3"])
        moving = [k for k in (f"hot-{i}" for i in range(2000)) if old.group_for(k) != new.group_for(k)][:64]
        staying = [k for k in (f"hot-{i}" for i in range(2000)) if old.group_for(k) == new.group_for(k)][:64]

        kind = f"{args.rate:g} writes/s per key set" if args.rate else f"{args.writers} writers per key set"
        progress(f"baseline: {args.baseline}s of load ({kind}) without a change")
        base_moving, base_staying, _ = run_load(entry, moving, staying, args,
                                                lambda: time.sleep(args.baseline))
        progress("the same load while the view grows from 2 to 3 nodes")
        answer: dict = {}

        def change() -> None:
            resp = requests.put(f"http://{entry}/kvs/view-change",
                                json={"view": ",".join(cluster.view + [idle])}, timeout=600)
            answer.update(status=resp.status_code, body=resp.json())

        during_moving, during_staying, took = run_load(entry, moving, staying, args, change)
        report = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "keys": args.keys,
            "load": ({"kind": "fixed rate", "writes_per_s_per_key_set": args.rate,
                      "max_outstanding_per_key_set": args.max_outstanding} if args.rate
                     else {"kind": "closed loop", "writers_per_key_set": args.writers}),
            "view_change": {"status": answer.get("status"), "seconds": round(took, 2),
                            "keys_moved": sum(s["key-count"] for s in answer.get("body", {}).get("shards", [])
                                              if s["shard-id"] == "3")},
            "moving_keys": {"baseline": summarize(base_moving), "during_change": summarize(during_moving)},
            "staying_keys": {"baseline": summarize(base_staying), "during_change": summarize(during_staying)},
        }
        pause = report["moving_keys"]["during_change"]
        stay, stay_base = report["staying_keys"]["during_change"], report["staying_keys"]["baseline"]
        report["targets"] = {
            "moving-key write p99 <= 100 ms": pause["p99_ms"] <= 100,
            "non-moving keys: 0 errors": stay["errors"] == 0,
            "non-moving keys: p99 <= 1.2x baseline": stay["p99_ms"] <= 1.2 * stay_base["p99_ms"],
        }
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report, indent=2))
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
