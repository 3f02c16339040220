"""kvs.Client against hitting the leaders directly (issue 14): does client-side routing cost throughput?

One 2 x 3 cluster; the same Python load four ways, one after the other, each for --seconds with
--processes processes of --threads threads each, writing 256-byte values to random keys of both
shards (--op put) or reading them (--op get):

* client:   `kvs.Client(view).put(key, value)`: the client hashes the key and sends it to its
            shard's leader (learned from /kvs/routing and X-Kvs-Leader);
* leaders:  requests.Session PUTs straight to the leader of each key's shard, the ring and the
            leaders known in advance (the best a client can do; what the client must match);
* leaders, no env lookup: the same with `trust_env = False`, as the client's session has when no
            proxy is configured (requests otherwise reads the environment's proxy settings on
            every request): what the routing itself costs;
* one node: every PUT to the first node of the view, which forwards half of them.

The load is Python (a Python client is what is measured), so on this 2-core machine the numbers are
bounded by the client side as much as by the cluster: the comparison, not the rate, is the result.
The four ways take turns for --rounds rounds (the order rotated each round, so a drift of the
machine's speed falls on every way alike); each way reports its median round, and the verdict is
the ratio of the client's median to the leaders' median.

    python benchmarks/client.py [--seconds 8] [--threads 8] [--processes 2] [--rounds 5] [--op put]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import requests  # noqa: E402

from harness import (CpuMeter, kvs_cluster, kvs_pids, machine, now_utc, progress, shielded,  # noqa: E402
                     sigterm_as_interrupt, start_kvs, temp_root, write_result)
from kvs import Client  # noqa: E402
from kvs.config.ring import HashRing  # noqa: E402

VALUE = "v" * 256


# The ways to send a request, by name, and the keys they use; set before the load processes fork
# (closures do not pickle). Reads go to keys written beforehand: every one answers 200.
WAYS: dict = {}
KEYS = {"count": 100_000}


def _load_process() -> None:
    # The parent turns SIGTERM into KeyboardInterrupt (to stop its cluster); a load process just dies.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _drive_way(job: tuple[str, float, int]) -> dict:
    name, seconds, threads = job
    return drive(seconds, threads, WAYS[name])


def measure(pool, name: str, seconds: float, processes: int, threads: int) -> dict:
    """One way for `seconds`, from every load process at once: the sum of their rates."""
    parts = pool.map(_drive_way, [(name, seconds, threads)] * processes)
    return {"req_per_s": round(sum(p["req_per_s"] for p in parts), 1), "requests": sum(p["requests"] for p in parts),
            "failed": sum(p["failed"] for p in parts)}


def drive(seconds: float, threads: int, put) -> dict:
    """`put(key)` from `threads` threads for `seconds`; requests per second and failures."""
    done, failed = [0] * threads, [0] * threads
    stop = time.monotonic() + seconds

    def worker(n: int) -> None:
        rng = random.Random(n)
        call = put()
        while time.monotonic() < stop:
            try:
                call(f"bench-{rng.randrange(KEYS['count'])}")
                done[n] += 1
            except Exception:               # counted: a benchmark reports failures, it does not stop on them
                failed[n] += 1

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 30)
    elapsed = time.monotonic() - started
    return {"req_per_s": round(sum(done) / elapsed, 1), "requests": sum(done), "failed": sum(failed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=8, help="threads per load process")
    parser.add_argument("--processes", type=int, default=2, help="load processes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--op", choices=("put", "get"), default="put")
    parser.add_argument("--out")
    args = parser.parse_args()
    sigterm_as_interrupt()
    cluster = kvs_cluster(temp_root("kvs-bench-client-"), 2, 3, env={"KVS_FSYNC": "on"})
    try:
        start_kvs(cluster)
        routing = requests.get(f"http://{cluster.view[0]}/kvs/routing", timeout=10).json()
        ring = HashRing.from_dict(routing["ring"])
        leaders = {sid: cluster.leader_of(sid) for sid in routing["shards"]}
        if args.op == "get":
            kv = Client(cluster.view, timeout=10)
            KEYS["count"] = 1000
            for n in range(KEYS["count"]):
                kv.put(f"bench-{n}", VALUE)

        def raw(target, trust_env: bool = True) -> callable:
            session = requests.Session()
            session.trust_env = trust_env

            def call(key: str) -> None:
                url = f"http://{target(key)}/kvs/keys/{key}"
                resp = (session.put(url, json={"value": VALUE}, timeout=10) if args.op == "put"
                        else session.get(url, timeout=10))
                if resp.status_code >= 300:
                    raise RuntimeError(resp.status_code)
                resp.json()             # what the caller gets from the client's put (the version) or get
            return call

        def via_client():
            kv = Client(cluster.view, timeout=10)
            return (lambda key: kv.put(key, VALUE)) if args.op == "put" else kv.get

        WAYS.update({"client": via_client,
                     "leaders": lambda: raw(lambda key: leaders[ring.group_for(key)]),
                     "leaders, no env lookup": lambda: raw(lambda key: leaders[ring.group_for(key)], False),
                     "one node": lambda: raw(lambda key: cluster.view[0])})
        names = list(WAYS)
        rounds: list[dict] = []
        pool = multiprocessing.get_context("fork").Pool(args.processes, initializer=_load_process)
        try:
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                this = {}
                for name in order:
                    meter = CpuMeter(kvs_pids(cluster).values()).start()
                    this[name] = measure(pool, name, args.seconds, args.processes, args.threads)
                    this[name]["cpu"] = meter.stop()
                    progress(f"round {r + 1} {name}: {this[name]['req_per_s']} req/s, {this[name]['failed']} failed")
                rounds.append(this)
            pool.close()
        finally:
            pool.terminate()
            pool.join()
        medians = {name: statistics.median(r[name]["req_per_s"] for r in rounds) for name in names}
        ratio = medians["client"] / medians["leaders"]
        routing_cost = medians["client"] / medians["leaders, no env lookup"]
        wins = sum(1 for r in rounds if r["client"]["req_per_s"] >= r["leaders"]["req_per_s"])
        progress(f"medians {medians}; client / leaders: {ratio:.3f}; client ahead in {wins} of {len(rounds)} rounds; "
                 f"client / leaders without the environment lookup (the routing's own cost): {routing_cost:.3f}")
        write_result("client", {"timestamp": now_utc(), "machine": machine(), "op": args.op, "seconds": args.seconds,
                                "processes": args.processes, "threads": args.threads, "rounds": rounds,
                                "median_req_per_s": medians, "client_over_leaders": round(ratio, 3),
                                "client_over_leaders_no_env_lookup": round(routing_cost, 3),
                                "client_ahead_rounds": wins,
                                "failed": sum(r[n]["failed"] for r in rounds for n in names),
                                "command": " ".join(["python", "benchmarks/client.py"] + sys.argv[1:])}, args.out)
    finally:
        shielded(cluster.stop)


if __name__ == "__main__":
    main()
