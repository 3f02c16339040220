"""Scenario `throughput`: one 3-replica kvs group beside etcd and the unreplicated Flask dict server.

For each system and each concurrency (default 1, 4, 16, 64 clients), hey runs writes and then
linearizable reads, each for `--seconds` after a warm-up that is thrown away:

  system         entry                    write                       linearizable read
  kvs-leader     the shard's leader       PUT /kvs/keys/bench-write   GET /kvs/keys/bench-read
  kvs-follower   a follower ("any node")  same                        same
  etcd-leader    the leader member        POST /v3/kv/put             POST /v3/kv/range (linearizable default)
  etcd-follower  a follower member        same                        same
  flask-dict     the only process         PUT /kvs/keys/bench-write   GET /kvs/keys/bench-read

hey sends one URL, so every write of a run goes to one key and every read to another: this
measures the per-request path (HTTP, Raft, apply), which is what bounds one group; keys spread
over groups are the `scaling` scenario's business (wrk).
The systems run one after the other, never at the same time; the same value (256 B by default)
and the same hey flags are used for all of them.

This machine is shared and noisy: the same cell of the same code measured minutes apart has moved
by up to 50 % (etcd's as much as kvs's). `--repeat N` runs the whole sequence N times (every system
started afresh each round, so the systems alternate in time) and `combine` keeps, for each system
and cell, the round with the median throughput, and every round's figure beside it.
"""

from __future__ import annotations

import json
import os
import shutil

import requests

from harness import (WARMUP_SECONDS, EtcdCluster, b64, cpu_line, fmt, kvs_cluster, kvs_leaders, kvs_pids,
                     log_tails, progress, run_hey, shielded, start_flask_dict, start_kvs, stop_processes)

SYSTEMS = ("kvs-leader", "kvs-follower", "etcd-leader", "etcd-follower", "flask-dict")
DEFAULT_CLIENTS = (1, 4, 16, 64)


def measure(system: str, requests_: dict, clients: list[int], seconds: float, pids: list[int],
            warmup: float = WARMUP_SECONDS) -> dict:
    """requests_: {"write"|"read": (url, method, body)}; returns {"write@16": result, ...}."""
    results = {}
    for n in clients:
        for op, (url, method, body) in requests_.items():
            progress(f"{system}: {op} x{n} clients: warm-up {warmup:g}s, then {seconds:g}s")
            if warmup > 0:
                run_hey(url, method, body, n, warmup, pids, record=False)
            r = run_hey(url, method, body, n, seconds, pids)
            results[f"{op}@{n}"] = r
            progress(f"  {fmt(r['ok_rps'], 0)} ok req/s, p50 {fmt(r['p50_ms'])} ms, p99 {fmt(r['p99_ms'])} ms, "
                     f"non-2xx {r['non_2xx']}, transport errors {r['transport_errors']}; "
                     + cpu_line(r["cpu"], system))
    return results


def bench_kvs(root: str, value: str, clients: list[int], seconds: float, entries: list[str],
              warmup: float) -> dict:
    """entries: "leader" and/or "follower"; returns {"kvs-leader": {...}, "kvs-follower": {...}}."""
    progress("kvs: starting 1 shard x 3 replicas")
    cluster = kvs_cluster(root, shards=1, replicas=3)
    out = {}
    try:
        leader = start_kvs(cluster)["1"]
        follower = next(a for a in cluster.view if a != leader)
        progress(f"kvs: healthy; shard-1 leader is {leader}, follower entry {follower}")
        body = json.dumps({"value": value})
        requests.put(f"http://{leader}/kvs/keys/bench-read", data=body,
                     headers={"Content-Type": "application/json"}, timeout=5).raise_for_status()
        pids = list(kvs_pids(cluster).values())
        for entry in entries:
            address = leader if entry == "leader" else follower
            results = measure(f"kvs-{entry}", {"write": (f"http://{address}/kvs/keys/bench-write", "PUT", body),
                                               "read": (f"http://{address}/kvs/keys/bench-read", "GET", "")},
                              clients, seconds, pids, warmup)
            out[f"kvs-{entry}"] = {"entry": address, "leader": leader, "results": results,
                                   "pids": kvs_pids(cluster), "leader_pid": cluster.nodes[leader].process.pid}
        after = kvs_leaders(cluster)["1"]
        if after != leader:
            progress(f"kvs: WARNING leader changed during the run: {leader} -> {after}")
        for r in out.values():
            r["leader_after"] = after
        return out
    except Exception:
        log_tails(cluster)
        raise
    finally:
        progress("kvs: stopping the group")
        shielded(cluster.stop)


def bench_etcd(root: str, value: str, clients: list[int], seconds: float, entries: list[str],
               warmup: float) -> dict:
    progress("etcd: starting 3 members")
    etcd = EtcdCluster(root).start()
    out = {}
    try:
        li = etcd.leader_index()
        leader, follower = etcd.clients[li], etcd.clients[(li + 1) % etcd.size]
        progress(f"etcd: healthy; leader is {leader}")
        requests.post(f"{leader}/v3/kv/put", json={"key": b64("bench-read"), "value": b64(value)},
                      timeout=5).raise_for_status()
        put = json.dumps({"key": b64("bench-write"), "value": b64(value)})
        get = json.dumps({"key": b64("bench-read")})
        pids = list(etcd.pids().values())
        for entry in entries:
            url = leader if entry == "leader" else follower
            results = measure(f"etcd-{entry}", {"write": (f"{url}/v3/kv/put", "POST", put),
                                                "read": (f"{url}/v3/kv/range", "POST", get)},
                              clients, seconds, pids, warmup)
            out[f"etcd-{entry}"] = {"entry": url, "leader": leader, "version": etcd.version(),
                                    "results": results, "pids": etcd.pids(),
                                    "leader_pid": etcd.processes[li].pid}
        return out
    finally:
        progress("etcd: stopping the members")
        shielded(etcd.stop)


def bench_flask(root: str, value: str, clients: list[int], seconds: float, warmup: float,
                server: str = "waitress") -> dict:
    progress(f"flask-dict: starting one process ({server})")
    process, address = start_flask_dict(root, server)
    try:
        body = json.dumps({"value": value})
        requests.put(f"http://{address}/kvs/keys/bench-read", data=body,
                     headers={"Content-Type": "application/json"}, timeout=5).raise_for_status()
        results = measure("flask-dict", {"write": (f"http://{address}/kvs/keys/bench-write", "PUT", body),
                                         "read": (f"http://{address}/kvs/keys/bench-read", "GET", "")},
                          clients, seconds, [process.pid], warmup)
        return {"flask-dict": {"entry": address, "server": server, "results": results,
                               "pids": {address: process.pid}, "leader_pid": process.pid}}
    finally:
        progress("flask-dict: stopping")
        shielded(lambda: stop_processes([process]))


def combine(rounds: list[dict]) -> dict:
    """One result per system and cell from several rounds of `run`: the median round's (so that its
    rate, latencies and CPU stay one measurement's), with `rounds_ok_rps` listing every round's rate."""
    out: dict = {}
    for system in rounds[0]:
        cells = {}
        for cell in rounds[0][system]["results"]:
            each = [r[system]["results"][cell] for r in rounds if cell in r.get(system, {}).get("results", {})]
            # each round's processes (and leader) are new: the cell keeps its own round's leader pid
            each = [dict(r, leader_pid=rd[system]["leader_pid"]) for r, rd in zip(each, rounds)]
            ranked = sorted(each, key=lambda r: r["ok_rps"])
            cells[cell] = {**ranked[(len(ranked) - 1) // 2], "rounds_ok_rps": [r["ok_rps"] for r in each]}
        out[system] = {**rounds[0][system], "results": cells}
    return out


def run(root: str, value: str, clients: list[int], seconds: float, systems: list[str],
        warmup: float = WARMUP_SECONDS) -> dict:
    """Measure the chosen systems one after the other; returns {system: {...}}."""
    out: dict = {}
    kvs_entries = [s.split("-", 1)[1] for s in systems if s.startswith("kvs-")]
    etcd_entries = [s.split("-", 1)[1] for s in systems if s.startswith("etcd-")]
    try:
        if kvs_entries:
            out.update(bench_kvs(os.path.join(root, "kvs"), value, clients, seconds, kvs_entries, warmup))
        if etcd_entries:
            out.update(bench_etcd(os.path.join(root, "etcd"), value, clients, seconds, etcd_entries, warmup))
        if "flask-dict" in systems:
            out.update(bench_flask(os.path.join(root, "flask"), value, clients, seconds, warmup))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out
