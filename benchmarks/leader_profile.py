"""Scenario `profile`: where the leader's GIL time goes under load (py-spy), to say what bounds a group.

One 3-replica group; hey runs `--op` (write or read) with `--clients` clients against the leader
for `--seconds`, while `py-spy record --gil --nonblocking` samples the leader's threads that hold
the GIL (a single Python process can use one core's worth of GIL time, so this is the budget that
bounds the group). The collapsed stacks are summarised by layer:

  self:      the layer of the innermost frame of each sample (where the time is spent);
  inclusive: samples with any frame in the layer (what the layer costs with what it calls).

py-spy comes from PyPI (`pip install py-spy`); it needs ptrace rights on the node (root here).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading

import requests

from harness import (fmt, kvs_cluster, kvs_pids, log_tails, progress, record_command, run_hey, shielded,
                     start_kvs)

# (layer, substring of a frame's "function (path:line)" as py-spy prints it), first match wins
LAYERS = (("kvs: HTTP server (asyncio, httptools)", "kvs/http/aio/"), ("uvloop/asyncio", "uvloop/"),
          ("uvloop/asyncio", "asyncio/"), ("flask/werkzeug", "flask/"), ("flask/werkzeug", "werkzeug/"),
          ("pysyncobj (Raft)", "pysyncobj/"), ("cryptography (Raft encryption)", "cryptography/"),
          ("kvs: raft glue", "kvs/raft/"), ("kvs: state machines", "kvs/fsm/"), ("kvs: routing", "kvs/routing/"),
          ("kvs: HTTP API", "kvs/http/"), ("kvs: other", "kvs/"), ("json", "json/"),
          ("socket/select", "selectors.py"), ("socket/select", "socket.py"),
          ("threading/queue", "threading.py"), ("threading/queue", "queue.py"), ("logging", "logging/"))


def layer_of(frame: str) -> str:
    for layer, marker in LAYERS:
        if marker in frame:
            return layer
    return "other (stdlib, interpreter)"


def summarise(raw: str, top: int = 15) -> dict:
    """Self and inclusive shares per layer, and the top leaf functions, from py-spy's raw output."""
    self_ = collections.Counter()
    inclusive = collections.Counter()
    leaves = collections.Counter()
    tails = collections.Counter()          # the innermost frames of each stack: who calls the hot leaves
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if "(" in f]           # drop the process/thread labels
        if not frames:
            continue
        total += n
        self_[layer_of(frames[-1])] += n
        leaves[frames[-1]] += n
        tails[" <- ".join(reversed(frames[-5:]))] += n
        for layer in {layer_of(f) for f in frames}:
            inclusive[layer] += n
    share = lambda c: {k: round(100 * v / total, 1) for k, v in c.most_common()} if total else {}  # noqa: E731
    return {"samples": total, "self_pct": share(self_), "inclusive_pct": share(inclusive),
            "top_leaf_functions_pct": {k: round(100 * v / total, 1) for k, v in leaves.most_common(top)},
            "top_stack_tails_pct": {k: round(100 * v / total, 1) for k, v in tails.most_common(top)}}


def _record(py_spy: str, pid: int, out_path: str, seconds: float) -> tuple[list[str], threading.Thread, dict]:
    """Start `py-spy record` on `pid` in a thread; returns the command, the thread and its result holder."""
    cmd = [py_spy, "record", "--pid", str(pid), "--gil", "--nonblocking", "--rate", "250",
           "--duration", str(int(seconds)), "--format", "raw", "--output", out_path]
    record_command(cmd)
    result: dict = {}
    spy = threading.Thread(target=lambda: result.update(
        r=subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)))
    spy.start()
    return cmd, spy, result


def _collect(spy: threading.Thread, result: dict, out_path: str, seconds: float) -> dict:
    spy.join(seconds + 70)
    r = result.get("r")
    if r is None or r.returncode != 0 or not os.path.exists(out_path):
        raise RuntimeError(f"py-spy failed: {r.stderr if r else 'no result'}")
    with open(out_path) as f:
        return summarise(f.read())


def run(root: str, value: str, op: str, clients: int, seconds: float, via: str = "leader") -> dict:
    """Profile the leader while hey sends `op` to it (`via` "leader"), or to a follower (`via`
    "follower": the follower that takes the requests is profiled too, in `entry_gil_profile`)."""
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")   # the venv's, from PyPI
    if not os.path.exists(py_spy):
        py_spy = shutil.which("py-spy") or "py-spy"
    progress("profile: starting 1 shard x 3 replicas")
    cluster = kvs_cluster(os.path.join(root, "kvs"), shards=1, replicas=3)
    try:
        leader = start_kvs(cluster)["1"]
        entry = leader if via == "leader" else next(a for a in cluster.view if a != leader)
        body = json.dumps({"value": value})
        requests.put(f"http://{leader}/kvs/keys/bench-read", data=body,
                     headers={"Content-Type": "application/json"}, timeout=5).raise_for_status()
        pid = cluster.nodes[leader].process.pid
        progress(f"profile: py-spy on the leader {leader} (pid {pid}) during hey {op} x{clients} via the {via} "
                 f"{entry} for {seconds:g}s")
        out_path = os.path.join(root, "profile.raw")
        _, spy, spy_out = _record(py_spy, pid, out_path, seconds)
        if entry != leader:
            entry_path = os.path.join(root, "entry.raw")
            _, entry_spy, entry_out = _record(py_spy, cluster.nodes[entry].process.pid, entry_path, seconds)
        url = f"http://{entry}/kvs/keys/" + ("bench-write" if op == "write" else "bench-read")
        load = run_hey(url, "PUT" if op == "write" else "GET", body if op == "write" else "", clients, seconds,
                       list(kvs_pids(cluster).values()))
        summary = _collect(spy, spy_out, out_path, seconds)
        report = {"op": op, "clients": clients, "via": via, "leader": leader, "entry": entry, "load": load,
                  "gil_profile": summary}
        if entry != leader:
            report["entry_gil_profile"] = _collect(entry_spy, entry_out, entry_path, seconds)
        progress(f"profile: {fmt(load['ok_rps'], 0)} req/s under the profiler; leader's GIL self time by layer: "
                 + ", ".join(f"{k} {v}%" for k, v in list(summary["self_pct"].items())[:6]))
        if entry != leader:
            progress("profile: the follower's GIL self time by layer: " + ", ".join(
                f"{k} {v}%" for k, v in list(report["entry_gil_profile"]["self_pct"].items())[:6]))
        return report
    except Exception:
        log_tails(cluster)
        raise
    finally:
        progress("profile: stopping the group")
        shielded(cluster.stop)
        shutil.rmtree(root, ignore_errors=True)
