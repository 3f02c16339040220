"""Adding one node to a shard and removing one node: thin forms of the view change.

The request checks run against a fake node in tests/test_coordinator.py. These
tests start real processes: a node joins a shard while clients read and write (the
history must be linearizable, every acknowledged write readable), a dead
replica of a 3-replica shard is taken out, the sole replica of a shard leaves
(its shard is retired) and comes back, and invalid requests get 400. After every change, the
reply, every node's /kvs/key-count and every node's /kvs/shards/S agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import requests

from kvs.client import KvsClient
from kvs.testing.linearizability import check_history
from kvs.testing.cluster import wait_until
from kvs.config.ring import HashRing
from kvs.testing.workload import WorkloadSpec, run_workload

PRELOADED = 150


# -- live clusters -------------------------------------------------------------------------------------------


def add_member(node: str, address: str, shard_id: object, timeout: float = 120) -> tuple[int, dict]:
    resp = requests.put(f"http://{node}/kvs/view-change/add-member", json={"address": address, "shard-id": shard_id},
                        timeout=timeout)
    return resp.status_code, resp.json()


def remove_member(node: str, address: object, timeout: float = 120) -> tuple[int, dict]:
    resp = requests.put(f"http://{node}/kvs/view-change/remove-member", json={"address": address}, timeout=timeout)
    return resp.status_code, resp.json()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvs", *args], capture_output=True, text=True, timeout=120)


def preload(node: str) -> list[str]:
    client = KvsClient(node)
    for i in range(PRELOADED):
        assert client.put(f"pre-{i}", f"v{i}")[0] == 201
    return [f"pre-{i}" for i in range(PRELOADED)]


def assert_preloaded_readable(node: str) -> None:
    reader = KvsClient(node)
    missing = [i for i in range(PRELOADED) if reader.get(f"pre-{i}")[1].get("value") != f"v{i}"]
    assert not missing, f"preloaded keys lost: {missing[:10]}"


def assert_nodes_agree(shards: list[dict], keys: list[str], view: list[str], slack: int = 0) -> None:
    """Every node of `view` reports the shards of the reply, with the key counts the data implies (the keys
    of `keys` that exist, placed by the ring of the reply's shard ids); the reply's own counts are within
    `slack` of them (clients may have written after the reply)."""
    reader = KvsClient(view[0])
    ring = HashRing([s["shard-id"] for s in shards])
    expected = {s["shard-id"]: 0 for s in shards}
    for key in keys:
        if reader.get(key)[0] == 200:
            expected[ring.group_for(key)] += 1
    assert sorted(view) == sorted(a for s in shards for a in s["replicas"])
    for shard in shards:
        sid = shard["shard-id"]
        assert abs(shard["key-count"] - expected[sid]) <= slack, (shard, expected)
        assert ("address" in shard) == (len(shard["replicas"]) == 1), shard
        for node in shard["replicas"]:
            assert KvsClient(node).key_count()[1] == {"message": "Key count retrieved successfully",
                                                      "key-count": expected[sid], "shard-id": sid}
    for node in view:
        client = KvsClient(node)
        assert client.shards()[1]["shards"] == [s["shard-id"] for s in shards]
        for shard in shards:
            body = client.shard(shard["shard-id"])[1]
            assert (body["key-count"], body["replicas"]) == (expected[shard["shard-id"]], shard["replicas"]), node


def assert_left(address: str) -> None:
    """`address` is out of the view: it serves no shard any more (its replicas retired)."""
    assert KvsClient(address).key_count()[0] == 503
    wait_until(lambda: not any(g.startswith("shard-") for g in KvsClient(address).status()[1]["groups"]), 30,
               message=f"{address} retires its shard replicas")


@pytest.mark.cluster
def test_add_member_to_a_shard_under_load(make_cluster):
    cluster = make_cluster(2, 1)
    a, b = cluster.view
    joining = cluster.add_idle_node(cluster.base_port + 2)
    keys = preload(a)

    hot = tuple(f"hot-{i}" for i in range(10))
    # The clients run until the change has ended (at most 120 s), so the history covers all of it.
    stop = threading.Event()
    spec = WorkloadSpec(addresses=(a, b), keys=hot, clients=4, duration=120.0, seed=11, stop=stop)
    history: list = []
    worker = threading.Thread(target=lambda: history.extend(run_workload(spec)))
    worker.start()
    wait_until(lambda: any(KvsClient(a).get(k)[0] == 200 for k in hot), 10, message="the clients have written")
    try:
        status, body = add_member(b, joining, "1")
    finally:
        stop.set()
    worker.join(60)
    assert not worker.is_alive(), "the clients did not stop"
    assert status == 200, body
    assert body["message"] == "View change successful"
    # shard 1 grew in place: same id, same Raft group, no key moved; shard 2 untouched
    assert [(s["shard-id"], s["replicas"]) for s in body["shards"]] == [("1", [a, joining]), ("2", [b])]
    assert body["shards"][1]["address"] == b

    result = check_history(history)
    assert result.ok, result.summary() + "; " + "; ".join(k.explanation for k in result.failures()[:3])
    assert sum(op.outcome == "ok" for op in history) > 100
    assert_preloaded_readable(joining)
    assert_nodes_agree(body["shards"], keys + list(hot), [a, joining, b], slack=len(hot))


@pytest.mark.cluster
def test_remove_a_dead_replica_of_a_three_replica_shard(make_cluster):
    cluster = make_cluster(1, 3)
    a, b, dead = cluster.view
    keys = preload(a)
    cluster.kill(dead)                          # taking a dead replica out is what remove-member is for
    done = cli("remove-member", dead, "--node", a)
    assert done.returncode == 0, done.stdout + done.stderr
    body = json.loads(done.stdout)
    assert body["message"] == "View change successful"
    # the shard's group shrank in place: same id, every key still there
    assert body["shards"] == [{"shard-id": "1", "key-count": PRELOADED, "replicas": [a, b]}]
    assert_preloaded_readable(b)
    assert_nodes_agree(body["shards"], keys, [a, b])


@pytest.mark.cluster
def test_remove_the_sole_replica_of_a_shard_then_add_it_back(make_cluster):
    cluster = make_cluster(2, 1)
    a, b = cluster.view
    keys = preload(a)

    status, body = remove_member(b, b.replace("127.0.0.1", " 127.0.0.1"))      # b coordinates its own removal
    assert status == 200, body
    assert body["shards"] == [{"shard-id": "1", "key-count": PRELOADED, "replicas": [a], "address": a}]
    assert_preloaded_readable(a)
    assert_nodes_agree(body["shards"], keys, [a])
    assert_left(b)
    assert KvsClient(b).get("pre-1")[1].get("value") == "v1"               # outside the view, it forwards

    status, body = remove_member(a, a)
    assert status == 400 and "last node" in body["error"]

    done = cli("add-member", b, "--shard-id", "1", "--node", a)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keys moved" in done.stderr
    body = json.loads(done.stdout)
    # b joins shard 1's group in place (shard 2 stays retired: its id is never reused)
    assert [(s["shard-id"], s["replicas"]) for s in body["shards"]] == [("1", [a, b])]
    assert_nodes_agree(body["shards"], keys, [a, b])
    assert_preloaded_readable(b)


@pytest.mark.cluster
def test_invalid_member_changes_are_refused(make_cluster):
    cluster = make_cluster(2, 1)
    a, b = cluster.view
    for status_body, words in [
        (add_member(a, "127.0.0.1:1", "1"), "unreachable"),           # nobody listens there
        (add_member(a, "127.0.0.1:1", "7"), "shard 7 does not exist"),
        (add_member(a, b, "1"), "already in the view"),
        (add_member(a, "127.0.0.1:port", "1"), "malformed"),
        (add_member(a, "127.0.0.1:1", None), "shard-id"),
        (remove_member(a, "127.0.0.1:1"), "not in the view"),
        (remove_member(a, None), "address"),
    ]:
        status, body = status_body
        assert status == 400 and words in body["error"], (words, body)
    for path in ("add-member", "remove-member"):
        resp = requests.put(f"http://{a}/kvs/view-change/{path}", data=b"{nope", timeout=10)
        assert resp.status_code == 400 and resp.json()["error"] == "Malformed JSON body"
    assert KvsClient(b).shards()[1]["shards"] == ["1", "2"]               # nothing changed
    assert requests.get(f"http://{a}/kvs/view-change", timeout=5).json()["epoch"] == 1
