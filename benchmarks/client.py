"""kvs.Client against hitting the leaders directly (issue 14): does client-side routing cost throughput?

One 2 x 3 cluster; the same Python load three ways, one after the other, each for --seconds with
--threads threads writing 256-byte values to random keys of both shards:

* client:   `kvs.Client(view).put(key, value)`: the client hashes the key and sends it to its
            shard's leader (learned from /kvs/routing and X-Kvs-Leader);
* leaders:  requests.Session PUTs straight to the leader of each key's shard, the ring and the
            leaders known in advance (the best a client can do; what the client must match);
* one node: every PUT to the first node of the view, which forwards half of them.

The load is Python (a Python client is what is measured), so the numbers are bounded by the client
side on this machine, not by the cluster: the comparison, not the rate, is the result.

    python benchmarks/client.py [--seconds 8] [--threads 8]
"""

from __future__ import annotations

import argparse
import os
import random
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


def drive(seconds: float, threads: int, put) -> dict:
    """`put(key)` from `threads` threads for `seconds`; requests per second and failures."""
    done, failed = [0] * threads, [0] * threads
    stop = time.monotonic() + seconds

    def worker(n: int) -> None:
        rng = random.Random(n)
        call = put()
        while time.monotonic() < stop:
            try:
                call(f"bench-{rng.randrange(100_000)}")
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
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    sigterm_as_interrupt()
    cluster = kvs_cluster(temp_root("kvs-bench-client-"), 2, 3, env={"KVS_FSYNC": "on"})
    try:
        start_kvs(cluster)
        routing = requests.get(f"http://{cluster.view[0]}/kvs/routing", timeout=10).json()
        ring = HashRing.from_dict(routing["ring"])
        leaders = {sid: cluster.leader_of(sid) for sid in routing["shards"]}

        def via_client():
            kv = Client(cluster.view, timeout=10)
            return lambda key: kv.put(key, VALUE)

        def via_leaders():
            session = requests.Session()

            def put(key: str) -> None:
                resp = session.put(f"http://{leaders[ring.group_for(key)]}/kvs/keys/{key}", json={"value": VALUE},
                                   timeout=10)
                if resp.status_code >= 300:
                    raise RuntimeError(resp.status_code)
            return put

        def via_one_node():
            session = requests.Session()

            def put(key: str) -> None:
                resp = session.put(f"http://{cluster.view[0]}/kvs/keys/{key}", json={"value": VALUE}, timeout=10)
                if resp.status_code >= 300:
                    raise RuntimeError(resp.status_code)
            return put

        results = {}
        for name, put in (("client", via_client), ("leaders", via_leaders), ("one node", via_one_node),
                          ("client (again)", via_client)):
            meter = CpuMeter(kvs_pids(cluster).values()).start()
            results[name] = drive(args.seconds, args.threads, put)
            results[name]["cpu"] = meter.stop()
            progress(f"{name}: {results[name]['req_per_s']} req/s, {results[name]['failed']} failed")
        ratio = min(results["client"]["req_per_s"], results["client (again)"]["req_per_s"]) / \
            results["leaders"]["req_per_s"]
        progress(f"client / leaders: {ratio:.2f}")
        write_result("client", {"timestamp": now_utc(), "machine": machine(), "seconds": args.seconds,
                                "threads": args.threads, "results": results, "client_over_leaders": round(ratio, 3),
                                "command": " ".join(["python", "benchmarks/client.py"] + sys.argv[1:])}, args.out)
    finally:
        shielded(cluster.stop)


if __name__ == "__main__":
    main()
