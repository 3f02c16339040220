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

Then the same through a follower (`--via follower`; both by default): the span is the entry
follower's, and its steps are the forward to the leader and the result back
(`kvs.raft.forwarding`) around the leader's replication.
Recording costs a few microseconds per event: the sum is a little above the untraced latency. The
tracer wraps kvs and PySyncObj internals by name: a missing one is reported and its steps stay
empty, it never stops the node.

etcd's p50 at 1 client is measured in the same run (one after the other) for reference. A report,
never a test: it fails on no speed.
Usage: python benchmarks/suite.py latency (results/latency.json, README table), or on its own
python benchmarks/latency_trace.py [--seconds 10] [--fsync on] [--via leader,follower] [--skip-etcd] [--hops]
(printed only; --hops splits each Raft message's hop into the sender's send returning, the receiver's
poll returning and its frame starting to decode, at a few more microseconds of tracing per event).
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
    wrap(LoopGroup, "_flush", "forward", lambda self: bool(self._forwards))
    wrap(LoopGroup, "_forwarded", "forward_resumed")
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

    if os.environ.get("KVS_TRACE_HOPS"):
        # --hops: when a tick thread's poll returned with events (the select.poll object is wrapped:
        # PySyncObj runs the handlers inside PollPoller.poll), when a frame starts decoding, and when a
        # send returned from the kernel.
        from pysyncobj.poller import PollPoller
        from pysyncobj.tcp_connection import TcpConnection

        class TimedPoll:
            def __init__(self, poll):
                self.poll_object = poll
                self.register, self.unregister = poll.register, poll.unregister
                self.modify = poll.modify

            def poll(self, *args):
                events = self.poll_object.poll(*args)
                if events:
                    EVENTS.append((now(), threading.get_ident(), "polled"))
                return events

        poller_init = PollPoller.__init__
        def init(self, *args, **kwargs):
            poller_init(self, *args, **kwargs)
            self._PollPoller__poll = TimedPoll(self._PollPoller__poll)
        PollPoller.__init__ = init
        wrap(_RaftConnection, "_decode", "decode")
        try_send = TcpConnection._TcpConnection__trySendBuffer
        def sent(self, *args, **kwargs):
            result = try_send(self, *args, **kwargs)
            EVENTS.append((now(), threading.get_ident(), "sent"))
            return result
        TcpConnection._TcpConnection__trySendBuffer = sent

    @atexit.register
    def dump():
        with open(PATH, "w") as f:
            for t, thread, label in EVENTS:
                f.write(f"{t} {thread} {label}\n")
'''

# (step, event kind, which process): "L" the leader, "E" the follower a client wrote to (`--via follower`),
# "X" the follower whose acknowledgement came first (E or the other one)
_REPLICATION = (("leader: -> AppendEntries to the socket", "send:append_entries", "L"),
                ("follower: -> AppendEntries received", "recv:append_entries", "X"),
                ("follower: -> entry appended", "append", "X"),
                ("follower: -> fsynced", "fsynced", "X"),
                ("follower: -> acknowledgement to the socket", "send:next_node_idx", "X"),
                ("leader: -> acknowledgement received", "recv:next_node_idx", "L"))
STEPS = (("leader: request parsed -> batch proposed", "propose", "L"),
         ("leader: -> entry appended (tick thread)", "append", "L"),
         *_REPLICATION,
         ("leader: -> callback (committed, applied)", "callback", "L"),
         ("leader: -> loop resumes the request", "loop_resumed", "L"),
         ("leader: -> response written", "http_out", "L"))
FOLLOWER_STEPS = (("entry follower: request parsed -> batch forwarded", "forward", "E"),
                  ("entry follower: -> forward to the socket (tick thread)", "send:kvs_forward", "E"),
                  ("leader: -> forward received", "recv:kvs_forward", "L"),
                  ("leader: -> entry appended", "append", "L"),
                  *_REPLICATION,
                  ("leader: -> result to the socket (committed, applied)", "send:kvs_forward_result", "L"),
                  ("entry follower: -> result received", "recv:kvs_forward_result", "E"),
                  ("entry follower: -> loop resumes the request", "forward_resumed", "E"),
                  ("entry follower: -> response written", "http_out", "E"))
TOTAL = "total (request parsed -> response written)"
_ROLES = {"L": "leader", "X": "follower", "E": "entry follower"}


def with_hops(plan: tuple) -> tuple:
    """`plan` with each Raft message's hop split (--hops): the sender's send returning from the kernel,
    the receiver's poll returning, and its frame starting to decode (decryption and unpickling follow)."""
    out = []
    for step in plan:
        _, label, who = step
        kind = label.split(":", 1)[1] if ":" in label else ""
        if label.startswith("recv:"):
            out += [(f"{_ROLES[who]}: -> woke for {kind} (poll returned)", "polled", who),
                    (f"{_ROLES[who]}: -> {kind} frame read, decoding", "decode", who)]
        out.append(step)
        if label.startswith("send:"):
            out.append((f"{_ROLES[who]}: -> {kind} handed to the kernel", "sent", who))
    return tuple(out)


def load(path: str, who: str) -> list[tuple[int, str, str]]:
    events = []
    with open(path) as f:
        for line in f:
            t, _, label = line.rstrip("\n").split(" ", 2)
            events.append((int(t), who, label))
    return events


def writes(events: list[tuple[int, str, str]], via: str = "leader", hops: bool = False) -> list[dict[str, int]]:
    """Each replicated write's steps: for every span of the entry node ("L" via the leader, "E" via a
    follower) from http_in to http_out, the steps of `STEPS` or `FOLLOWER_STEPS`, each the first such
    event after the step before, through the follower whose acknowledgement came first (a follower
    also acknowledges the previous write's commit-only AppendEntries, which appends nothing)."""
    entry, plan = ("L", STEPS) if via == "leader" else ("E", FOLLOWER_STEPS)
    plan = with_hops(plan) if hops else plan
    events.sort()
    spans, current = [], None
    for t, who, label in events:
        if who == entry and label == "http_in":
            current = [(t, who, label)]
        elif current is not None:
            current.append((t, who, label))
            if who == entry and label == "http_out":
                spans.append(current)
                current = None
    timelines = []
    for span in spans:
        line = _timeline(span, plan)
        if line is not None:
            timelines.append(line)
    return timelines


def _first(span: list, after: int, who: str, label: str) -> int | None:
    return next((t for t, w, lab in span if t >= after and w == who and lab == label), None)


def _timeline(span: list, plan: tuple) -> dict[str, int] | None:
    """None for a span that is not a replicated write (a read, the health probe)."""
    began, ended = span[0][0], span[-1][0]
    best = None                     # (when the acknowledging follower's last step was, the step times)
    for follower in {w for _, w, _ in span if w != "L"}:
        times, at = [], began
        for _, label, who in plan:
            at = _first(span, at, follower if who == "X" else who, label)
            if at is None:
                break
            times.append(at)
        else:
            acknowledged = max(t for t, (_, _, who) in zip(times, plan) if who == "X")
            if best is None or acknowledged < best[0]:
                best = (acknowledged, times)
    if best is None:
        return None
    line, previous = {}, began
    for (step, _, _), t in zip(plan, best[1]):
        line[step] = t - previous
        previous = t
    line[TOTAL] = ended - began
    return line


def trace_kvs(root: str, value: str, seconds: float, fsync: str, via: str = "leader", hops: bool = False) -> dict:
    """One traced 3-replica group, hey at 1 client through its leader or a follower: the steps of each
    write and hey's own figures."""
    tracer_dir, traces = os.path.join(root, "tracer"), os.path.join(root, "traces")
    os.makedirs(tracer_dir)
    os.makedirs(traces)
    with open(os.path.join(tracer_dir, "sitecustomize.py"), "w") as f:
        f.write(TRACER)
    env = {"PYTHONPATH": os.pathsep.join([tracer_dir, harness.REPO_ROOT]), "KVS_TRACE_DIR": traces,
           "KVS_FSYNC": fsync, **({"KVS_TRACE_HOPS": "1"} if hops else {})}
    cluster = harness.kvs_cluster(os.path.join(root, "data"), 1, 3, env=env)
    body = json.dumps({"value": value})
    try:
        leader = harness.start_kvs(cluster)["1"]
        entry = leader if via == "leader" else next(a for a in cluster.view if a != leader)
        url = f"http://{entry}/kvs/keys/traced"
        harness.run_hey(url, "PUT", body, 1, harness.WARMUP_SECONDS, [], record=False)
        hey = harness.run_hey(url, "PUT", body, 1, seconds, list(harness.kvs_pids(cluster).values()))
    finally:
        harness.shielded(cluster.stop)
    events = []
    for address in cluster.view:
        path = os.path.join(traces, address.replace(":", "_"))
        if os.path.exists(path):
            events += load(path, "L" if address == leader else "E" if address == entry else address)
        else:
            harness.progress(f"latency: no trace from {address} (it did not exit cleanly)")
    timelines = writes(events, via, hops)
    steps = {}
    for step in (timelines[0] if timelines else {}):
        values = sorted(line[step] / 1000 for line in timelines)
        steps[step] = {"p50_us": round(statistics.median(values)), "p90_us": round(values[int(0.9 * (len(values) - 1))])}
    return {"hey": hey, "writes_traced": len(timelines), "fsync": fsync, "via": via, "steps": steps,
            "missing_hooks": sorted({label for _, _, label in events if label.startswith("missing:")})}


def etcd_one_client(root: str, value: str, seconds: float, via: str = "leader") -> dict:
    """etcd's writes at 1 client through its leader or a follower, as `throughput` measures them."""
    etcd = harness.EtcdCluster(root)
    try:
        etcd.start()
        leader = etcd.leader_index()
        entry = leader if via == "leader" else (leader + 1) % len(etcd.clients)
        url = f"{etcd.clients[entry]}/v3/kv/put"
        body = json.dumps({"key": harness.b64("traced"), "value": harness.b64(value)})
        harness.run_hey(url, "POST", body, 1, harness.WARMUP_SECONDS, [], record=False)
        return harness.run_hey(url, "POST", body, 1, seconds, list(etcd.pids().values()))
    finally:
        harness.shielded(etcd.stop)


VIAS = ("leader", "follower")


def run(root: str, value: str, seconds: float, fsync: str = "on", with_etcd: bool = True,
        vias: tuple[str, ...] = VIAS, hops: bool = False) -> dict:
    """{"kvs": ..., "etcd": ...} through the leader, and {"kvs_follower": ..., "etcd_follower": ...}."""
    result = {}
    for via in vias:
        suffix = "" if via == "leader" else "_" + via
        result["kvs" + suffix] = trace_kvs(os.path.join(root, "kvs" + suffix), value, seconds, fsync, via, hops)
        if with_etcd:
            result["etcd" + suffix] = etcd_one_client(os.path.join(root, "etcd" + suffix), value, seconds, via)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--value-size", type=int, default=256)
    parser.add_argument("--fsync", choices=("on", "off"), default="on")
    parser.add_argument("--via", default=",".join(VIAS), help="leader, follower or both (comma-separated)")
    parser.add_argument("--skip-etcd", action="store_true")
    parser.add_argument("--hops", action="store_true",
                        help="split each Raft message's hop: send returned, receiver woke, frame decoding")
    args = parser.parse_args(argv)
    vias = tuple(v for v in args.via.split(",") if v in VIAS)
    result = run(tempfile.mkdtemp(prefix="kvs-latency-trace-"), "v" * args.value_size, args.seconds, args.fsync,
                 not args.skip_etcd, vias, args.hops)
    for via in vias:
        suffix = "" if via == "leader" else "_" + via
        kvs, etcd = result["kvs" + suffix], result.get("etcd" + suffix)
        print(f"via the {via}: kvs: {kvs['writes_traced']} writes traced, hey p50 {kvs['hey'].get('p50_ms')} ms"
              + (f"; etcd hey p50 {etcd.get('p50_ms')} ms" if etcd else "")
              + f"; load average {os.getloadavg()[0]:.1f}" + (f"; hooks missing: {kvs['missing_hooks']}"
                                                               if kvs["missing_hooks"] else ""))
        for step, v in kvs["steps"].items():
            print(f"  {step:56s} {v['p50_us']:8d} {v['p90_us']:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
