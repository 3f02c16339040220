"""Where one write's latency goes at 1 client: a timeline of each write across the leader and followers.

`throughput` measures p50 at 1 client against etcd's; this says which steps make it up. One
3-replica group runs with a tracer loaded into every node (a `sitecustomize` on PYTHONPATH, active
only where KVS_TRACE_DIR is set) that records CLOCK_MONOTONIC timestamps, shared by the processes
of one machine, at the steps of the write path:

  leader:   request parsed -> batch proposed -> entry appended -> AppendEntries handed to the socket
  follower: AppendEntries received -> appended -> fsynced -> acknowledgement sent
  leader:   first acknowledgement received -> callback on the tick thread -> loop resumes -> response

hey sends writes from 1 client for `--seconds`; each write is the leader's span from "request
parsed" to "response written": the leader's steps, then the chain of the follower whose
acknowledgement came first, then the leader's steps after it. Reported: the median and p90 of each
step over all writes, and hey's own p50 (which adds the client and the kernel's loopback).
Recording costs a few microseconds per event: the sum is a little above the untraced latency. The tracer wraps kvs and PySyncObj internals by name: a missing one is reported
and its steps stay empty, it never stops the node.

etcd's p50 at 1 client is measured in the same run (one after the other) for reference. A report,
never a test: it fails on no speed.
Usage: python benchmarks/suite.py latency (results/latency.json, README table), or on its own
python benchmarks/latency_trace.py [--seconds 10] [--fsync on] [--skip-etcd] (printed only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import harness

# Loaded by each node's interpreter at startup (sitecustomize), before kvs is imported by the node.
TRACER = r'''
import atexit, os, threading, time
DIRECTORY = os.environ.get("KVS_TRACE_DIR")
if DIRECTORY:
    PATH = os.path.join(DIRECTORY, os.environ.get("ADDRESS", "unknown").replace(":", "_"))
    EVENTS = []
    now = time.monotonic_ns

    def wrap(owner, name, label, when=lambda *a: True):
        original = owner.__dict__.get(name)
        if original is None:
            EVENTS.append((now(), 0, "missing:" + owner.__name__ + "." + name))
            return
        def traced(*args, **kwargs):
            if when(*args):
                EVENTS.append((now(), threading.get_ident(), label(*args) if callable(label) else label))
            return original(*args, **kwargs)
        setattr(owner, name, traced)

    from kvs.http.aio.connection import Connection
    from kvs.raft.loop import LoopGroup
    from kvs.raft.journal import DurableJournal
    from kvs.raft.replica import Replica
    from kvs.raft.transport import _RaftConnection
    wrap(Connection, "on_message_complete", "http_in")
    wrap(Connection, "_finish", "http_out")
    wrap(LoopGroup, "_flush", "propose", lambda self: bool(self._writes))
    wrap(LoopGroup, "_from_tick", "callback")
    wrap(LoopGroup, "_wrote", "loop_resumed")
    wrap(DurableJournal, "add", "append")
    wrap(_RaftConnection, "send", lambda self, m: "send:" + str(m.get("type") if isinstance(m, dict) else "?"))
    wrap(Replica, "_SyncObj__onMessageReceived",
         lambda self, node, m: "recv:" + str(m.get("type") if isinstance(m, dict) else "?"))
    original_sync = DurableJournal.sync
    def sync(self):
        synced = original_sync(self)
        if synced:
            EVENTS.append((now(), threading.get_ident(), "fsynced"))
        return synced
    DurableJournal.sync = sync

    @atexit.register
    def dump():
        with open(PATH, "w") as f:
            for t, thread, label in EVENTS:
                f.write(f"{t} {thread} {label}\n")
'''

# (step, event kind, which process: "L" leader, "F" the follower whose acknowledgement came first)
STEPS = (("leader: request parsed -> batch proposed", "propose", "L"),
         ("leader: -> entry appended (tick thread)", "append", "L"),
         ("leader: -> AppendEntries to the socket", "send:append_entries", "L"),
         ("follower: -> AppendEntries received", "recv:append_entries", "F"),
         ("follower: -> entry appended", "append", "F"),
         ("follower: -> fsynced", "fsynced", "F"),
         ("follower: -> acknowledgement to the socket", "send:next_node_idx", "F"),
         ("leader: -> acknowledgement received", "recv:next_node_idx", "L"),
         ("leader: -> callback (committed, applied)", "callback", "L"),
         ("leader: -> loop resumes the request", "loop_resumed", "L"),
         ("leader: -> response written", "http_out", "L"))


def load(path: str, who: str) -> list[tuple[int, str, str]]:
    events = []
    with open(path) as f:
        for line in f:
            t, _, label = line.rstrip("\n").split(" ", 2)
            events.append((int(t), who, label))
    return events


def writes(events: list[tuple[int, str, str]]) -> list[dict[str, int]]:
    """Each replicated write's steps: for every leader span from http_in to http_out, the follower chain
    recv:append_entries -> append -> fsynced -> send:next_node_idx that finished first (a follower also
    acknowledges the previous write's commit-only AppendEntries, which appends nothing), then the
    leader's first events after it."""
    events.sort()
    spans, current = [], None
    for t, who, label in events:
        if who == "L" and label == "http_in":
            current = [(t, who, label)]
        elif current is not None:
            current.append((t, who, label))
            if who == "L" and label == "http_out":
                spans.append(current)
                current = None
    timelines = []
    for span in spans:
        line = _timeline(span)
        if line is not None:
            timelines.append(line)
    return timelines


def _first(span: list, after: int, who: str, label: str) -> int | None:
    return next((t for t, w, lab in span if t >= after and w == who and lab == label), None)


def _timeline(span: list) -> dict[str, int] | None:
    began, ended = span[0][0], span[-1][0]
    leader = [("propose", "L"), ("append", "L"), ("send:append_entries", "L")]
    times, at = [], began
    for label, who in leader:
        at = _first(span, at, who, label)
        if at is None:
            return None             # not a replicated write (a read, the health probe)
        times.append(at)
    chains = []
    for follower in {w for _, w, _ in span if w != "L"}:
        chain, t = [], times[-1]
        for label in ("recv:append_entries", "append", "fsynced", "send:next_node_idx"):
            t = _first(span, t, follower, label)
            if t is None:
                break
            chain.append(t)
        else:
            chains.append(chain)
    if not chains:
        return None
    times += min(chains, key=lambda chain: chain[-1])
    at = times[-1]
    for label in ("recv:next_node_idx", "callback", "loop_resumed"):
        at = _first(span, at, "L", label)
        if at is None:
            return None
        times.append(at)
    times.append(ended)
    line, previous = {}, began
    for (step, _, _), t in zip(STEPS, times):
        line[step] = t - previous
        previous = t
    line["total (request parsed -> response written)"] = ended - began
    return line


def trace_kvs(root: str, value: str, seconds: float, fsync: str) -> dict:
    """One traced 3-replica group, hey at 1 client: the steps of each write and hey's own figures."""
    tracer_dir, traces = os.path.join(root, "tracer"), os.path.join(root, "traces")
    os.makedirs(tracer_dir)
    os.makedirs(traces)
    with open(os.path.join(tracer_dir, "sitecustomize.py"), "w") as f:
        f.write(TRACER)
    env = {"PYTHONPATH": os.pathsep.join([tracer_dir, harness.REPO_ROOT]), "KVS_TRACE_DIR": traces,
           "KVS_FSYNC": fsync}
    cluster = harness.kvs_cluster(os.path.join(root, "data"), 1, 3, env=env)
    body = json.dumps({"value": value})
    try:
        leader = harness.start_kvs(cluster)["1"]
        url = f"http://{leader}/kvs/keys/traced"
        harness.run_hey(url, "PUT", body, 1, harness.WARMUP_SECONDS, [], record=False)
        hey = harness.run_hey(url, "PUT", body, 1, seconds, list(harness.kvs_pids(cluster).values()))
    finally:
        harness.shielded(cluster.stop)
    events = []
    for address in cluster.view:
        path = os.path.join(traces, address.replace(":", "_"))
        if os.path.exists(path):
            events += load(path, "L" if address == leader else address)
        else:
            harness.progress(f"latency: no trace from {address} (it did not exit cleanly)")
    timelines = writes(events)
    steps = {}
    for step in (timelines[0] if timelines else {}):
        values = sorted(line[step] / 1000 for line in timelines)
        steps[step] = {"p50_us": round(statistics.median(values)), "p90_us": round(values[int(0.9 * (len(values) - 1))])}
    return {"hey": hey, "writes_traced": len(timelines), "fsync": fsync, "steps": steps,
            "missing_hooks": sorted({label for _, _, label in events if label.startswith("missing:")})}


def etcd_one_client(root: str, value: str, seconds: float) -> dict:
    """etcd's writes at 1 client through its leader, as `throughput` measures them."""
    etcd = harness.EtcdCluster(root)
    try:
        etcd.start()
        url = f"{etcd.clients[etcd.leader_index()]}/v3/kv/put"
        body = json.dumps({"key": harness.b64("traced"), "value": harness.b64(value)})
        harness.run_hey(url, "POST", body, 1, harness.WARMUP_SECONDS, [], record=False)
        return harness.run_hey(url, "POST", body, 1, seconds, list(etcd.pids().values()))
    finally:
        harness.shielded(etcd.stop)


def run(root: str, value: str, seconds: float, fsync: str = "on", with_etcd: bool = True) -> dict:
    result = {"kvs": trace_kvs(os.path.join(root, "kvs"), value, seconds, fsync)}
    if with_etcd:
        result["etcd"] = etcd_one_client(os.path.join(root, "etcd"), value, seconds)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--value-size", type=int, default=256)
    parser.add_argument("--fsync", choices=("on", "off"), default="on")
    parser.add_argument("--skip-etcd", action="store_true")
    args = parser.parse_args(argv)
    result = run(tempfile.mkdtemp(prefix="kvs-latency-trace-"), "v" * args.value_size, args.seconds, args.fsync,
                 not args.skip_etcd)
    kvs = result["kvs"]
    print(f"kvs: {kvs['writes_traced']} writes traced, hey p50 {kvs['hey'].get('p50_ms')} ms"
          + (f"; etcd hey p50 {result['etcd'].get('p50_ms')} ms" if "etcd" in result else "")
          + f"; load average {os.getloadavg()[0]:.1f}" + (f"; hooks missing: {kvs['missing_hooks']}"
                                                           if kvs["missing_hooks"] else ""))
    for step, v in kvs["steps"].items():
        print(f"  {step:48s} {v['p50_us']:8d} {v['p90_us']:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
