"""LocalCluster: a whole kvs cluster as local processes on 127.0.0.1.

Used by `kvs local up` and by the test suite. Each node is a real `python -m
kvs serve` process with its own DATA_DIR and log file; the cluster can kill,
stop, continue and restart any of them, always by the pid it started.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import requests

from kvs.settings import DEFAULT_RAFT_PORT_OFFSET

MAX_SLOTS_PROBED = 3      # metadata + the first shard slots; enough to find a free port window


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               message: str = "condition") -> object:
    """Poll `predicate` until it returns a truthy value; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:          # the predicate may fail while the cluster settles
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not reached within {timeout}s (last error: {last_error!r})")
        time.sleep(interval)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_free_base_port(count: int, start: int = 20000, stop: int = 30000, step: int = 37,
                        offset: int = DEFAULT_RAFT_PORT_OFFSET) -> int:
    """A base port such that `count` consecutive HTTP ports and their Raft ports are free.

    The search starts at a random point so that concurrent test runs rarely pick the same window.
    """
    first = random.randrange(start, stop)
    for base in list(range(first, stop, step)) + list(range(start, first, step)):
        ports = [base + i + offset * slot for i in range(count) for slot in range(MAX_SLOTS_PROBED)]
        if all(_port_free(p) for p in ports):
            return base
    raise RuntimeError("no free port window found")


@dataclass
class LocalProcess:
    address: str
    view: str
    data_dir: str
    log_path: str
    process: subprocess.Popen | None = None


@dataclass
class LocalCluster:
    shards: int
    replicas: int
    data_root: str
    base_port: int = 13800
    secret: str | None = None
    env: dict = field(default_factory=dict)
    # One loopback IP per node (127.0.N.10, .11, ...) on the same port, instead of consecutive ports
    # on 127.0.0.1: lets a test cut one node off with packet filters on its IP. N comes from the
    # test process's pid, so two runs on one machine (a soak beside the test suite) do not filter
    # each other's nodes.
    distinct_hosts: bool = False
    host_prefix: str = field(default_factory=lambda: f"127.0.{os.getpid() % 250 + 1}")
    nodes: dict[str, LocalProcess] = field(default_factory=dict)
    # The Python that runs `-m kvs serve`, and its working directory (first on sys.path for `-m`):
    # another checkout's, to run its code (benchmarks compare two commits side by side).
    python: str = sys.executable
    cwd: str | None = None

    def __post_init__(self) -> None:
        count = self.shards * self.replicas
        if self.distinct_hosts:
            self.view = [f"{self.host_prefix}.{10 + i}:{self.base_port}" for i in range(count)]
        else:
            self.view = [f"127.0.0.1:{self.base_port + i}" for i in range(count)]
        for address in self.view:
            self._define(address, ",".join(self.view))

    def _define(self, address: str, view: str) -> LocalProcess:
        name = address.replace(":", "_")
        node = LocalProcess(address, view, os.path.join(self.data_root, name),
                            os.path.join(self.data_root, "logs", f"{name}.log"))
        self.nodes[address] = node
        return node

    # -- processes --------------------------------------------------------------------

    def start(self) -> "LocalCluster":
        for address in self.view:
            self.start_node(address)
        return self

    def add_idle_node(self, port: int) -> str:
        """Define and start a node that is not in the view (it must stay idle); returns once it serves
        HTTP (/livez: an idle node is live, not ready), so that a view change may name it at once."""
        address = f"127.0.0.1:{port}"
        self._define(address, ",".join(self.view))
        self.start_node(address)
        wait_until(lambda: self._live(address), 30, message=f"idle node {address} serves")
        return address

    def _live(self, address: str) -> bool:
        try:
            return self.alive(address) and self.http(address, "/livez")[0] == 200
        except requests.RequestException:
            return False

    def define_spare_node(self) -> str:
        """Define (not start) a node addressed like the view's nodes, after the last one defined.

        It is started, like every node, with the cluster's VIEW, which does not contain it: it
        stays idle until a view change names it. Unlike `add_idle_node`, it follows
        `distinct_hosts` (its own loopback IP), so packet filters can cut it off like any node.
        """
        index = len(self.nodes)
        if self.distinct_hosts:
            address = f"{self.host_prefix}.{10 + index}:{self.base_port}"
        else:
            address = f"127.0.0.1:{self.base_port + index}"
        self._define(address, ",".join(self.view))
        return address

    def start_node(self, address: str) -> None:
        node = self.nodes[address]
        os.makedirs(os.path.dirname(node.log_path), exist_ok=True)
        env = dict(os.environ, ADDRESS=address, VIEW=node.view, REPL_FACTOR=str(self.replicas),
                   DATA_DIR=node.data_dir, PYTHONUNBUFFERED="1", **self.env)
        if self.secret:
            env["KVS_SECRET"] = self.secret
        else:
            env.pop("KVS_SECRET", None)
        with open(node.log_path, "ab") as log:
            node.process = subprocess.Popen([self.python, "-m", "kvs", "serve"], env=env, cwd=self.cwd,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def signal(self, address: str, sig: int) -> None:
        process = self.nodes[address].process
        if process is not None and process.poll() is None:
            process.send_signal(sig)

    def kill(self, address: str) -> None:
        """SIGKILL the node and wait until it is gone."""
        process = self.nodes[address].process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    def pause(self, address: str) -> None:
        self.signal(address, signal.SIGSTOP)

    def resume(self, address: str) -> None:
        self.signal(address, signal.SIGCONT)

    def restart(self, address: str) -> None:
        self.kill(address)
        self.start_node(address)

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
                node.process.terminate()
        for node in self.nodes.values():
            if node.process is not None:
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(timeout=10)

    def alive(self, address: str) -> bool:
        process = self.nodes[address].process
        return process is not None and process.poll() is None

    # -- observation --------------------------------------------------------------------

    def replicas_of(self, shard_id: str) -> list[str]:
        index = int(shard_id) - 1
        return self.view[index * self.replicas:(index + 1) * self.replicas]

    def http(self, address: str, path: str, timeout: float = 2.0) -> tuple[int, dict]:
        resp = requests.get(f"http://{address}{path}", timeout=timeout)
        return resp.status_code, resp.json()

    def healthy(self, address: str) -> bool:
        """Our own process for `address` is running and answers /health with 200."""
        if not self.alive(address):
            return False
        try:
            return self.http(address, "/health")[0] == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, addresses: list[str] | None = None, timeout: float = 30.0) -> None:
        for address in addresses or self.view:
            wait_until(lambda: self.healthy(address), timeout, message=f"{address} healthy")

    def leader_of(self, shard_id: str) -> str | None:
        """HTTP address of the shard's leader, if a live replica reports itself as leader."""
        for address in self.replicas_of(shard_id):
            if not self.alive(address):
                continue
            try:
                group = self.http(address, "/kvs/status")[1]["groups"].get(f"shard-{shard_id}")
            except (requests.RequestException, ValueError, KeyError):
                continue
            if group and group["role"] == "leader":
                return address
        return None

    def log_tail(self, address: str, lines: int = 30) -> str:
        try:
            with open(self.nodes[address].log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return ""
