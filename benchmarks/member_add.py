"""Scenario `member-add`: one replica added to a shard of 100,000 keys, in place against the copy.

`PUT /kvs/view-change/add-member {"address": <spare>, "shard-id": "1"}` on a cluster of 2 shards x 3
replicas plus one idle spare node, while clients read and write keys of shard 1. The same scenario
runs twice in one run, one side after the other, each on a fresh cluster:

  in place  this working tree's kvs (issue 12): shard 1's Raft group gets a fourth member, which
            catches up from the leader's snapshot and log; no key moves, the shard keeps its id.
  copy      the kvs of commit COPY_COMMIT (23bf04a, the last one before issue 12's change): shard 1
            becomes a new group (a new id) of the four nodes and its keys are copied into it; the ring
            changes with the shard ids, so keys of shard 2 move too.

The copy side runs the old tree's `kvs/` (`--copy-root`, a checkout of that commit, with its own
`.venv` if it has one; by default `git archive COPY_COMMIT kvs` into a temporary directory, run by
this Python); node processes start with that tree as their working directory and PYTHONPATH, so
`python -m kvs` cannot pick up this tree. Each side records the commit it ran, and what the change
did (the new shard ids) shows which code ran.

Data: `--keys` keys (default 100,000) that the ring maps to shard 1, so shard 1 holds exactly that
many, and as many keys of shard 2 (`--other-keys`; the ring balances shards, so a cluster with a
shard of 100,000 keys has its other shard about as full). Every key gets a value of its own, `--value-size`
(256) random base64 characters (Raft messages are zlib-compressed: one value repeated would make the
bytes moved meaningless), loaded with wrk (64 connections through the shard's leader; a Lua script
reads the keys and values from a file), counted afterwards (GET /kvs/key-count on each shard). The
nodes run with their default settings unless `--ma-compaction-entries` is given: then a shard's log is
compacted into a snapshot every that many entries, so a joining member gets a snapshot and a tail
rather than the whole log (the report says which: the leader's log length and snapshot size).

Clients: `--writers` threads write and `--readers` threads read 64 of shard 1's loaded keys, each
thread through one of shard 1's three nodes, each with its own pooled HTTP session (Python: the load
is steady, what is measured is latency, as in view_change.py). Latencies of the `--baseline` seconds
before the change and of the change (from the request to its 200) are reported: p50 / p99 / max and
errors (any answer other than 200/201, or no answer within 30 s).

Measured for the change, from the request to its HTTP 200 (the reply comes only after the new member
caught up, in both designs):

  * seconds: the wall time of the request;
  * keys moved: "keys-moved" of GET /kvs/view-change on the coordinator once it answered (keys copied
    between groups; 0 in place), and the ring's count of loaded keys whose shard changes;
  * network bytes: TCP payload between node processes, both directions: every TCP socket of a node
    process whose peer socket also belongs to a node process, its `bytes_sent` from `ss -tinHe`
    (tcp_info), sampled every NET_SAMPLE_S and summed over sockets as the growth from the window's
    start (a socket opened during the window counts from 0). Clients' sockets belong to this process,
    so client requests and answers are not counted; what the clients cause between nodes (Raft
    replication of their writes, requests forwarded to the leader) is. Its share is estimated from
    the baseline window (node-to-node bytes per client operation there x operations during the change)
    and subtracted: "net of the clients". Split by port into Raft (PySyncObj: AppendEntries,
    snapshots; zlib-compressed and encrypted) and node-to-node HTTP (the copy, epochs, forwarding).
    A socket opened and closed between two samples is missed (node-to-node HTTP is pooled keep-alive,
    Raft connections persist). /proc/<pid>/net is per network namespace, not per process: not usable.
  * disk bytes: the sum over node processes of `write_bytes` in /proc/<pid>/io (what they sent to the
    block layer: journals, snapshots, the copy's installs), with the clients' share estimated from the
    baseline per client write and subtracted the same way;
  * the new member's DATA_DIR at the 200 (its journal and snapshot files), and the growth of every
    node's DATA_DIR over the change.

CPU: `CpuMeter` over the baseline and over the change: the nodes' cores, this process (the clients),
and other processes (the shared machine's other load; above 0.2 core the window is marked busy).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import requests

from harness import (CpuMeter, REPO_ROOT, contaminated, cpu_line, fmt, log_tails, percentile, progress,
                     record_command, shielded)
from kvs.config.epoch import ConfigEpoch
from kvs.config.ring import HashRing
from kvs.settings import DEFAULT_RAFT_PORT_OFFSET
from kvs.testing.cluster import LocalCluster, find_free_base_port, wait_until
from size import LOAD_CONNECTIONS, LOADER_LUA_TAIL, run_loader

COPY_COMMIT = "23bf04a"        # the last commit where add-member made a new group and copied keys
SHARDS, REPLICAS = 2, 3
SHARD = "1"                    # the shard that gets the replica
HOT_KEYS = 64                  # the clients' keys: loaded keys of shard 1
CHANGE_TIMEOUT = 900           # seconds: the add-member request is given up after this
CLIENT_TIMEOUT = 30            # seconds per client request
NET_SAMPLE_S = 0.5             # seconds between two `ss` samples of the node-to-node sockets
RAFT_SLOTS = 4                 # Raft ports counted: metadata slot 0 and shard slots 1..3

_LOADER_LUA = """
local keys, bodies = {}, {}
for line in io.lines(%(path)s) do          -- "<key> <value>": a value of its own for every key
  local key, value = line:match("^(%%S+) (%%S+)$")
  keys[#keys + 1] = key
  bodies[#bodies + 1] = '{"value": "' .. value .. '"}'
end
local n, slack = #keys, %(slack)d
local headers = {["Content-Type"] = "application/json"}
local nxt, acked = 0, 0
request = function()
  -- round robin over the keys; wrk 4.1 never sends the first request() result (see size.py): slack
  local i = (nxt %% n) + 1
  nxt = nxt + 1
  return wrk.format("PUT", "/kvs/keys/" .. keys[i], headers, bodies[i])
end
""" + LOADER_LUA_TAIL


# -- the two trees -----------------------------------------------------------------------------------

@dataclass
class Tree:
    """The kvs code one side runs: a directory holding `kvs/`, the Python that runs it, its commit."""
    root: str
    python: str
    commit: str
    uncommitted: list[str]
    how: str
    kvs_last_change: str | None = None      # the last commit that changed kvs/ (a checkout's HEAD may be later)

    def to_dict(self) -> dict:
        return {"root": self.root, "python": self.python, "kvs_commit": self.commit,
                "kvs_last_change": self.kvs_last_change or self.commit,
                "kvs_uncommitted_changes": self.uncommitted, "how": self.how}


def _git(root: str, *args: str) -> str:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True).stdout.strip()


def checkout_tree(root: str) -> Tree:
    """A checkout (this working tree, or --copy-root): its .venv's Python if it has one."""
    root = os.path.abspath(root)
    venv = os.path.join(root, ".venv", "bin", "python")
    python = venv if os.path.exists(venv) else sys.executable
    return Tree(root, python, _git(root, "rev-parse", "HEAD"),
                _git(root, "status", "--porcelain", "--", "kvs").splitlines(), "checkout",
                _git(root, "log", "-1", "--format=%H", "--", "kvs"))


def archived_tree(commit: str, into: str) -> Tree:
    """`git archive <commit> kvs` of this repository into `into`, run by this Python (the dependencies
    did not change between the two commits)."""
    os.makedirs(into, exist_ok=True)
    full = _git(REPO_ROOT, "rev-parse", commit)
    last = _git(REPO_ROOT, "log", "-1", "--format=%H", full, "--", "kvs")
    cmd = f"git -C {REPO_ROOT} archive {full} kvs | tar -x -C {into}"
    record_command(cmd)
    subprocess.run(cmd, shell=True, check=True)
    return Tree(into, sys.executable, full, [], f"git archive {full} kvs", last)


def tree_cluster(root: str, tree: Tree, compaction_entries: int | None = None) -> LocalCluster:
    """A LocalCluster whose nodes run `tree`'s code: its Python, with the tree as PYTHONPATH and as working
    directory (`-m` puts the working directory first on sys.path)."""
    base = find_free_base_port(SHARDS * REPLICAS + 1)          # + the spare
    env = {"PYTHONPATH": tree.root}
    if compaction_entries:
        env["KVS_COMPACTION_ENTRIES"] = str(compaction_entries)
    cluster = LocalCluster(shards=SHARDS, replicas=REPLICAS, data_root=root, base_port=base,
                           secret=secrets.token_hex(16), env=env, python=tree.python, cwd=tree.root)
    record_command(f"cd {tree.root} && {tree.python} -m kvs serve  (x{SHARDS * REPLICAS} + 1 idle spare, env "
                   f"ADDRESS=<one of> VIEW={','.join(cluster.view)} REPL_FACTOR={REPLICAS} "
                   "DATA_DIR=... KVS_SECRET=<random> " + " ".join(f"{k}={v}" for k, v in env.items()) + ")")
    return cluster


# -- keys and loading ----------------------------------------------------------------------------------

def keys_of(ring: HashRing, shard: str, count: int, prefix: str) -> list[str]:
    """The first `count` keys <prefix><i> that `ring` maps to `shard`."""
    out, i = [], 0
    while len(out) < count:
        key = f"{prefix}{i}"
        if ring.group_for(key) == shard:
            out.append(key)
        i += 1
    return out


def random_value(size: int) -> str:
    """`size` characters of base64 of random bytes: a value of its own, which compression cannot shrink
    below 6 bits per character (Raft messages are zlib-compressed; one value repeated would all but vanish)."""
    return base64.b64encode(os.urandom(size)).decode()[:size]


def load_keys(root: str, name: str, base_url: str, keys: list[str], value_size: int) -> dict:
    """PUT every key once (at least), each with a random value, with wrk; returns the loader's summary."""
    key_file = os.path.join(root, f"{name}.keys")
    with open(key_file, "w") as f:
        f.writelines(f"{k} {random_value(value_size)}\n" for k in keys)
    script = os.path.join(root, f"{name}.lua")
    with open(script, "w") as f:
        f.write(_LOADER_LUA % {"path": json.dumps(key_file), "slack": LOAD_CONNECTIONS})
    return run_loader(script, base_url, len(keys))


def key_count(address: str) -> int:
    return requests.get(f"http://{address}/kvs/key-count", timeout=10).json()["key-count"]


def answers(address: str) -> bool:
    """The node serves HTTP (an idle node's /health is a 503 "idle")."""
    try:
        return requests.get(f"http://{address}/health", timeout=2).status_code in (200, 503)
    except requests.RequestException:
        return False


def status(address: str, digest: bool = False) -> dict:
    return requests.get(f"http://{address}/kvs/status" + ("?digest=1" if digest else ""), timeout=60).json()


# -- the clients -------------------------------------------------------------------------------------

class Clients:
    """Writer and reader threads on shard 1's hot keys, each through one of `nodes`, until stopped."""

    def __init__(self, nodes: list[str], keys: list[str], writers: int, readers: int, value_size: int):
        self.ops: list[tuple[float, float, int, str]] = []       # (start, seconds, status, "write"|"read")
        self._stop = threading.Event()
        self._value_size = value_size
        kinds = ["write"] * writers + ["read"] * readers
        self._threads = [threading.Thread(target=self._run, args=(kind, nodes[i % len(nodes)], keys[i::len(kinds)]),
                                          name=f"member-add-{kind}-{i}", daemon=True)
                         for i, kind in enumerate(kinds)]

    def start(self) -> "Clients":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT + 5)

    def _run(self, kind: str, node: str, keys: list[str]) -> None:
        session = requests.Session()
        i = 0
        while not self._stop.is_set():
            key = keys[i % len(keys)]
            i += 1
            url = f"http://{node}/kvs/keys/{key}"
            start = time.monotonic()
            try:
                if kind == "write":
                    code = session.put(url, json={"value": random_value(self._value_size)},
                                       timeout=CLIENT_TIMEOUT).status_code
                else:
                    code = session.get(url, timeout=CLIENT_TIMEOUT).status_code
            except requests.RequestException:
                code = 0
            self.ops.append((start, time.monotonic() - start, code, kind))

    def window(self, t0: float, t1: float) -> list[tuple[float, float, int, str]]:
        return [op for op in list(self.ops) if t0 <= op[0] < t1]


def summarize(ops: list, seconds: float) -> dict:
    out = {}
    for kind in ("write", "read", "all"):
        mine = [op for op in ops if kind == "all" or op[3] == kind]
        ok = [lat for _, lat, code, _ in mine if code in (200, 201)]
        ms = lambda v: round(v * 1000, 1) if v is not None else None     # noqa: E731
        out[kind] = {"ops": len(mine), "ok": len(ok), "errors": len(mine) - len(ok),
                     "ok_per_s": round(len(ok) / seconds, 1) if seconds > 0 else None,
                     "p50_ms": ms(percentile(ok, 50)), "p99_ms": ms(percentile(ok, 99)),
                     "max_ms": ms(max(ok) if ok else None),
                     "error_codes": {str(c): n for c, n in sorted(_count(code for _, _, code, _ in mine
                                                                         if code not in (200, 201)).items())}}
    return out


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


# -- bytes: disk and network -----------------------------------------------------------------------------

def write_bytes(pids: list[int]) -> dict[int, int]:
    """write_bytes of /proc/<pid>/io of each live process."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                out[pid] = next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass
    return out


def socket_inodes(pids: list[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


_SS_LINE = re.compile(r"^\S+\s+\S+\s+(\S+):(\d+)\s+(\S+):(\d+)\s+.*?\bino:(\d+)")


class NetMeter:
    """Node-to-node TCP payload (bytes_sent of both ends) between `start()` and `stop()`, from `ss`.

    Sockets are those of the cluster's ports (HTTP and Raft) owned by a node process (inode in its
    /proc/<pid>/fd) whose peer socket is owned by a node process too."""

    def __init__(self, pids: list[int], http_ports: list[int], raft_offset: int = DEFAULT_RAFT_PORT_OFFSET):
        self.pids = list(pids)
        self.raft_ports = {p + raft_offset * (slot + 1) for p in http_ports for slot in range(RAFT_SLOTS)}
        ports = sorted(set(http_ports) | self.raft_ports)
        terms = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
        self._cmd = ["ss", "-tinHe", "state", "established", f"( {terms} )"]
        self._base: dict[int, int] = {}          # inode -> bytes_sent when first seen (0 if new in the window)
        self._last: dict[int, tuple[int, bool]] = {}   # inode -> (bytes_sent, raft?)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0

    def _sample(self) -> dict[int, tuple[int, bool]]:
        out = subprocess.run(self._cmd, capture_output=True, text=True, timeout=10).stdout
        owned = socket_inodes(self.pids)
        rows: dict[tuple, tuple[int, int, bool]] = {}
        pairs: list[list[str]] = []
        for line in out.splitlines():           # a socket's line, then its tcp_info line (indented)
            if line[:1].isspace() and pairs:
                pairs[-1][1] += " " + line
            elif line.strip():
                pairs.append([line, ""])
        for head, info in pairs:
            m = _SS_LINE.match(head)
            if not m:
                continue
            local, lport, peer, pport, ino = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
            sent = re.search(r"\bbytes_sent:(\d+)", info)
            rows[(local, lport, peer, pport)] = (ino, int(sent.group(1)) if sent else 0,
                                                 lport in self.raft_ports or pport in self.raft_ports)
        found = {}
        for (local, lport, peer, pport), (ino, sent, raft) in rows.items():
            peer_row = rows.get((peer, pport, local, lport))
            if ino in owned and peer_row is not None and peer_row[0] in owned:
                found[ino] = (sent, raft)
        self.samples += 1
        return found

    def start(self) -> "NetMeter":
        first = self._sample()
        self._base = {ino: sent for ino, (sent, _) in first.items()}
        self._last = dict(first)
        self._thread = threading.Thread(target=self._loop, name="member-add-ss", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(NET_SAMPLE_S):
            self._merge(self._sample())

    def _merge(self, found: dict[int, tuple[int, bool]]) -> None:
        for ino, (sent, raft) in found.items():
            self._base.setdefault(ino, 0)
            self._last[ino] = (sent, raft)

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        self._merge(self._sample())
        raft = sum(sent - self._base[ino] for ino, (sent, r) in self._last.items() if r)
        http = sum(sent - self._base[ino] for ino, (sent, r) in self._last.items() if not r)
        return {"bytes": raft + http, "raft_bytes": raft, "http_bytes": http, "sockets": len(self._last),
                "samples": self.samples}


class Meters:
    """CPU, node-to-node network and disk writes of the nodes over one window."""

    def __init__(self, pids: list[int], http_ports: list[int]):
        self.cpu = CpuMeter(pids)
        self.net = NetMeter(pids, http_ports)
        self.pids = pids

    def start(self) -> "Meters":
        self._disk0 = write_bytes(self.pids)
        self.net.start()
        self.cpu.start()
        return self

    def stop(self) -> dict:
        cpu = self.cpu.stop()
        disk1 = write_bytes(self.pids)
        net = self.net.stop()
        disk = {str(pid): disk1[pid] - self._disk0.get(pid, 0) for pid in disk1}
        return {"cpu": cpu, "network": net, "disk_write_bytes": sum(disk.values()),
                "disk_write_bytes_by_pid": disk}


# -- one side ------------------------------------------------------------------------------------------

def data_dirs(cluster: LocalCluster) -> dict[str, dict]:
    """Bytes of every node's DATA_DIR, and of each file in it (a directory per group: journal, snapshot)."""
    out = {}
    for address, node in cluster.nodes.items():
        files = {}
        for top, _, names in os.walk(node.data_dir):
            for name in names:
                path = os.path.join(top, name)
                try:
                    files[os.path.relpath(path, node.data_dir)] = os.path.getsize(path)
                except FileNotFoundError:        # compaction renames files while we walk
                    pass
        out[address] = {"bytes": sum(files.values()), "files": dict(sorted(files.items()))}
    return out


def watch_progress(address: str, stop: threading.Event, t0: float, out: list) -> None:
    """GET /kvs/view-change on the coordinator every 0.5 s: a timeline of its phases."""
    session = requests.Session()
    while not stop.wait(0.5):
        try:
            body = session.get(f"http://{address}/kvs/view-change", timeout=5).json()
        except (requests.RequestException, ValueError):
            continue
        p = body.get("progress") or {}
        entry = {"t": round(time.monotonic() - t0, 2), "phase": p.get("phase"), "keys_moved": p.get("keys-moved"),
                 "members_done": p.get("member-changes-done")}
        if not out or {k: v for k, v in out[-1].items() if k != "t"} != {k: v for k, v in entry.items() if k != "t"}:
            out.append(entry)


def run_side(name: str, root: str, tree: Tree, keys: int, other_keys: int, value_size: int, baseline: float,
             writers: int, readers: int, compaction_entries: int | None = None) -> dict:
    progress(f"member-add/{name}: {SHARDS} shards x {REPLICAS} replicas + 1 idle spare, kvs {tree.commit[:7]} "
             f"({tree.root})")
    cluster = tree_cluster(root, tree, compaction_entries)
    out: dict = {"tree": tree.to_dict()}
    try:
        cluster.start()
        cluster.wait_healthy(timeout=60)
        spare = cluster.add_idle_node(cluster.base_port + SHARDS * REPLICAS)
        wait_until(lambda: cluster.alive(spare) and answers(spare), timeout=60, message=f"{spare} serves (idle)")
        leaders = {s: wait_until(lambda s=s: cluster.leader_of(s), timeout=30, message=f"shard {s} leader")
                   for s in ("1", "2")}
        ring = ConfigEpoch.initial(tuple(cluster.view), REPLICAS).ring
        shard_keys = {"1": keys_of(ring, "1", keys, "ma-"), "2": keys_of(ring, "2", other_keys, "ma-")}
        out["load"] = {}
        for sid, ks in shard_keys.items():
            if not ks:
                continue
            progress(f"member-add/{name}: loading {len(ks):,} keys of shard {sid} through its leader {leaders[sid]}")
            out["load"][sid] = load_keys(root, f"load-{sid}", f"http://{leaders[sid]}", ks, value_size)
            wait_until(lambda sid=sid, ks=ks: key_count(leaders[sid]) == len(ks), timeout=60,
                       message=f"shard {sid} holds {len(ks)} keys")
            progress(f"  {out['load'][sid]['keys_per_s']:,} keys/s")
        shard1 = cluster.replicas_of(SHARD)
        pids = [n.process.pid for n in cluster.nodes.values()]
        ports = [int(a.rsplit(":", 1)[1]) for a in cluster.nodes]
        leader_status = status(leaders[SHARD])["groups"][f"shard-{SHARD}"]
        out["before"] = {"leader": leaders[SHARD], "leader_group": leader_status, "data_dirs": data_dirs(cluster)}

        hot = shard_keys[SHARD][:HOT_KEYS]
        clients = Clients(shard1, hot, writers, readers, value_size).start()
        try:
            time.sleep(2.0)                         # warm-up: sessions connected, steady state
            progress(f"member-add/{name}: baseline, {baseline:g} s of clients without a change")
            meters = Meters(pids, ports).start()
            t0 = time.monotonic()
            time.sleep(baseline)
            t1 = time.monotonic()
            out["baseline"] = dict(meters.stop(), seconds=round(t1 - t0, 2),
                                   clients=summarize(clients.window(t0, t1), t1 - t0))
            progress("  " + cpu_line(out["baseline"]["cpu"], "kvs"))

            coordinator = cluster.view[SHARDS * REPLICAS - 1]          # a node of shard 2
            progress(f"member-add/{name}: PUT /kvs/view-change/add-member {spare} -> shard {SHARD} via {coordinator}")
            body = {"address": spare, "shard-id": SHARD}
            record_command(f"curl -X PUT http://{coordinator}/kvs/view-change/add-member -d '{json.dumps(body)}'")
            timeline: list = []
            stop_watch = threading.Event()
            meters = Meters(pids, ports).start()
            t0 = time.monotonic()
            watcher = threading.Thread(target=watch_progress, args=(coordinator, stop_watch, t0, timeline), daemon=True)
            watcher.start()
            try:
                resp = requests.put(f"http://{coordinator}/kvs/view-change/add-member", json=body,
                                    timeout=CHANGE_TIMEOUT)
            finally:
                t1 = time.monotonic()
                stop_watch.set()
            change = dict(meters.stop(), seconds=round(t1 - t0, 2), clients=summarize(clients.window(t0, t1), t1 - t0))
            watcher.join(10)
            change["data_dirs_at_reply"] = data_dirs(cluster)
        finally:
            clients.stop()
        change["status"] = resp.status_code
        change["reply"] = resp.json()
        change["timeline"] = timeline
        change["progress"] = requests.get(f"http://{coordinator}/kvs/view-change", timeout=10).json().get("progress")
        progress(f"  HTTP {resp.status_code} after {change['seconds']} s, keys moved "
                 f"{(change['progress'] or {}).get('keys-moved')}; " + cpu_line(change["cpu"], "kvs"))
        if resp.status_code != 200:
            raise RuntimeError(f"add-member answered {resp.status_code}: {resp.text[:500]}")
        new_shards = {s["shard-id"]: s for s in change["reply"]["shards"]}
        new_ring = HashRing(new_shards.keys())
        change["ring_moved_keys"] = {sid: sum(new_ring.group_for(k) != sid for k in ks)
                                     for sid, ks in shard_keys.items()}
        change["spare"] = spare
        change["spare_status"] = {g: {k: v for k, v in st.items() if k in ("role", "key-count", "members",
                                                                             "last-applied", "commit-index")}
                                  for g, st in status(spare, digest=True)["groups"].items()}
        change["shards_after"] = {sid: {"replicas": s["replicas"], "key-count": s.get("key-count")}
                                  for sid, s in new_shards.items()}
        spare_keys = {g: st.get("key-count") for g, st in change["spare_status"].items() if g.startswith("shard-")}
        change["checks"] = {
            "keys after = keys loaded": sum(s["key-count"] or 0 for s in new_shards.values()) == keys + other_keys,
            "the new member holds its shard's keys": len(spare_keys) == 1 and all(
                n == new_shards[g.split("-", 1)[1]]["key-count"] for g, n in spare_keys.items()),
        }
        for check, ok in change["checks"].items():
            if not ok:
                progress(f"  WARNING: check failed: {check} (shards {change['shards_after']}, new member {spare_keys})")
        out["change"] = change
        out["derived"] = derive(out, spare)
        d = out["derived"]
        progress(f"  network {fmt(d['network_mib'], 1)} MiB ({fmt(d['network_net_mib'], 1)} net of the clients), "
                 f"disk {fmt(d['disk_mib'], 1)} MiB ({fmt(d['disk_net_mib'], 1)} net), new member's DATA_DIR "
                 f"{fmt(d['spare_data_dir_mib'], 1)} MiB; clients p99 {change['clients']['all']['p99_ms']} ms "
                 f"(baseline {out['baseline']['clients']['all']['p99_ms']}), errors {change['clients']['all']['errors']}")
        return out
    except Exception:
        log_tails(cluster)
        raise
    finally:
        progress(f"member-add/{name}: stopping the cluster")
        shielded(cluster.stop)


def derive(side: dict, spare: str) -> dict:
    """The change's bytes, raw and net of the clients' share (estimated from the baseline)."""
    base, change = side["baseline"], side["change"]
    b_ops, b_writes = base["clients"]["all"]["ops"], base["clients"]["write"]["ops"]
    c_ops, c_writes = change["clients"]["all"]["ops"], change["clients"]["write"]["ops"]
    net_per_op = base["network"]["bytes"] / b_ops if b_ops else 0.0
    disk_per_write = base["disk_write_bytes"] / b_writes if b_writes else 0.0
    mib = lambda b: round(b / 2**20, 2)      # noqa: E731
    before, after = side["before"]["data_dirs"], change["data_dirs_at_reply"]
    growth = sum(after[a]["bytes"] - before.get(a, {}).get("bytes", 0) for a in after)
    keys_moved = (change.get("progress") or {}).get("keys-moved")
    leader_files = before[side["before"]["leader"]]["files"]
    return {"seconds": change["seconds"], "keys_moved": keys_moved,
            "leader_log_entries": side["before"]["leader_group"].get("log-length"),
            "leader_snapshot_mib": mib(sum(b for f, b in leader_files.items()
                                           if f.startswith(f"shard-{SHARD}{os.sep}") and "snapshot" in f)),
            "ring_moved_keys": sum(change["ring_moved_keys"].values()),
            "network_mib": mib(change["network"]["bytes"]),
            "network_raft_mib": mib(change["network"]["raft_bytes"]),
            "network_http_mib": mib(change["network"]["http_bytes"]),
            "network_clients_share_mib": mib(net_per_op * c_ops),
            "network_net_mib": mib(change["network"]["bytes"] - net_per_op * c_ops),
            "disk_mib": mib(change["disk_write_bytes"]),
            "disk_clients_share_mib": mib(disk_per_write * c_writes),
            "disk_net_mib": mib(change["disk_write_bytes"] - disk_per_write * c_writes),
            "spare_data_dir_mib": mib(after[spare]["bytes"]),
            "data_dir_growth_mib": mib(growth),
            "shard_ids_after": sorted(change["shards_after"]),
            "checks_passed": all(change.get("checks", {}).values()),
            "other_cores": change["cpu"]["other_cores"], "busy": contaminated(change["cpu"]) or
            contaminated(base["cpu"])}


def run(root: str, keys: int, other_keys: int | None, value_size: int, baseline: float, writers: int, readers: int,
        copy_root: str | None = None, copy_commit: str = COPY_COMMIT, sides: tuple[str, ...] = ("in place", "copy"),
        compaction_entries: int | None = None) -> dict:
    other = keys if other_keys is None else other_keys
    try:
        trees = {}
        if "in place" in sides:
            trees["in place"] = checkout_tree(REPO_ROOT)
        if "copy" in sides:
            trees["copy"] = (checkout_tree(copy_root) if copy_root else
                             archived_tree(copy_commit, os.path.join(root, f"kvs-{copy_commit}")))
        out = {"settings": {"shards": SHARDS, "replicas": REPLICAS, "shard": SHARD, "keys_in_shard": keys,
                            "keys_in_other_shard": other, "value_bytes": value_size, "baseline_s": baseline,
                            "writers": writers, "readers": readers, "hot_keys": HOT_KEYS,
                            "net_sample_s": NET_SAMPLE_S, "compaction_entries": compaction_entries},
               "sides": {}}
        for name, tree in trees.items():
            out["sides"][name] = run_side(name, os.path.join(root, name.replace(" ", "-")), tree, keys, other,
                                          value_size, baseline, writers, readers, compaction_entries)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)
