"""Measure ONE 3-replica kvs group, side by side with a 3-member etcd 3.4 cluster.

What is measured, for kvs and for etcd, at each client count (default 1 and 16):
  * writes:                kvs `PUT /kvs/keys/<key>`   etcd `POST /v3/kv/put`
  * linearizable reads:    kvs `GET /kvs/keys/<key>`   etcd `POST /v3/kv/range` (linearizable by default)
each for a fixed time (`--seconds`, after a 2 s warm-up that is thrown away), always sent to the
group's leader, with the same value size. Reported: successful (2xx) requests/s, p50 and p99
latency, non-2xx responses and transport errors (counted apart, never averaged in), and the
machine's CPU busy share during the run.

Why hey: a Python load generator tops out near 1,000 req/s on this 2-core machine, below what we
want to measure; hey (Go) is cheap per request and prints the numbers we need. etcd is the anchor:
a mature Raft store on the same machine, the same disk and the same load tool.
Both systems run one after the other (never at the same time), so they do not share the CPU.

This is a measurement, not a test: it never fails on speed; it reports the targets met or missed.
Usage, from the repository root:  python benchmarks/raft_group.py [--seconds 10] [--clients 1,16]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import platform
import random
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from typing import Callable

import requests

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from kvs.local import LocalCluster, find_free_base_port, wait_until  # noqa: E402

WARMUP_SECONDS = 2
TARGETS = (("p50 write at 1 client <= 2.5 ms", "write", 1, "p50_ms", "<=", 2.5),
           (">= 1,400 writes/s at 16 clients", "write", 16, "ok_rps", ">=", 1400.0))
COMMANDS: list[str] = []          # every external command run, for the JSON report


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- etcd --------------------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_etcd(root: str) -> tuple[list[subprocess.Popen], list[str]]:
    """Three etcd members on 127.0.0.1; returns (processes, client URLs) once all are healthy."""
    ports = free_ports(6)
    names = [f"e{i}" for i in range(3)]
    peers = [f"http://127.0.0.1:{p}" for p in ports[3:]]
    clients = [f"http://127.0.0.1:{p}" for p in ports[:3]]
    cluster = ",".join(f"{n}={u}" for n, u in zip(names, peers))
    token = "kvs-bench-" + secrets.token_hex(4)
    os.makedirs(root, exist_ok=True)
    processes = []
    for name, client, peer in zip(names, clients, peers):
        cmd = ["etcd", "--name", name, "--data-dir", os.path.join(root, name),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", cluster, "--initial-cluster-state", "new",
               "--initial-cluster-token", token]
        COMMANDS.append(shlex.join(cmd))
        with open(os.path.join(root, f"{name}.log"), "ab") as log:
            processes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
    try:
        for url in clients:
            wait_until(lambda: requests.get(f"{url}/health", timeout=1).json().get("health") == "true",
                       timeout=30, message=f"etcd {url} healthy")
    except BaseException:
        shielded(lambda: stop_processes(processes))
        raise
    return processes, clients


def etcd_leader(clients: list[str]) -> str:
    def find() -> str | None:
        for url in clients:
            s = requests.post(f"{url}/v3/maintenance/status", json={}, timeout=2).json()
            if s.get("leader") and s["leader"] == s["header"]["member_id"]:
                return url
        return None
    return wait_until(find, timeout=15, message="etcd leader")


def shielded(stop: Callable[[], None]) -> None:
    """Run a clean-up step with Ctrl-C ignored, so a second Ctrl-C cannot leave processes behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """Terminate, then kill, exactly the processes this script started."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


# -- hey ----------------------------------------------------------------------------------------------

def cpu_seconds(pids: list[int]) -> dict:
    """Machine CPU seconds from /proc/stat by kind, and the CPU seconds of the given processes."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    ours = {}
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ours[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime, all threads
    return {"tasks": (user + nice + system) / tick, "irq": (irq + softirq) / tick, "steal": steal / tick,
            "total": (user + nice + system + idle + iowait + irq + softirq + steal) / tick,
            "ours": sum(ours.values()), **ours}


def run_hey(url: str, method: str, body: str, clients: int, seconds: float, server_pids: list[int],
            record: bool = True) -> tuple[str, dict]:
    """Run hey for `seconds`; returns its text output and where the machine's CPU went meanwhile."""
    cmd = ["hey", "-z", f"{seconds:g}s", "-c", str(clients), "-m", method,
           "-T", "application/json", "-d", body, url]
    hey0, c0, wall0 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_seconds(server_pids), time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    hey1, c1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_seconds(server_pids), time.monotonic() - wall0
    if record:                                    # measured runs only, not warm-ups
        COMMANDS.append(shlex.join(cmd))
    d = {k: c1[k] - c0[k] for k in c0}
    hey_s = hey1.ru_utime + hey1.ru_stime - hey0.ru_utime - hey0.ru_stime
    cores = lambda x: round(x / wall, 2)          # noqa: E731
    return out, {"machine_busy_pct": round(100 * (d["tasks"] + d["irq"]) / d["total"], 1),
                 "server_cores": cores(d["ours"]), "hey_cores": cores(hey_s), "irq_cores": cores(d["irq"]),
                 "steal_cores": cores(d["steal"]), "other_cores": cores(max(0.0, d["tasks"] - d["ours"] - hey_s)),
                 "cores_by_server_pid": {pid: cores(d[pid]) for pid in server_pids}}


def parse_hey(output: str) -> dict:
    """Requests/s, p50/p99 (ms), status-code counts and transport errors from hey's summary."""
    def number(pattern: str) -> float | None:
        m = re.search(pattern, output)
        return float(m.group(1)) if m else None
    total = number(r"Total:\s+([\d.]+) secs")
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)}
    errors_block = output.split("Error distribution:")[1] if "Error distribution:" in output else ""
    transport = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", errors_block, re.M))
    ok = sum(n for c, n in codes.items() if 200 <= c < 300)
    p50, p99 = number(r"50%+ in ([\d.]+) secs"), number(r"99%+ in ([\d.]+) secs")
    return {"hey_rps": number(r"Requests/sec:\s+([\d.]+)"), "total_s": total, "ok": ok,
            "ok_rps": ok / total if total else None, "status_codes": codes,
            "non_2xx": sum(n for c, n in codes.items() if not 200 <= c < 300),
            "transport_errors": transport,
            "p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 2) if p99 is not None else None}


def measure(system: str, requests_: dict, clients: list[int], seconds: float, pids: list[int]) -> dict:
    """requests_: {"write"|"read": (url, method, body)}; returns {"write@16": result, ...}."""
    results = {}
    for n in clients:
        for scenario, (url, method, body) in requests_.items():
            progress(f"{system}: {scenario} x{n} clients: warm-up {WARMUP_SECONDS}s, then {seconds:g}s")
            run_hey(url, method, body, n, WARMUP_SECONDS, pids, record=False)
            output, cpu = run_hey(url, method, body, n, seconds, pids)
            result = dict(parse_hey(output), cpu=cpu)
            results[f"{scenario}@{n}"] = result
            progress(f"  {fmt(result['ok_rps'], 0)} ok req/s, p50 {fmt(result['p50_ms'])} ms, "
                     f"non-2xx {result['non_2xx']}, transport errors {result['transport_errors']}, "
                     f"CPU: machine {cpu['machine_busy_pct']:.0f}% busy, {system} {cpu['server_cores']} "
                     f"cores, hey {cpu['hey_cores']}, irq {cpu['irq_cores']}, steal {cpu['steal_cores']}, "
                     f"other processes {cpu['other_cores']}")
    return results


# -- the two systems ---------------------------------------------------------------------------------

def bench_kvs(root: str, value: str, clients: list[int], seconds: float) -> dict:
    progress("kvs: starting 1 shard x 3 replicas")
    pythonpath = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))  # -m kvs from any cwd
    cluster = LocalCluster(shards=1, replicas=3, data_root=root, base_port=find_free_base_port(3),
                           secret=secrets.token_hex(16), env={"PYTHONPATH": pythonpath})
    COMMANDS.append(f"{sys.executable} -m kvs serve  (x3, env ADDRESS=<one of> VIEW={','.join(cluster.view)} "
                    "REPL_FACTOR=3 DATA_DIR=... KVS_SECRET=<random>)")
    try:
        cluster.start()
        cluster.wait_healthy(timeout=60)
        leader = wait_until(lambda: cluster.leader_of("1"), timeout=30, message="kvs shard-1 leader")
        progress(f"kvs: healthy; shard-1 leader is {leader}")
        body = json.dumps({"value": value})
        seeded = requests.put(f"http://{leader}/kvs/keys/bench-read", data=body,
                              headers={"Content-Type": "application/json"}, timeout=5)
        seeded.raise_for_status()
        results = measure("kvs", {"write": (f"http://{leader}/kvs/keys/bench-write", "PUT", body),
                                  "read": (f"http://{leader}/kvs/keys/bench-read", "GET", "")},
                          clients, seconds, [n.process.pid for n in cluster.nodes.values()])
        still = cluster.leader_of("1")
        if still != leader:
            progress(f"kvs: WARNING leader changed during the run: {leader} -> {still}")
        return {"leader": leader, "leader_after": still, "results": results,
                "pids": {a: n.process.pid for a, n in cluster.nodes.items()}}
    except Exception:
        for address in cluster.view:
            progress(f"kvs: log tail of {address}:\n{cluster.log_tail(address, 15)}")
        raise
    finally:
        progress("kvs: stopping the group")
        shielded(cluster.stop)


def bench_etcd(root: str, value: str, clients: list[int], seconds: float) -> dict:
    progress("etcd: starting 3 members")
    processes, urls = start_etcd(root)
    try:
        leader = etcd_leader(urls)
        progress(f"etcd: healthy; leader is {leader}")
        b64 = lambda s: base64.b64encode(s.encode()).decode()     # noqa: E731
        requests.post(f"{leader}/v3/kv/put", json={"key": b64("bench-read"), "value": b64(value)},
                      timeout=5).raise_for_status()
        put = json.dumps({"key": b64("bench-write"), "value": b64(value)})
        get = json.dumps({"key": b64("bench-read")})
        results = measure("etcd", {"write": (f"{leader}/v3/kv/put", "POST", put),
                                   "read": (f"{leader}/v3/kv/range", "POST", get)},
                          clients, seconds, [p.pid for p in processes])
        version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        return {"leader": leader, "version": version, "results": results,
                "pids": {u: p.pid for u, p in zip(urls, processes)}}
    finally:
        progress("etcd: stopping the members")
        shielded(lambda: stop_processes(processes))


# -- report -----------------------------------------------------------------------------------------

def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    git = lambda *a: subprocess.run(["git", "-C", REPO_ROOT, *a], capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "kvs_commit": git("rev-parse", "HEAD"),
            "kvs_uncommitted_changes": git("status", "--porcelain", "--", "kvs").splitlines(),
            "kvs_diff_sha1": hashlib.sha1(git("diff", "HEAD", "--", "kvs").encode()).hexdigest()}


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def columns(r: dict | None) -> list[str]:
    """One system's cells in the table: req/s, p50, p99, errors, machine CPU busy %."""
    if not r:
        return ["-"] * 5
    return [fmt(r["ok_rps"], 0), fmt(r["p50_ms"]), fmt(r["p99_ms"]), str(r["non_2xx"] + r["transport_errors"]),
            fmt(r["cpu"]["machine_busy_pct"], 0)]


def report(kvs: dict, etcd: dict | None, clients: list[int]) -> list[dict]:
    """Print the side-by-side table and the targets; returns the targets' verdicts."""
    head = ["scenario", "clients", "kvs req/s", "p50 ms", "p99 ms", "errors", "CPU%",
            "etcd req/s", "p50 ms", "p99 ms", "errors", "CPU%", "kvs/etcd"]
    rows, polluted = [], []
    for n in clients:
        for scenario in ("write", "read"):
            k = kvs["results"][f"{scenario}@{n}"]
            e = etcd["results"][f"{scenario}@{n}"] if etcd else None
            ratio = k["ok_rps"] / e["ok_rps"] if e and e["ok_rps"] and k["ok_rps"] is not None else None
            rows.append([scenario, str(n)] + columns(k) + columns(e) + [fmt(ratio, 2)])
            polluted += [f"{name} {scenario}@{n}: {r['cpu']['other_cores']} cores" for name, r in
                         (("kvs", k), ("etcd", e)) if r and r["cpu"]["other_cores"] > 0.2]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("req/s counts 2xx responses only; errors = non-2xx responses + transport errors; "
          "CPU% = whole machine busy during the run (hey included)")
    print(f"kvs leader: {kvs['leader']}" + (f"   etcd leader: {etcd['leader']}" if etcd else ""))
    if polluted:
        print("WARNING: other processes on the machine used CPU during: " + "; ".join(polluted))
    verdicts = []
    for label, scenario, n, metric, op, limit in TARGETS:
        r = kvs["results"].get(f"{scenario}@{n}")
        value = r.get(metric) if r else None
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        verdict = "not measured" if met is None else ("met" if met else "MISSED")
        print(f"target {label}: measured {fmt(value)} -> {verdict}")
        verdicts.append({"target": label, "measured": value, "met": met})
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    parser.add_argument("--value-size", type=int, default=256, help="value size in bytes")
    parser.add_argument("--clients", default="1,16", help="comma-separated concurrent client counts")
    parser.add_argument("--skip-etcd", action="store_true", help="measure kvs only")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "raft_group.json"))
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    value = "".join(random.choices(string.ascii_letters + string.digits, k=args.value_size))
    signal.signal(signal.SIGTERM, signal.default_int_handler)      # `kill <pid>` cleans up like Ctrl-C
    root = tempfile.mkdtemp(prefix="kvs-bench-")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    host = machine()                              # before the run: the kvs tree may change meanwhile
    try:
        kvs = bench_kvs(os.path.join(root, "kvs"), value, clients, args.seconds)
        etcd = None if args.skip_etcd else bench_etcd(os.path.join(root, "etcd"), value, clients, args.seconds)
    except KeyboardInterrupt:
        progress("interrupted; every process started has been stopped")
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)
    verdicts = report(kvs, etcd, clients)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"timestamp": started, "machine": host,
                   "settings": {"seconds": args.seconds, "warmup_seconds": WARMUP_SECONDS,
                                "value_size": args.value_size, "clients": clients},
                   "kvs": kvs, "etcd": etcd, "targets": verdicts, "commands": COMMANDS}, f, indent=2)
    progress(f"raw numbers written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
