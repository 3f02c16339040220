"""ClusterDriver: what a chaos run needs from a kvs cluster, whatever runs its nodes.

Two backends implement it: `ProcessDriver` (local processes; fast, for
developers) and `DockerDriver` (`docker_driver.py`: one container per node on a
network the test creates; what CI runs). A node is named by its ADDRESS (the
address in VIEW); the test process reaches it at `client_address(node)`, always
on 127.0.0.x.

Faults, each with its heal: kill/start_node (SIGKILL, then start again on the
same data), pause/resume (SIGSTOP/SIGCONT, or docker pause), isolate/heal
(cut every packet between the node and the other nodes; in the process backend
with iptables rules on the node's own loopback IP, in Docker by disconnecting
it from the network).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from abc import ABC, abstractmethod

import requests

from kvs.local import LocalCluster, find_free_base_port, wait_until

SECRET = "kvs-chaos-secret"


class ClusterDriver(ABC):
    shards: int
    replicas: int

    @abstractmethod
    def start(self) -> None: ...
    @abstractmethod
    def stop(self) -> None: ...
    @abstractmethod
    def nodes(self) -> list[str]: ...
    @abstractmethod
    def client_address(self, node: str) -> str: ...
    @abstractmethod
    def kill(self, node: str) -> None: ...
    @abstractmethod
    def start_node(self, node: str) -> None: ...
    @abstractmethod
    def pause(self, node: str) -> None: ...
    @abstractmethod
    def resume(self, node: str) -> None: ...
    @abstractmethod
    def isolate(self, node: str) -> None: ...
    @abstractmethod
    def heal(self, node: str) -> None: ...
    @abstractmethod
    def logs(self, node: str) -> str: ...

    # -- observation, shared by every backend --------------------------------------------

    def replicas_of(self, shard_id: str) -> list[str]:
        index = int(shard_id) - 1
        return self.nodes()[index * self.replicas:(index + 1) * self.replicas]

    def http(self, node: str, path: str, timeout: float = 2.0) -> tuple[int, dict]:
        resp = requests.get(f"http://{self.client_address(node)}{path}", timeout=timeout)
        return resp.status_code, resp.json()

    def healthy(self, node: str) -> bool:
        try:
            return self.http(node, "/health")[0] == 200
        except (requests.RequestException, ValueError):
            return False

    def wait_healthy(self, nodes: list[str] | None = None, timeout: float = 60.0) -> None:
        for node in nodes or self.nodes():
            wait_until(lambda: self.healthy(node), timeout, message=f"{node} healthy")

    def group_status(self, node: str, shard_id: str, digest: bool = False) -> dict | None:
        try:
            status = self.http(node, "/kvs/status?digest=1" if digest else "/kvs/status", timeout=5)[1]
        except (requests.RequestException, ValueError):
            return None
        return status.get("groups", {}).get(f"shard-{shard_id}")

    def leader_of(self, shard_id: str) -> str | None:
        for node in self.replicas_of(shard_id):
            group = self.group_status(node, shard_id)
            if group and group["role"] == "leader":
                return node
        return None


class ProcessDriver(ClusterDriver):
    """Nodes as local processes, each on its own loopback IP (127.0.0.10, .11, ...)."""

    def __init__(self, shards: int, replicas: int, root: str | None = None, **env: str):
        self.shards, self.replicas = shards, replicas
        self._root = root or tempfile.mkdtemp(prefix="kvs-chaos-")
        self._cluster = LocalCluster(shards, replicas, self._root, base_port=find_free_base_port(1),
                                     secret=SECRET, env=env, distinct_hosts=True)
        self._chain = f"KVSCHAOS{os.getpid()}"

    def start(self) -> None:
        _iptables("-N", self._chain)
        _iptables("-I", "INPUT", "-j", self._chain)
        self._cluster.start()

    def stop(self) -> None:
        self._cluster.stop()
        _iptables("-D", "INPUT", "-j", self._chain, check=False)
        _iptables("-F", self._chain, check=False)
        _iptables("-X", self._chain, check=False)

    def nodes(self) -> list[str]:
        return list(self._cluster.view)

    def client_address(self, node: str) -> str:
        return node

    def kill(self, node: str) -> None:
        self._cluster.kill(node)

    def start_node(self, node: str) -> None:
        self._cluster.start_node(node)

    def pause(self, node: str) -> None:
        self._cluster.pause(node)

    def resume(self, node: str) -> None:
        self._cluster.resume(node)

    def isolate(self, node: str) -> None:
        """Drop every packet between this node's IP and the other nodes' IPs (clients on 127.0.0.1 still reach it)."""
        for rule in self._isolation_rules(node):
            _iptables("-A", self._chain, *rule)

    def heal(self, node: str) -> None:
        for rule in self._isolation_rules(node):
            _iptables("-D", self._chain, *rule, check=False)

    def _isolation_rules(self, node: str) -> list[tuple[str, ...]]:
        ip = node.split(":")[0]
        others = {other.split(":")[0] for other in self.nodes()} - {ip}
        return [rule for other in sorted(others)
                for rule in (("-s", ip, "-d", other, "-j", "DROP"), ("-s", other, "-d", ip, "-j", "DROP"))]

    def logs(self, node: str) -> str:
        return self._cluster.log_tail(node, 200)


def _iptables(*args: str, check: bool = True) -> None:
    result = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)}: {result.stderr.strip()}")


def iptables_usable() -> bool:
    try:
        return subprocess.run(["iptables", "-w", "-L", "-n"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False
