"""SIGTERM stops a node gracefully (issue 14): the groups it leads hand their leadership over first,
in-flight requests finish, the process exits 0; clients of the other nodes see no failed request."""

from __future__ import annotations

import signal
import threading

import pytest
import requests

from kvs.client import KvsClient
from kvs.testing.cluster import wait_until

pytestmark = pytest.mark.cluster


def roles(node: str) -> dict:
    groups = requests.get(f"http://{node}/kvs/status", timeout=5).json()["groups"]
    return {name: g["role"] for name, g in groups.items()}


def test_sigterm_on_a_leader_hands_leadership_over_and_costs_other_nodes_clients_nothing(make_cluster):
    cluster = make_cluster(1, 3)
    leader = cluster.leader_of("1")
    others = [n for n in cluster.view if n != leader]
    outcomes: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(node: str, w: int) -> None:
        c = KvsClient(node, timeout=15)
        for i in range(100_000):
            if stop.is_set():
                return
            try:
                status = c.put(f"gs-{w}-{i}", str(i))[0]
                if status == 201 and c.get(f"gs-{w}-{i}")[1].get("value") == str(i):
                    outcomes.append(status)
                else:
                    failures.append(f"{node}: put/get gs-{w}-{i} answered {status}")
            except requests.RequestException as exc:
                failures.append(f"{node}: {exc}")

    threads = [threading.Thread(target=client, args=(others[w % 2], w)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(outcomes) >= 100, 60, message="clients running")
        cluster.signal(leader, signal.SIGTERM)
        assert cluster.nodes[leader].process.wait(timeout=30) == 0
        served = len(outcomes)
        wait_until(lambda: len(outcomes) >= served + 100, 60, message="clients served after the stop")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert any(role == "leader" for node in others for name, role in roles(node).items() if name == "shard-1")
    with open(cluster.nodes[leader].log_path, errors="replace") as f:
        log = f.read()
    assert "handed leadership of" in log and "shard-1" in log.split("handed leadership of", 1)[1].splitlines()[0]
