"""Scenario `scaling`: 1, 2 and 3 kvs groups of 3 replicas, and the CPU each operation costs.

Load. One wrk process per group (1 thread, `--clients-per-group` connections), aimed at that
group's leader, with a Lua script that cycles through `KEYS_PER_GROUP` keys which the ring maps
to that group (chosen with kvs.config.ring.HashRing, as the nodes choose). Why wrk and not hey:
hey sends one URL, so one key; wrk's script picks the key of every request, so the load spreads
over many keys of every group. Why one wrk per group aimed at its leader: it measures what the
groups themselves sustain; entering through a node of another group adds an HTTP forward, which
the `throughput` scenario measures separately (the follower entry).
Every key is written once before the measurements, so reads never meet a missing key.

All groups share this 2-core machine, so total req/s cannot grow with groups here. What does
carry over to N machines is the CPU each operation costs each process: CPU-seconds per operation
for the leaders and the followers (from /proc/<pid>/stat over the measured window, divided by the
group's 2xx responses). If it stays flat from 1 to 3 groups, groups do not slow each other, and a
group on its own machines is bounded by its leader's core: ~1 / (leader CPU-s per op) ops/s,
times N for N groups. That projection is reported, labelled as one.
"""

from __future__ import annotations

import json
import os
import shutil

import requests

from harness import (WARMUP_SECONDS, cpu_line, fmt, kvs_cluster, kvs_leaders, kvs_pids, log_tails, progress,
                     run_wrk_many, shielded, start_kvs, wrk_script)
from kvs.config.ring import HashRing

KEYS_PER_GROUP = 200
DEFAULT_GROUPS = (1, 2, 3)


def keys_by_group(groups: int, per_group: int = KEYS_PER_GROUP) -> dict[str, list[str]]:
    """`per_group` keys for each shard id "1".."groups", by the ring the nodes use for that layout."""
    ring = HashRing([str(g + 1) for g in range(groups)])
    out: dict[str, list[str]] = {str(g + 1): [] for g in range(groups)}
    i = 0
    while any(len(v) < per_group for v in out.values()) and i < 1000 * per_group * groups:   # bounded
        key = f"scale-{i}"
        i += 1
        bucket = out[ring.group_for(key)]
        if len(bucket) < per_group:
            bucket.append(key)
    return out


def per_op_cpu(cpu: dict, roles: dict[str, dict[str, list[int]]], ops_by_group: dict[str, int]) -> dict:
    """CPU-seconds per operation for each role ("leaders", "followers", "all").

    roles: {role: {shard id: [pids of that role in the shard]}}. A process is charged to the
    operations of its own group: per role, the sum of its processes' CPU over the sum of their
    groups' operations, and per process, its CPU over its group's operations (ms)."""
    by_pid = cpu["cpu_s_by_server_pid"]
    out = {}
    for role, groups in roles.items():
        seconds = sum(by_pid[str(p)] for pids in groups.values() for p in pids)
        ops = sum(ops_by_group[g] for g, pids in groups.items() if pids)
        per_process = {str(p): round(1000 * by_pid[str(p)] / ops_by_group[g], 3) if ops_by_group[g] else None
                       for g, pids in groups.items() for p in pids}
        out[role] = {"cpu_s_per_op": seconds / ops if ops else None, "cpu_ms_per_op_by_pid": per_process}
    return out


def seed_keys(leaders: dict[str, str], keys: dict[str, list[str]], body: str) -> None:
    """Write every key once through its group's leader, so reads never meet a missing key, and check
    that none was forwarded (a forwarded reply names "address"): the key lists match the nodes' ring."""
    session = requests.Session()
    for shard, leader in leaders.items():
        for key in keys[shard]:
            reply = session.put(f"http://{leader}/kvs/keys/{key}", data=body,
                                headers={"Content-Type": "application/json"}, timeout=10)
            reply.raise_for_status()
            if "address" in reply.json():
                raise RuntimeError(f"key {key} was forwarded from {leader}: the ring here is not the nodes'")


def bench_groups(root: str, groups: int, value: str, clients: int, seconds: float, warmup: float) -> dict:
    progress(f"scaling: starting {groups} group(s) x 3 replicas")
    cluster = kvs_cluster(os.path.join(root, f"g{groups}"), shards=groups, replicas=3)
    try:
        leaders = start_kvs(cluster)
        progress(f"scaling: healthy; leaders {leaders}")
        pids = kvs_pids(cluster)
        leader_pids = {s: [pids[a]] for s, a in leaders.items()}
        follower_pids = {s: [pids[a] for a in cluster.replicas_of(s) if a != leaders[s]] for s in leaders}
        # "all": a group's three processes, charged to that group's operations
        group_pids = {s: [pids[a] for a in cluster.replicas_of(s)] for s in leaders}
        keys = keys_by_group(groups)
        body = json.dumps({"value": value})
        seed_keys(leaders, keys, body)
        out: dict = {"groups": groups, "leaders": leaders, "pids": pids, "clients_per_group": clients,
                     "keys_per_group": KEYS_PER_GROUP}
        for op, method, payload in (("write", "PUT", body), ("read", "GET", None)):
            targets = [(f"http://{leaders[s]}", wrk_script(os.path.join(root, f"g{groups}-{op}-{s}.lua"),
                                                           keys[s], method, "/kvs/keys/", payload))
                       for s in sorted(leaders)]
            progress(f"scaling: {groups} group(s) {op}, {clients} connections per group: "
                     f"warm-up {warmup:g}s, then {seconds:g}s")
            if warmup > 0:
                run_wrk_many(targets, clients, warmup, pids.values(), record=False)
            per_group, cpu = run_wrk_many(targets, clients, seconds, pids.values())
            ops = sum(r["ok"] for r in per_group)
            result = {"ok_rps": sum(r["ok_rps"] for r in per_group), "ok": ops,
                      "non_2xx": sum(r["non_2xx"] for r in per_group),
                      "transport_errors": sum(r["transport_errors"] for r in per_group),
                      "p50_ms": max(r["p50_ms"] for r in per_group), "p99_ms": max(r["p99_ms"] for r in per_group),
                      "per_group": dict(zip(sorted(leaders), per_group)), "cpu": cpu,
                      "cpu_per_op": per_op_cpu(cpu, {"leaders": leader_pids, "followers": follower_pids,
                                                     "all": group_pids},
                                               {s: r["ok"] for s, r in zip(sorted(leaders), per_group)})}
            lead = result["cpu_per_op"]["leaders"]["cpu_s_per_op"]
            # A group on machines of its own is bounded by its leader's single (GIL) core.
            result["projected_rps_one_core_per_process"] = round(groups / lead) if lead else None
            out[op] = result
            progress(f"  {fmt(result['ok_rps'], 0)} ok req/s total, worst group p50 {fmt(result['p50_ms'])} ms "
                     f"p99 {fmt(result['p99_ms'])} ms, errors {result['non_2xx'] + result['transport_errors']}, "
                     f"CPU ms/op: leaders {fmt(1000 * lead if lead else None, 3)}, all processes "
                     f"{fmt(1000 * result['cpu_per_op']['all']['cpu_s_per_op'], 3)}; " + cpu_line(cpu, "kvs"))
        after = kvs_leaders(cluster)
        if after != leaders:
            progress(f"scaling: WARNING a leader changed during the run: {leaders} -> {after}")
        out["leaders_after"] = after
        return out
    except Exception:
        log_tails(cluster)
        raise
    finally:
        progress(f"scaling: stopping {groups} group(s)")
        shielded(cluster.stop)


def run(root: str, value: str, groups_list: list[int], clients: int, seconds: float,
        warmup: float = WARMUP_SECONDS) -> dict:
    try:
        return {str(g): bench_groups(root, g, value, clients, seconds, warmup) for g in groups_list}
    finally:
        shutil.rmtree(root, ignore_errors=True)
