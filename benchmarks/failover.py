"""Scenario `failover`: SIGKILL a group's leader; time until a write through another node succeeds.

One 3-replica group (kvs) and, in the same run, a 3-member etcd cluster. Each round:
  1. wait until the group is healthy and has a leader; note which;
  2. start `PROBES` prober threads that write through the surviving nodes, round robin, each
     request with a short client timeout, starting again as soon as one ends;
  3. SIGKILL the leader (t0), by its pid;
  4. failover time = completion time of the first 2xx write *sent after t0*, minus t0;
  5. stop the probers, restart the killed node with the same data, wait until it is healthy again.
Repeated `--rounds` times (default 5); the median and the max are reported.

The probers are Python threads: they measure time to the first success, not throughput, so a
Python client is fast enough. A write sent after t0 cannot have been acknowledged by the dead
leader, so its success means the new leader committed it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
import time

import requests

from harness import EtcdCluster, b64, fmt, kvs_cluster, kvs_leaders, log_tails, progress, shielded, start_kvs
from kvs.testing.cluster import wait_until

PROBES = 4
PROBE_TIMEOUT = 1.0      # client-side: a request stuck on the dead leader is abandoned after this
ROUND_DEADLINE = 30.0    # a failover slower than this is recorded as a failure


def first_success_after_kill(write, kill) -> float | None:
    """Run `PROBES` threads calling `write(i) -> bool` in a loop; kill; seconds to the first success."""
    stop = threading.Event()
    armed = threading.Event()
    t0_box: list[float] = []
    successes: list[float] = []
    lock = threading.Lock()

    def probe(n: int) -> None:
        i = n
        deadline = time.monotonic() + ROUND_DEADLINE + 10
        while not stop.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                ok = write(i)
            except requests.RequestException:
                ok = False
            done = time.monotonic()
            i += PROBES
            if ok and armed.is_set() and sent >= t0_box[0]:
                with lock:
                    successes.append(done)

    threads = [threading.Thread(target=probe, args=(n,), daemon=True) for n in range(PROBES)]
    for t in threads:
        t.start()
    try:
        t0_box.append(time.monotonic())
        kill()
        armed.set()
        t0 = t0_box[0]
        try:
            wait_until(lambda: successes, timeout=ROUND_DEADLINE, interval=0.005, message="a write after the kill")
        except TimeoutError:
            return None
        with lock:
            return min(successes) - t0
    finally:
        stop.set()
        for t in threads:
            t.join(PROBE_TIMEOUT + 6)


def kvs_rounds(root: str, rounds: int, value: str) -> dict:
    progress("failover/kvs: starting 1 shard x 3 replicas")
    cluster = kvs_cluster(root, shards=1, replicas=3)
    body = json.dumps({"value": value})
    times: list[float | None] = []
    sessions = [requests.Session() for _ in range(PROBES)]
    try:
        start_kvs(cluster)
        for r in range(rounds):
            leader = kvs_leaders(cluster)["1"]
            survivors = [a for a in cluster.view if a != leader]

            def write(i: int) -> bool:
                resp = sessions[i % PROBES].put(f"http://{survivors[i % len(survivors)]}/kvs/keys/failover-{i}",
                                                data=body, headers={"Content-Type": "application/json"},
                                                timeout=PROBE_TIMEOUT)
                return resp.status_code in (200, 201)

            took = first_success_after_kill(write, lambda: cluster.kill(leader))
            times.append(took)
            new_leader = cluster.leader_of("1")
            progress(f"failover/kvs round {r + 1}/{rounds}: killed leader {leader}; first write after "
                     f"{fmt(took * 1000 if took is not None else None, 0)} ms; new leader {new_leader}")
            cluster.start_node(leader)
            cluster.wait_healthy(timeout=60)
        return summary(times) | {"rounds": rounds}
    except Exception:
        log_tails(cluster)
        raise
    finally:
        progress("failover/kvs: stopping the group")
        shielded(cluster.stop)


def etcd_rounds(root: str, rounds: int, value: str) -> dict:
    progress("failover/etcd: starting 3 members")
    etcd = EtcdCluster(root).start()
    sessions = [requests.Session() for _ in range(PROBES)]
    times: list[float | None] = []
    try:
        for r in range(rounds):
            li = etcd.leader_index()
            survivors = [u for i, u in enumerate(etcd.clients) if i != li]

            def write(i: int) -> bool:
                resp = sessions[i % PROBES].post(f"{survivors[i % len(survivors)]}/v3/kv/put",
                                                 json={"key": b64(f"failover-{i}"), "value": b64(value)},
                                                 timeout=PROBE_TIMEOUT)
                return resp.status_code == 200 and "error" not in resp.text[:200]

            took = first_success_after_kill(write, lambda: etcd.kill(li))
            times.append(took)
            progress(f"failover/etcd round {r + 1}/{rounds}: killed leader {etcd.clients[li]}; first write "
                     f"after {fmt(took * 1000 if took is not None else None, 0)} ms")
            etcd.start_member(li)
            etcd.wait_healthy(timeout=60)
        return summary(times) | {"rounds": rounds, "version": etcd.version()}
    finally:
        progress("failover/etcd: stopping the members")
        shielded(etcd.stop)


def summary(times: list[float | None]) -> dict:
    ok = [t for t in times if t is not None]
    return {"seconds": [None if t is None else round(t, 3) for t in times], "failed_rounds": len(times) - len(ok),
            "median_s": round(statistics.median(ok), 3) if ok else None, "max_s": round(max(ok), 3) if ok else None}


def run(root: str, rounds: int, value: str, with_etcd: bool = True) -> dict:
    try:
        out = {"kvs": kvs_rounds(os.path.join(root, "kvs"), rounds, value)}
        if with_etcd:
            out["etcd"] = etcd_rounds(os.path.join(root, "etcd"), rounds, value)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)
