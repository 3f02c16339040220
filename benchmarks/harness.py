"""What every benchmark scenario shares: processes, load tools, CPU accounting, the machine, results.

* Processes: every process is started here or by `kvs.testing.cluster.LocalCluster`, remembered by its
  Popen (so by pid), and stopped by that pid, also on Ctrl-C / SIGTERM (`shielded` ignores a
  second Ctrl-C while cleaning up). Nothing is ever stopped by name.
* Load: `hey` (one URL, Go, cheap per request) and `wrk` (C, with a Lua script that chooses the
  key of every request). A Python client tops out near 1,000 req/s on this 2-core machine, below
  what is measured, so neither is a Python loop.
* CPU: `CpuMeter` reads /proc/stat, /proc/<pid>/stat and the rusage of waited children around a
  measurement, so each result says how many cores each server process, the load tool, this script,
  interrupts and *other processes* (anything else on the shared machine) used. A run where other
  processes used more than `BUSY_MACHINE_CORES` is flagged as contaminated.
* Results: `machine()` describes the host and the kvs commit; `write_result` writes the JSON.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import requests

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from kvs.testing.cluster import LocalCluster, find_free_base_port, wait_until  # noqa: E402

BUSY_MACHINE_CORES = 0.2        # other processes above this during a measurement: contaminated
WARMUP_SECONDS = 2
COMMANDS: list[str] = []        # every external command of the run, for the JSON report


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def record_command(cmd: list[str] | str) -> None:
    COMMANDS.append(cmd if isinstance(cmd, str) else shlex.join(cmd))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- processes -----------------------------------------------------------------------------------

def shielded(stop: Callable[[], None]) -> None:
    """Run a clean-up step with Ctrl-C ignored, so a second Ctrl-C cannot leave processes behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_processes(processes: Iterable[subprocess.Popen]) -> None:
    """Terminate, then kill, exactly the processes given (by their pid)."""
    processes = [p for p in processes if p is not None]
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def sigterm_as_interrupt() -> None:
    """`kill <pid>` of a benchmark cleans up like Ctrl-C does."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def dir_bytes(path: str) -> int:
    """The files' sizes under `path`: a journal's preallocated zeros (up to 1 MiB per group) count, as on disk."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:        # compaction renames files while we walk
                pass
    return total


# -- kvs ---------------------------------------------------------------------------------------------

def kvs_cluster(root: str, shards: int, replicas: int, env: dict | None = None) -> LocalCluster:
    """A LocalCluster (not started) running this working tree's kvs, on a free port window."""
    pythonpath = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    cluster = LocalCluster(shards=shards, replicas=replicas, data_root=root,
                           base_port=find_free_base_port(shards * replicas),
                           secret=secrets.token_hex(16), env={"PYTHONPATH": pythonpath, **(env or {})})
    env_text = " ".join([f"ADDRESS=<one of> VIEW={','.join(cluster.view)} REPL_FACTOR={replicas}",
                         "DATA_DIR=... KVS_SECRET=<random>"] + [f"{k}={v}" for k, v in (env or {}).items()])
    record_command(f"{sys.executable} -m kvs serve  (x{shards * replicas}, env {env_text})")
    return cluster


def start_kvs(cluster: LocalCluster, timeout: float = 60) -> dict[str, str]:
    """Start the cluster; returns {shard id: leader address} once every node is healthy."""
    cluster.start()
    cluster.wait_healthy(timeout=timeout)
    return kvs_leaders(cluster, timeout)


def kvs_leaders(cluster: LocalCluster, timeout: float = 30) -> dict[str, str]:
    return {s: wait_until(lambda s=s: cluster.leader_of(s), timeout=timeout, message=f"kvs shard-{s} leader")
            for s in (str(i + 1) for i in range(cluster.shards))}


def kvs_pids(cluster: LocalCluster) -> dict[str, int]:
    return {a: n.process.pid for a, n in cluster.nodes.items() if n.process is not None}


@contextlib.contextmanager
def one_group(prefix: str):
    """A fresh, started 1 x 3 kvs group in a new directory, stopped on exit: (cluster, its leader's
    address, {address: pid}). The one-client scripts measure on it."""
    cluster = kvs_cluster(tempfile.mkdtemp(prefix=prefix), shards=1, replicas=3)
    try:
        leader = start_kvs(cluster)["1"]
        yield cluster, leader, kvs_pids(cluster)
    finally:
        shielded(cluster.stop)


def log_tails(cluster: LocalCluster, lines: int = 15) -> None:
    for address in cluster.view:
        progress(f"kvs: log tail of {address}:\n{cluster.log_tail(address, lines)}")


# -- etcd --------------------------------------------------------------------------------------------

@dataclass
class EtcdCluster:
    """Three etcd members on 127.0.0.1, each restartable by index (same command, same data dir)."""
    root: str
    size: int = 3
    commands: list[list[str]] = field(default_factory=list)
    processes: list[subprocess.Popen | None] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(2 * self.size)
        names = [f"e{i}" for i in range(self.size)]
        peers = [f"http://127.0.0.1:{p}" for p in ports[self.size:]]
        self.clients = [f"http://127.0.0.1:{p}" for p in ports[:self.size]]
        cluster = ",".join(f"{n}={u}" for n, u in zip(names, peers))
        token = "kvs-bench-" + secrets.token_hex(4)
        os.makedirs(self.root, exist_ok=True)
        for name, client, peer in zip(names, self.clients, peers):
            self.commands.append(["etcd", "--name", name, "--data-dir", os.path.join(self.root, name),
                                  "--listen-client-urls", client, "--advertise-client-urls", client,
                                  "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                  "--initial-cluster", cluster, "--initial-cluster-state", "new",
                                  "--initial-cluster-token", token])
        self.processes = [None] * self.size

    def data_dir(self, i: int) -> str:
        return os.path.join(self.root, f"e{i}")

    def start_member(self, i: int) -> None:
        with open(os.path.join(self.root, f"e{i}.log"), "ab") as log:
            self.processes[i] = subprocess.Popen(self.commands[i], stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self, timeout: float = 30) -> "EtcdCluster":
        for i, cmd in enumerate(self.commands):
            record_command(cmd)
            self.start_member(i)
        try:
            self.wait_healthy(timeout)
        except BaseException:
            shielded(self.stop)
            raise
        return self

    def healthy(self, i: int) -> bool:
        try:
            return requests.get(f"{self.clients[i]}/health", timeout=1).json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False

    def wait_healthy(self, timeout: float = 30) -> None:
        for i in range(self.size):
            wait_until(lambda i=i: self.healthy(i), timeout=timeout, message=f"etcd {self.clients[i]} healthy")

    def leader_index(self, timeout: float = 15) -> int:
        def find() -> tuple[int] | None:
            for i, url in enumerate(self.clients):
                if not self.alive(i):
                    continue
                try:
                    s = requests.post(f"{url}/v3/maintenance/status", json={}, timeout=1).json()
                except (requests.RequestException, ValueError):
                    continue
                if s.get("leader") and s["leader"] == s["header"]["member_id"]:
                    return (i,)          # a tuple: member 0 must be a truthy answer for wait_until
            return None
        return wait_until(find, timeout=timeout, message="etcd leader")[0]

    def alive(self, i: int) -> bool:
        return self.processes[i] is not None and self.processes[i].poll() is None

    def kill(self, i: int) -> None:
        p = self.processes[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)

    def pids(self) -> dict[str, int]:
        return {u: p.pid for u, p in zip(self.clients, self.processes) if p is not None}

    def stop(self) -> None:
        stop_processes(self.processes)

    @staticmethod
    def version() -> str:
        return subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]


# -- the unreplicated Flask dictionary server ----------------------------------------------------------

def start_flask_dict(root: str, server: str = "waitress") -> tuple[subprocess.Popen, str]:
    """benchmarks/flask_dict_server.py on a free port; returns (process, address) once it answers."""
    port = free_ports(1)[0]
    cmd = [sys.executable, os.path.join(BENCH_DIR, "flask_dict_server.py"), "--port", str(port),
           "--server", server]
    record_command(cmd)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "flask_dict.log"), "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None and
                   requests.get(f"http://{address}/health", timeout=1).status_code == 200,
                   timeout=20, message="flask dict server up")
    except BaseException:
        shielded(lambda: stop_processes([process]))
        raise
    return process, address


# -- CPU accounting ------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a live process; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine_cpu() -> dict:
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return {"tasks": (user + nice + system) / _TICK, "irq": (irq + softirq) / _TICK, "steal": steal / _TICK,
            "total": (user + nice + system + idle + iowait + irq + softirq + steal) / _TICK}


def _children_cpu() -> float:
    """CPU seconds of every waited-for child (hey, wrk, a wrapped benchmark and what it waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """Where the machine's CPU went between `start()` and `stop()`.

    server pids: processes we started and keep running (measured from /proc/<pid>/stat);
    load: waited-for children (hey/wrk), from rusage; harness: this Python process;
    other: whatever is left of the machine's busy time, i.e. other people's processes.
    """

    def __init__(self, server_pids: Iterable[int]):
        self.pids = list(server_pids)

    def start(self) -> "CpuMeter":
        self._m0, self._c0, self._h0 = _machine_cpu(), _children_cpu(), _process_cpu(os.getpid())
        self._p0 = {pid: _process_cpu(pid) for pid in self.pids}
        self._wall0 = time.monotonic()
        return self

    def stop(self) -> dict:
        wall = time.monotonic() - self._wall0
        m1, c1, h1 = _machine_cpu(), _children_cpu(), _process_cpu(os.getpid())
        p1 = {pid: _process_cpu(pid) for pid in self.pids}
        d = {k: m1[k] - self._m0[k] for k in m1}
        per_pid = {pid: max(0.0, p1[pid] - self._p0[pid]) for pid in self.pids}
        servers, load, harness = sum(per_pid.values()), c1 - self._c0, h1 - self._h0
        cores = lambda x: round(x / wall, 2) if wall > 0 else None      # noqa: E731
        return {"wall_s": round(wall, 3),
                "machine_busy_pct": round(100 * (d["tasks"] + d["irq"]) / d["total"], 1) if d["total"] else None,
                "server_cores": cores(servers), "load_cores": cores(load), "harness_cores": cores(harness),
                "irq_cores": cores(d["irq"]), "steal_cores": cores(d["steal"]),
                "other_cores": cores(max(0.0, d["tasks"] - servers - load - harness)),
                "cpu_s_by_server_pid": {str(pid): round(s, 3) for pid, s in per_pid.items()},
                "cores_by_server_pid": {str(pid): cores(s) for pid, s in per_pid.items()}}


def cpu_line(cpu: dict, system: str) -> str:
    return (f"CPU: machine {cpu['machine_busy_pct']:.0f}% busy, {system} {cpu['server_cores']} cores, "
            f"load tool {cpu['load_cores']}, irq {cpu['irq_cores']}, steal {cpu['steal_cores']}, "
            f"other processes {cpu['other_cores']}" + ("  WARNING: busy machine" if contaminated(cpu) else ""))


def contaminated(cpu: dict | None) -> bool:
    return bool(cpu) and (cpu.get("other_cores") or 0) > BUSY_MACHINE_CORES


# -- hey --------------------------------------------------------------------------------------------

def hey_command(url: str, method: str, body: str, clients: int, seconds: float) -> list[str]:
    cmd = ["hey", "-z", f"{seconds:g}s", "-c", str(clients), "-m", method, "-T", "application/json"]
    return cmd + (["-d", body] if body else []) + [url]


def run_hey(url: str, method: str, body: str, clients: int, seconds: float, server_pids: Iterable[int],
            record: bool = True) -> dict:
    """Run hey for `seconds`; returns its parsed summary plus where the machine's CPU went."""
    cmd = hey_command(url, method, body, clients, seconds)
    meter = CpuMeter(server_pids).start()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    cpu = meter.stop()
    if record:                                    # measured runs only, not warm-ups
        record_command(cmd)
    return dict(parse_hey(out), cpu=cpu)


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


# -- wrk --------------------------------------------------------------------------------------------

# done() prints one JSON line; request() picks the next key of the script's list, round robin.
_WRK_LUA = """
local keys = {%(keys)s}
local method = %(method)s
local prefix = %(prefix)s
local body = %(body)s
local headers = {["Content-Type"] = "application/json"}
local i = 0
request = function()
  i = i + 1
  return wrk.format(method, prefix .. keys[(i %% #keys) + 1], headers, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "status_errors": %%d, ' ..
    '"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d, "p50_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def lua_string(text: str | None) -> str:
    return "nil" if text is None else json.dumps(text)       # a JSON string literal is a valid Lua one here


def wrk_script(path: str, keys: list[str], method: str, prefix: str, body: str | None) -> str:
    with open(path, "w") as f:
        f.write(_WRK_LUA % {"keys": ", ".join(lua_string(k) for k in keys), "method": lua_string(method),
                            "prefix": lua_string(prefix), "body": lua_string(body)})
    return path


def run_wrk_many(targets: list[tuple[str, str]], connections: int, seconds: float,
                 server_pids: Iterable[int], record: bool = True) -> tuple[list[dict], dict]:
    """Run one wrk (1 thread, `connections` connections) per (base URL, Lua script), all at once.

    Returns each wrk's parsed summary and the CPU accounting of the whole run."""
    cmds = [["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", script, url]
            for url, script in targets]
    meter = CpuMeter(server_pids).start()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    try:
        outputs = [p.communicate(timeout=seconds + 60)[0] for p in procs]
    finally:
        stop_processes(procs)
    cpu = meter.stop()
    if record:
        for c in cmds:
            record_command(c)
    return [parse_wrk(o) for o in outputs], cpu


def parse_wrk(output: str) -> dict:
    m = re.search(r"^WRKJSON (\{.*\})$", output, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no summary:\n{output}")
    r = json.loads(m.group(1))
    seconds = r["duration_us"] / 1e6
    transport = r["connect"] + r["read"] + r["write"] + r["timeout"]
    ok = r["requests"] - r["status_errors"]           # wrk counts status > 399 as errors
    return {"requests": r["requests"], "ok": ok, "ok_rps": ok / seconds if seconds else None,
            "total_s": seconds, "non_2xx": r["status_errors"], "transport_errors": transport,
            "p50_ms": round(r["p50_us"] / 1000, 2), "p99_ms": round(r["p99_us"] / 1000, 2),
            "max_ms": round(r["max_us"] / 1000, 2)}


# -- the machine and the results -------------------------------------------------------------------

def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    git = lambda *a: subprocess.run(["git", "-C", REPO_ROOT, *a], capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    tool = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True).stdout.strip().split("\n")[0]  # noqa
    try:
        import pysyncobj
        pysyncobj_version = getattr(pysyncobj, "__version__", None) or _dist_version("pysyncobj")
    except ImportError:
        pysyncobj_version = None
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "pysyncobj": pysyncobj_version, "etcd": EtcdCluster.version(),
            "wrk": tool("dpkg-query", "-W", "-f=${Version}", "wrk"),
            "hey": tool("dpkg-query", "-W", "-f=${Version}", "hey"),
            "kvs_commit": git("rev-parse", "HEAD"),
            "kvs_uncommitted_changes": git("status", "--porcelain", "--", "kvs").splitlines(),
            "kvs_diff_sha1": hashlib.sha1(git("diff", "HEAD", "--", "kvs").encode()).hexdigest()}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_result(name: str, payload: dict, out: str | None = None) -> str:
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = dict(payload, commands=list(COMMANDS))
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    progress(f"raw numbers written to {os.path.relpath(path, os.getcwd())}")
    return path


def temp_root(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]
