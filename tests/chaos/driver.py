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

Spare nodes: a driver made with `spares=k` also starts k nodes with the same
VIEW, which does not contain them, so they stay idle until a view change names
them (`nodes()` is the initial VIEW, `spare_nodes()` the rest). Which node
serves which shard is not fixed: `current_epoch()` asks the cluster (the
metadata members, i.e. the initial VIEW) for the configuration it runs now.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import replace

import requests

from kvs.routing.peers import FORWARDED, REQUEST_ID, SIGNATURE, sign
from kvs.testing.cluster import LocalCluster, find_free_base_port, wait_until
from kvs.config.epoch import ConfigEpoch

SECRET = "kvs-chaos-secret"


class ClusterDriver(ABC):
    shards: int            # of the initial VIEW
    replicas: int          # REPL_FACTOR of the initial VIEW

    @abstractmethod
    def start(self) -> None: ...
    @abstractmethod
    def stop(self) -> None: ...
    @abstractmethod
    def nodes(self) -> list[str]:
        """The initial VIEW (every node of it is a metadata member, see kvs.config.epoch)."""
    @abstractmethod
    def spare_nodes(self) -> list[str]:
        """Nodes started idle (outside the initial VIEW), for view changes to add."""
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
    def logs(self, node: str, lines: int | None = 200) -> str:
        """The node's log output: the last `lines` lines, or all of it."""

    def all_nodes(self) -> list[str]:
        return self.nodes() + self.spare_nodes()

    # -- observation, shared by every backend --------------------------------------------

    def http(self, node: str, path: str, timeout: float = 2.0) -> tuple[int, dict]:
        resp = requests.get(f"http://{self.client_address(node)}{path}", timeout=timeout)
        return resp.status_code, resp.json()

    def healthy(self, node: str) -> bool:
        try:
            return self.http(node, "/health")[0] == 200
        except (requests.RequestException, ValueError):
            return False

    def ready(self, node: str) -> bool:
        """Healthy, or idle and answering (an idle node is 'unavailable' by design)."""
        try:
            status, body = self.http(node, "/health")
        except (requests.RequestException, ValueError):
            return False
        return status == 200 or str(body.get("reason", "")).startswith("idle")

    def wait_healthy(self, nodes: list[str] | None = None, timeout: float = 60.0) -> None:
        """The given nodes healthy; without a list, every node started ready in its role."""
        if nodes is None:
            self.wait_ready(self.all_nodes(), timeout)
        for node in nodes or ():
            wait_until(lambda: self.healthy(node), timeout, message=f"{node} healthy")

    def wait_ready(self, nodes: list[str], timeout: float = 60.0) -> None:
        """The given nodes ready in their role: healthy, or idle and answering."""
        for node in nodes:
            wait_until(lambda: self.ready(node), timeout, message=f"{node} healthy")

    def group_status(self, node: str, shard_id: str, digest: bool = False) -> dict | None:
        try:
            status = self.http(node, "/kvs/status?digest=1" if digest else "/kvs/status", timeout=5)[1]
        except (requests.RequestException, ValueError):
            return None
        return status.get("groups", {}).get(f"shard-{shard_id}")

    def known_epochs(self, node: str, timeout: float = 2.0) -> dict | None:
        """{"active", "pending", "metadata-member"} as `node` knows them (GET /internal/epochs,
        signed with the cluster secret as a node would), or None if it does not answer."""
        path, request_id = "/internal/epochs", uuid.uuid4().hex
        headers = {FORWARDED: "1", REQUEST_ID: request_id}
        headers[SIGNATURE] = sign(SECRET, "GET", path, headers, b"", to=node)
        try:
            resp = requests.get(f"http://{self.client_address(node)}{path}", headers=headers, timeout=timeout)
            return resp.json() if resp.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None

    def epoch_of(self, node: str, timeout: float = 2.0) -> ConfigEpoch | None:
        """The active epoch `node` routes by."""
        known = _with_active(self.known_epochs(node, timeout))
        return ConfigEpoch.from_dict(known["active"]) if known else None

    def current_epoch(self) -> ConfigEpoch | None:
        """The newest active epoch any metadata member reports (None if none answers)."""
        return _newest(e for e in (self.epoch_of(node, timeout=1.5) for node in self.nodes()) if e is not None)

    def settled_epoch(self, limit: float = 10.0) -> ConfigEpoch | None:
        """The newest active epoch the metadata members report, the silent ones asked again
        (`gathered_answers`): a verdict on it (the epoch a change settled on, the final one) must rest
        neither on one round of lost requests nor on a lagging member that alone happened to answer."""
        return _newest(gathered_answers(self.epoch_of, self.nodes(), limit))

    def settled_planning_base(self, limit: float = 5.0) -> ConfigEpoch | None:
        """The current epoch as a coordinator plans from it (new shard ids follow every id any plan used,
        a rolled-back plan's too), from the members' answers gathered as `settled_epoch` gathers them:
        the plan a check expects follows it."""
        return _planning_base(gathered_answers(lambda node, timeout: _with_active(self.known_epochs(node, timeout)),
                                               self.nodes(), limit))

    def replicas_of(self, shard_id: str) -> list[str]:
        """The shard's replicas in the current epoch ([] if it has no such shard or nobody answers)."""
        epoch = self.current_epoch()
        return list(epoch.shards.get(shard_id, ())) if epoch is not None else []

    def leader_of(self, shard_id: str) -> str | None:
        for node in self.replicas_of(shard_id):
            group = self.group_status(node, shard_id)
            if group and group["role"] == "leader":
                return node
        return None

    # -- view changes --------------------------------------------------------------------

    def change_view(self, node: str, view: list[str], repl_factor: int, timeout: float) -> tuple[int, dict]:
        """PUT /kvs/view-change to `node` (which coordinates it); blocks until it answers."""
        return self._put(node, "/kvs/view-change", {"view": ",".join(view), "repl-factor": repl_factor}, timeout)

    def remove_member(self, node: str, address: str, timeout: float) -> tuple[int, dict]:
        """PUT /kvs/view-change/remove-member to `node`: `address` (alive or dead) leaves the view."""
        return self._put(node, "/kvs/view-change/remove-member", {"address": address}, timeout)

    def add_member(self, node: str, address: str, shard_id: str, timeout: float) -> tuple[int, dict]:
        """PUT /kvs/view-change/add-member to `node`: the idle node `address` joins shard `shard_id`."""
        return self._put(node, "/kvs/view-change/add-member", {"address": address, "shard-id": shard_id}, timeout)

    def _put(self, node: str, path: str, body: dict, timeout: float) -> tuple[int, dict]:
        resp = requests.put(f"http://{self.client_address(node)}{path}", json=body, timeout=timeout)
        try:
            return resp.status_code, resp.json()
        except ValueError:
            return resp.status_code, {"raw": resp.text}

    def view_change_phase(self, node: str, timeout: float = 2.0) -> tuple[bool, str | None]:
        """(answered, phase) from GET /kvs/view-change; only metadata members know the phase."""
        body = self.view_change_status(node, timeout)
        return body is not None, body.get("phase") if body is not None else None

    def view_change_status(self, node: str, timeout: float = 2.0) -> dict | None:
        """GET /kvs/view-change: the change recorded in the metadata group ("phase"), and this
        node's own part in one ("progress": as coordinator, or as the node that took one over)."""
        try:
            status, body = self.http(node, "/kvs/view-change", timeout=timeout)
        except (requests.RequestException, ValueError):
            return None
        return body if status == 200 else None


class ProcessDriver(ClusterDriver):
    """Nodes as local processes, each on its own loopback IP (127.0.N.10, .11, ...; see LocalCluster)."""

    def __init__(self, shards: int, replicas: int, root: str | None = None, spares: int = 0, **env: str):
        self.shards, self.replicas = shards, replicas
        self._root = root or tempfile.mkdtemp(prefix="kvs-chaos-")
        self._cluster = LocalCluster(shards, replicas, self._root, base_port=find_free_base_port(1),
                                     secret=SECRET, env=env, distinct_hosts=True)
        self._spares = [self._cluster.define_spare_node() for _ in range(spares)]
        self._chain = f"KVSCHAOS{os.getpid()}"

    def start(self) -> None:
        _iptables("-N", self._chain)
        _iptables("-I", "INPUT", "-j", self._chain)
        self._cluster.start()
        for spare in self._spares:
            self._cluster.start_node(spare)

    def stop(self) -> None:
        self._cluster.stop()
        _iptables("-D", "INPUT", "-j", self._chain, check=False)
        _iptables("-F", self._chain, check=False)
        _iptables("-X", self._chain, check=False)

    def nodes(self) -> list[str]:
        return list(self._cluster.view)

    def spare_nodes(self) -> list[str]:
        return list(self._spares)

    def client_address(self, node: str) -> str:
        return node

    def kill(self, node: str) -> None:
        self._cluster.kill(node)

    def data_dir(self, node: str) -> str:
        return self._cluster.nodes[node].data_dir

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

    def isolate_together(self, nodes: list[str]) -> None:
        """Cut `nodes` off from every other node, but not from each other (a minority partition)."""
        for rule in self._isolation_rules(*nodes):
            _iptables("-A", self._chain, *rule)

    def heal_together(self, nodes: list[str]) -> None:
        for rule in self._isolation_rules(*nodes):
            _iptables("-D", self._chain, *rule, check=False)

    def cut_raft_traffic(self, node: str) -> None:
        """Drop the connections this node opens to the other nodes' Raft ports (their SYNs): none opens,
        while its HTTP requests (to the others' HTTP ports) and everything it answers still pass."""
        for rule in self._raft_rules(node):
            _iptables("-A", self._chain, *rule)

    def heal_raft_traffic(self, node: str) -> None:
        for rule in self._raft_rules(node):
            _iptables("-D", self._chain, *rule, check=False)

    def _raft_rules(self, node: str) -> list[tuple[str, ...]]:
        ip = node.split(":")[0]
        return [("-s", ip, "-d", other.split(":")[0], "-p", "tcp", "--syn", "!", "--dport", other.split(":")[1],
                 "-j", "DROP")
                for other in self.all_nodes() if other.split(":")[0] != ip]

    def _isolation_rules(self, *inside: str) -> list[tuple[str, ...]]:
        ips = sorted({node.split(":")[0] for node in inside})
        others = {other.split(":")[0] for other in self.all_nodes()} - set(ips)
        return [rule for ip in ips for other in sorted(others)
                for rule in (("-s", ip, "-d", other, "-j", "DROP"), ("-s", other, "-d", ip, "-j", "DROP"))]

    def logs(self, node: str, lines: int | None = 200) -> str:
        return self._cluster.log_tail(node, lines if lines is not None else 10**9)


def _iptables(*args: str, check: bool = True) -> None:
    result = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)}: {result.stderr.strip()}")


def iptables_usable() -> bool:
    try:
        return subprocess.run(["iptables", "-w", "-L", "-n"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


ASK_SECONDS = 1.5          # one member's answer to a status question, at most


def gathered_answers(ask, nodes: list[str], limit: float, rounds: int = 3) -> list:
    """The answers `ask(node, timeout)` gives (None: no answer), every node asked in turn and the silent
    ones again 0.2 s apart, until all have answered, `rounds` rounds have been asked since the first
    answer came (so a silent member costs that many asks, and one lone early answer does not decide
    alone), or `limit` seconds passed: no ask starts with less than 0.1 s left, and each is given at most
    what is left (a timeout of `requests` bounds each of its steps, so one ask may still run a little
    past it). [] if nobody answered."""
    deadline = time.monotonic() + limit
    silent, answers, first_answered = list(nodes), [], None
    for round_ in itertools.count(1):
        for node in list(silent):
            remaining = deadline - time.monotonic()
            if remaining <= 0.1:
                return answers
            answer = ask(node, min(ASK_SECONDS, remaining))
            if answer is not None:
                answers.append(answer)
                silent.remove(node)
        if answers and first_answered is None:
            first_answered = round_
        if (not silent or (first_answered is not None and round_ - first_answered + 1 >= rounds)
                or time.monotonic() + 0.2 >= deadline):
            return answers
        time.sleep(0.2)


def _newest(epochs) -> ConfigEpoch | None:
    return max(epochs, key=lambda e: e.number, default=None)


def _with_active(known: dict | None) -> dict | None:
    return known if known and known.get("active") else None


def _planning_base(known: list[dict]) -> ConfigEpoch | None:
    """The newest active epoch of the members' `known_epochs`, with the highest shard id any reported."""
    if not known:
        return None
    epoch = ConfigEpoch.from_dict(max((k["active"] for k in known), key=lambda e: e["number"]))
    floor = max(int(k.get("max-shard-id") or 0) for k in known)
    return replace(epoch, max_shard_id=floor) if floor > epoch.max_shard_id else epoch
