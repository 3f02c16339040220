"""Scenario `size`: memory, snapshot size and restart time against the number of keys.

One 3-replica kvs group (and, in the same run, a 3-member etcd cluster) is loaded in stages up to
each of `--keys` (default 100,000 then 300,000 keys of `--value-size` bytes). At each stage:

  * RSS of every node (VmRSS in /proc/<pid>/status);
  * on disk: kvs's snapshot file and journal of the shard group on every node (the snapshot is
    forced often by KVS_COMPACTION_ENTRIES=10000, so it covers all but the last <= 10,000 log
    entries; how many keys it holds is read back from the file); etcd's data directory;
  * restart time: SIGKILL every node, start them all again on the same data, time until every node
    is healthy and a read of the last key written returns its value.

Memory per million keys is *extrapolated* from the RSS slope between the two largest stages
((RSS_b - RSS_a) / (keys_b - keys_a) x 10^6), not measured at a million keys.

Loading: wrk, 1 thread, 64 connections, with a Lua script that writes keys size-<first>..
size-<first+n-1> in order and stops itself after n successful responses; then the key count is
checked (kvs: GET /kvs/key-count; etcd: a count-only range) and the stage fails if keys are missing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import time

import requests

from harness import (EtcdCluster, b64, dir_bytes, fmt, kvs_cluster, kvs_pids, log_tails, progress, record_command,
                     rss_bytes, shielded, start_kvs, stop_processes)
from kvs.testing.cluster import wait_until

COMPACTION_ENTRIES = 10_000
LOAD_CONNECTIONS = 64
DEFAULT_STAGES = (100_000, 300_000)
LOAD_RATE_FLOOR = 200          # keys/s: a load slower than this is abandoned (bounds the wrk run)

# The end of every loader script: count acknowledgements, say LOADED once `n` (+ slack) were, and
# print wrk's summary as JSON. A %-template like the scripts it ends (hence the doubled %%).
LOADER_LUA_TAIL = """local announced = false
response = function(status, headers, body)
  if status < 300 then acked = acked + 1 end
  if acked >= n + slack and not announced then    -- the harness interrupts wrk when it reads this line
    announced = true
    io.write("LOADED\\n")
    io.flush()
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "status_errors": %%d, "transport": %%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout))
end
"""

_LOADER_LUA = """
local first, n, slack = %(first)d, %(count)d, %(slack)d
local system = %(system)s
local value = %(value)s
local headers = {["Content-Type"] = "application/json"}
local nxt, acked = first, 0
local alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local function b64(data)   -- etcd's JSON gateway wants base64 keys
  return ((data:gsub('.', function(x)
    local r, b = '', x:byte()
    for i = 8, 1, -1 do r = r .. (b %% 2^i - b %% 2^(i-1) > 0 and '1' or '0') end
    return r
  end) .. '0000'):gsub('%%d%%d%%d?%%d?%%d?%%d?', function(x)
    if #x < 6 then return '' end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == '1' and 2^(6-i) or 0) end
    return alphabet:sub(c + 1, c + 1)
  end) .. ({'', '==', '='})[#data %% 3 + 1])
end
local etcd_value = b64(value)
request = function()
  -- Round robin over the stage's keys. Observed with wrk 4.1: the first request() result is never
  -- sent, so the first key is only written on the second lap, which `slack` allows for.
  local i = first + (nxt - first) %% n
  nxt = nxt + 1
  local key = "size-" .. i
  if system == "kvs" then
    return wrk.format("PUT", "/kvs/keys/" .. key, headers, '{"value": "' .. value .. '"}')
  end
  return wrk.format("POST", "/v3/kv/put", headers, '{"key": "' .. b64(key) .. '", "value": "' .. etcd_value .. '"}')
end
""" + LOADER_LUA_TAIL



def load_keys(root: str, system: str, base_url: str, first: int, count: int, value: str) -> dict:
    """Write keys size-<first>..size-<first+count-1> with wrk; returns the loader's summary."""
    script = os.path.join(root, f"load-{system}-{first}.lua")
    with open(script, "w") as f:
        f.write(_LOADER_LUA % {"first": first, "count": count, "system": json.dumps(system),
                               "value": json.dumps(value), "slack": LOAD_CONNECTIONS})
    return run_loader(script, base_url, count)


def run_loader(script: str, base_url: str, count: int) -> dict:
    """Run a loader script (ending with LOADER_LUA_TAIL) that writes `count` keys; the loader's summary."""
    limit = max(30, count // LOAD_RATE_FLOOR)
    cmd = ["wrk", "-t1", f"-c{LOAD_CONNECTIONS}", f"-d{limit}s", "--timeout", "10s", "-s", script, base_url]
    record_command(cmd)
    started = time.monotonic()
    # wrk runs for its whole -d even when the script has nothing left to do, so the script prints
    # LOADED after n successful responses and we interrupt wrk then (SIGINT: it prints its summary).
    wrk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for ln in wrk.stdout:                   # ends at EOF, i.e. when wrk exits after at most `limit` s
            lines.append(ln)
            if ln.strip() == "LOADED" and wrk.poll() is None:
                wrk.send_signal(signal.SIGINT)
        wrk.wait(timeout=limit + 60)
    finally:
        stop_processes([wrk])
    took = time.monotonic() - started
    out = "".join(lines)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk loader printed no summary:\n{out}")
    r = json.loads(line.split(" ", 1)[1])
    return {"keys": count, "seconds": round(took, 2), "keys_per_s": round(count / took), **r}


# -- kvs -----------------------------------------------------------------------------------------------

def kvs_key_count(address: str) -> int:
    return requests.get(f"http://{address}/kvs/key-count", timeout=10).json()["key-count"]


def kvs_snapshot(data_dir: str) -> dict:
    """Size of the shard group's snapshot and journal in one node's DATA_DIR, and the keys the snapshot holds."""
    group = os.path.join(data_dir, "shard-1")
    snap, journal = os.path.join(group, "snapshot"), os.path.join(group, "journal")
    keys = None
    try:
        with open(snap, "rb") as f:          # our own file from this run: header pickle, then the state
            pickle.load(f)
            keys = len(pickle.load(f)["data"])
    except (FileNotFoundError, EOFError, pickle.UnpicklingError):
        pass
    size = lambda p: os.path.getsize(p) if os.path.exists(p) else None     # noqa: E731
    return {"snapshot_bytes": size(snap), "snapshot_keys": keys, "journal_bytes": size(journal),
            "data_dir_bytes": dir_bytes(data_dir)}


def kvs_read_back(address: str, key: str, value: str) -> bool:
    try:
        r = requests.get(f"http://{address}/kvs/keys/{key}", timeout=5)
    except requests.RequestException:
        return False
    return r.status_code == 200 and r.json().get("value") == value


def kvs_stages(root: str, stages: list[int], value: str) -> dict:
    progress(f"size/kvs: starting 1 shard x 3 replicas, KVS_COMPACTION_ENTRIES={COMPACTION_ENTRIES}")
    cluster = kvs_cluster(root, shards=1, replicas=3, env={"KVS_COMPACTION_ENTRIES": str(COMPACTION_ENTRIES)})
    out: dict = {"stages": []}
    try:
        leader = start_kvs(cluster)["1"]
        out["empty_rss_bytes"] = {a: rss_bytes(p) for a, p in kvs_pids(cluster).items()}
        loaded = 0
        for target in stages:
            progress(f"size/kvs: loading keys {loaded}..{target - 1} through {leader}")
            load = load_keys(root, "kvs", f"http://{leader}", loaded, target - loaded, value)
            wait_until(lambda: kvs_key_count(leader) == target, timeout=30, message=f"kvs key count {target}")
            loaded = target
            stage = {"keys": target, "load": load,
                     "rss_bytes": {a: rss_bytes(p) for a, p in kvs_pids(cluster).items()},
                     "disk": {a: kvs_snapshot(n.data_dir) for a, n in cluster.nodes.items()}}
            last_key = f"size-{target - 1}"
            progress("size/kvs: SIGKILL all three, start them again, time until healthy and the last key reads back")
            for address in cluster.view:
                cluster.kill(address)
            started = time.monotonic()
            for address in cluster.view:
                cluster.start_node(address)
            cluster.wait_healthy(timeout=300)
            healthy = time.monotonic() - started
            wait_until(lambda: kvs_read_back(cluster.view[0], last_key, value), timeout=120, interval=0.02,
                       message="last key reads back")
            stage["restart_s"] = {"healthy": round(healthy, 2), "last_key_read": round(time.monotonic() - started, 2)}
            stage["rss_after_restart_bytes"] = {a: rss_bytes(p) for a, p in kvs_pids(cluster).items()}
            leader = wait_until(lambda: cluster.leader_of("1"), timeout=30, message="kvs leader")
            mib = max(stage["rss_bytes"].values()) / 2**20
            progress(f"size/kvs: {target} keys: loaded at {load['keys_per_s']} keys/s, max RSS {mib:.0f} MiB, "
                     f"snapshot {fmt(stage['disk'][cluster.view[0]]['snapshot_bytes'] / 2**20 if stage['disk'][cluster.view[0]]['snapshot_bytes'] else None)} MiB, "
                     f"restart {stage['restart_s']['last_key_read']} s")
            out["stages"].append(stage)
        return out
    except Exception:
        log_tails(cluster)
        raise
    finally:
        progress("size/kvs: stopping the group")
        shielded(cluster.stop)


# -- etcd ----------------------------------------------------------------------------------------------

def etcd_key_count(url: str) -> int:
    r = requests.post(f"{url}/v3/kv/range", json={"key": b64("size-"), "range_end": b64("size."),
                                                  "count_only": True}, timeout=10).json()
    return int(r.get("count", 0))


def etcd_read_back(url: str, key: str, value: str) -> bool:
    try:
        r = requests.post(f"{url}/v3/kv/range", json={"key": b64(key)}, timeout=5).json()
    except (requests.RequestException, ValueError):
        return False
    kvs_ = r.get("kvs") or []
    return bool(kvs_) and kvs_[0].get("value") == b64(value)


def etcd_stages(root: str, stages: list[int], value: str) -> dict:
    progress("size/etcd: starting 3 members")
    etcd = EtcdCluster(root).start()
    out: dict = {"stages": [], "version": etcd.version()}
    try:
        out["empty_rss_bytes"] = {u: rss_bytes(p) for u, p in etcd.pids().items()}
        loaded = 0
        for target in stages:
            leader = etcd.clients[etcd.leader_index()]
            progress(f"size/etcd: loading keys {loaded}..{target - 1} through {leader}")
            load = load_keys(root, "etcd", leader, loaded, target - loaded, value)
            wait_until(lambda: etcd_key_count(leader) == target, timeout=30, message=f"etcd key count {target}")
            loaded = target
            stage = {"keys": target, "load": load,
                     "rss_bytes": {u: rss_bytes(p) for u, p in etcd.pids().items()},
                     "disk": {u: {"data_dir_bytes": dir_bytes(etcd.data_dir(i))} for i, u in enumerate(etcd.clients)}}
            progress("size/etcd: SIGKILL all three, start them again, time until healthy and the last key reads back")
            for i in range(etcd.size):
                etcd.kill(i)
            started = time.monotonic()
            for i in range(etcd.size):
                etcd.start_member(i)
            etcd.wait_healthy(timeout=300)
            healthy = time.monotonic() - started
            wait_until(lambda: etcd_read_back(etcd.clients[0], f"size-{target - 1}", value), timeout=120,
                       interval=0.02, message="etcd last key reads back")
            stage["restart_s"] = {"healthy": round(healthy, 2), "last_key_read": round(time.monotonic() - started, 2)}
            mib = max(stage["rss_bytes"].values()) / 2**20
            progress(f"size/etcd: {target} keys: loaded at {load['keys_per_s']} keys/s, max RSS {mib:.0f} MiB, "
                     f"restart {stage['restart_s']['last_key_read']} s")
            out["stages"].append(stage)
        return out
    finally:
        progress("size/etcd: stopping the members")
        shielded(etcd.stop)


def per_million(system: dict) -> dict | None:
    """Extrapolated RSS and snapshot bytes per million keys, from the two largest stages."""
    stages = system.get("stages") or []
    if len(stages) < 2:
        return None
    a, b = stages[-2], stages[-1]
    dk = b["keys"] - a["keys"]
    rss = lambda s: max(s["rss_bytes"].values())          # noqa: E731
    out = {"from_keys": [a["keys"], b["keys"]], "rss_bytes_per_million_keys": round((rss(b) - rss(a)) / dk * 1e6)}
    disk = lambda s, k: max((d.get(k) or 0) for d in s["disk"].values())   # noqa: E731
    out["disk_bytes_per_million_keys"] = round((disk(b, "data_dir_bytes") - disk(a, "data_dir_bytes")) / dk * 1e6)
    snaps = [(s, d) for s in (a, b) for d in s["disk"].values() if d.get("snapshot_bytes") and d.get("snapshot_keys")]
    if snaps:
        out["snapshot_bytes_per_key"] = round(max(d["snapshot_bytes"] / d["snapshot_keys"] for _, d in snaps), 1)
    return out


def run(root: str, stages: list[int], value: str, with_etcd: bool = True) -> dict:
    try:
        out = {"kvs": kvs_stages(os.path.join(root, "kvs"), stages, value)}
        if with_etcd:
            out["etcd"] = etcd_stages(os.path.join(root, "etcd"), stages, value)
        for system in out.values():
            system["per_million_keys"] = per_million(system)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)

