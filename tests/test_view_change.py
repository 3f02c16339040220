"""View changes on live clusters, with clients reading and writing through the change.

Each shape starts a cluster plus idle nodes for the addresses the new view
adds, loads data, runs a recorded workload, changes the view in the middle,
and then checks: the history is linearizable (every acknowledged write is
readable with its last value, nothing applied twice), the response agrees with
every node's key counts, replicas agree, and no node keeps keys its shard no
longer owns.
"""

from __future__ import annotations

import threading

import pytest
import requests

from kvs.client import KvsClient
from kvs.testing.linearizability import check_history
from kvs.testing.cluster import LocalCluster, wait_until
from kvs.settings import DEFAULT_RAFT_PORT_OFFSET, METADATA_SLOT, raft_address
from kvs.config.epoch import ConfigEpoch
from kvs.config.ring import HashRing
from kvs.testing.workload import WorkloadSpec, run_workload

pytestmark = pytest.mark.cluster

PRELOADED = 150


def change_view(node: str, view: list[str], repl_factor: int | None = None, timeout: float = 120):
    body = {"view": ",".join(view)}
    if repl_factor is not None:
        body["repl-factor"] = repl_factor
    resp = requests.put(f"http://{node}/kvs/view-change", json=body, timeout=timeout)
    return resp.status_code, resp.json()


def grown(cluster: LocalCluster, extra: int) -> list[str]:
    """Start `extra` idle nodes after the cluster's ports; their addresses."""
    return [cluster.add_idle_node(cluster.base_port + len(cluster.view) + i) for i in range(extra)]


SHAPES = {
    # name: (shards, replicas, extra idle nodes, new view as indexes into old view + extra, new repl-factor)
    "1 node to 4 with repl-factor 2": (1, 1, 3, [0, 1, 2, 3], 2),
    "2 to 4 nodes": (2, 1, 2, [0, 1, 2, 3], None),
    "4 to 2 nodes": (4, 1, 0, [0, 1], None),
    "repl-factor 2 to 3 on the same nodes": (3, 2, 0, [0, 1, 2, 3, 4, 5], 3),
    "every node replaced": (2, 1, 2, [2, 3], None),
    "down to a single node": (2, 1, 0, [0], None),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_view_change_shapes_under_load(make_cluster, shape):
    shards, replicas, extra, picks, new_rf = SHAPES[shape]
    cluster = make_cluster(shards, replicas)
    everyone = cluster.view + grown(cluster, extra)
    new_view = [everyone[i] for i in picks]
    old_nodes = list(cluster.view)
    client = KvsClient(old_nodes[0])
    for i in range(PRELOADED):
        assert client.put(f"pre-{i}", f"v{i}")[0] == 201

    keys = tuple(f"hot-{i}" for i in range(10))
    # clients go through the nodes that stay, so no client talks to a node that is leaving
    through = tuple(a for a in old_nodes if a in new_view) or tuple(new_view)
    spec = WorkloadSpec(addresses=through, keys=keys, clients=6, duration=12.0, seed=len(shape))
    history: list = []
    worker = threading.Thread(target=lambda: history.extend(run_workload(spec)))
    worker.start()
    if set(through) & set(old_nodes):
        # the change starts once the workload is under way: it has written several of its keys (when every
        # node is replaced, the clients' nodes serve only from the change on: it starts at once)
        probe = KvsClient(through[0])
        wait_until(lambda: sum(probe.get(k)[0] == 200 for k in keys) >= 3, 30, interval=0.1,
                   message="the workload wrote its first keys")
    status, body = change_view(old_nodes[0], new_view, new_rf)
    worker.join(60)
    assert status == 200, body
    assert body["message"] == "View change successful"

    epoch = ConfigEpoch.initial(tuple(new_view), new_rf or replicas)
    assert [s["replicas"] for s in body["shards"]] == [list(r) for r in epoch.shards.values()]
    if (new_rf or replicas) == 1:
        assert all(s["address"] == s["replicas"][0] for s in body["shards"])

    result = check_history(history)
    assert result.ok, result.summary() + "; " + "; ".join(k.explanation for k in result.failures()[:3])
    assert sum(op.outcome == "ok" for op in history) > 100

    reader = KvsClient(new_view[0])
    missing = [i for i in range(PRELOADED) if reader.get(f"pre-{i}")[1].get("value") != f"v{i}"]
    assert not missing, f"preloaded keys lost: {missing[:10]}"

    # the response, every node's view of every shard, and the data agree; no stale keys remain
    ring = HashRing([s["shard-id"] for s in body["shards"]])
    expected = {s["shard-id"]: 0 for s in body["shards"]}
    for key in [f"pre-{i}" for i in range(PRELOADED)] + [k for k in keys if reader.get(k)[0] == 200]:
        expected[ring.group_for(key)] += 1
    for shard in body["shards"]:
        # the workload still ran after the response: only its hot keys may have changed since
        assert abs(shard["key-count"] - expected[shard["shard-id"]]) <= len(keys), (shard, expected)
        for node in shard["replicas"]:
            got = KvsClient(node).key_count()[1]
            assert (got["shard-id"], got["key-count"]) == (shard["shard-id"], expected[shard["shard-id"]])
    for node in new_view:
        assert KvsClient(node).shards()[1]["shards"] == [s["shard-id"] for s in body["shards"]]

    # the metadata group followed the view: its members are the new view's nodes, the others left it
    members = sorted(raft_address(a, METADATA_SLOT, DEFAULT_RAFT_PORT_OFFSET) for a in new_view)
    for node in everyone:
        meta = requests.get(f"http://{node}/kvs/status", timeout=5).json()["groups"].get("meta")
        if node in new_view:
            assert meta is not None and meta["members"] == members, (node, meta)
        else:
            assert meta is None, (node, meta)
    if shape == "every node replaced":
        # the old nodes are no longer needed: without them, the new ones still change their view
        for node in old_nodes:
            cluster.kill(node)
        status, body = change_view(new_view[0], new_view[:1])
        assert status == 200, body
        assert [s["replicas"] for s in body["shards"]] == [new_view[:1]]
        missing = [i for i in range(PRELOADED) if reader.get(f"pre-{i}")[1].get("value") != f"v{i}"]
        assert not missing, f"preloaded keys lost after the old nodes left: {missing[:10]}"


def test_invalid_view_changes_are_refused(make_cluster):
    cluster = make_cluster(2, 1)
    node = cluster.view[0]
    assert change_view(node, [])[0] == 400
    status, body = change_view(node, cluster.view + ["127.0.0.1:1"])        # nobody listens there
    assert status == 400 and "unreachable" in body["error"]
    status, body = change_view(node, cluster.view, 3)
    assert status == 400 and "multiple" in body["error"]
    resp = requests.put(f"http://{node}/kvs/view-change", data=b"{nope", timeout=10)
    assert resp.status_code == 400


def test_a_second_change_while_one_runs_gets_409(make_cluster):
    cluster = make_cluster(2, 1)
    extra = grown(cluster, 2)
    client = KvsClient(cluster.view[0])
    for i in range(2000):
        client.put(f"bulk-{i}", "x" * 100)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", change_view(cluster.view[0],
                                                                                    cluster.view + extra)))
    first.start()
    wait_until(lambda: requests.get(f"http://{cluster.view[0]}/kvs/view-change", timeout=5).json()["phase"],
               20, interval=0.01, message="first change under way")
    second = change_view(cluster.view[1], cluster.view + extra[:1], 1)
    first.join(120)
    assert second[0] == 409, second
    assert results["first"][0] == 200, results["first"]


def test_keys_that_do_not_move_are_served_without_errors(make_cluster):
    cluster = make_cluster(2, 1)
    extra = grown(cluster, 1)
    old_ring, new_ring = HashRing(["1", "2"]), HashRing(["1", "2", "3"])
    stay = [k for k in (f"stay-{i}" for i in range(400)) if old_ring.group_for(k) == new_ring.group_for(k)][:20]
    client = KvsClient(cluster.view[0])
    for i in range(500):
        client.put(f"fill-{i}", "v")
    errors, done = [], threading.Event()
    count = [0]

    def hammer() -> None:
        c = KvsClient(cluster.view[1], timeout=10)
        while not done.is_set():
            for key in stay:
                status, _ = c.put(key, f"{count[0]}")
                count[0] += 1
                if status not in (200, 201):
                    errors.append(status)

    t = threading.Thread(target=hammer)
    t.start()
    wait_until(lambda: count[0] >= 50, 30, message="the hammer is under way before the change")
    status, body = change_view(cluster.view[0], cluster.view + extra)
    after = count[0]
    wait_until(lambda: count[0] >= after + 50, 30, message="the hammer goes on after the change")
    done.set()
    t.join(30)
    assert status == 200, body
    assert count[0] > 100 and errors == []


def test_the_cli_shows_progress_until_the_change_is_done(make_cluster):
    import subprocess
    import sys

    cluster = make_cluster(2, 1)
    extra = grown(cluster, 1)
    client = KvsClient(cluster.view[0])
    for i in range(300):
        client.put(f"cli-{i}", "v")
    done = subprocess.run([sys.executable, "-m", "kvs", "view-change", ",".join(cluster.view + extra),
                           "--node", cluster.view[0]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"View change successful"' in done.stdout
    assert "ranges" in done.stderr and "keys moved" in done.stderr
    assert KvsClient(extra[0]).key_count()[1]["key-count"] > 0


def test_reshard_to_a_given_shard_count(make_cluster):
    cluster = make_cluster(4, 1)
    client = KvsClient(cluster.view[0])
    for i in range(100):
        client.put(f"re-{i}", f"v{i}")
    resp = requests.put(f"http://{cluster.view[2]}/kvs/reshard", json={"shard-count": 3}, timeout=30)
    assert resp.status_code == 400 and "equal size" in resp.json()["error"]
    resp = requests.put(f"http://{cluster.view[2]}/kvs/reshard", json={"shard-count": 2}, timeout=120)
    assert resp.status_code == 200, resp.text
    shards = resp.json()["shards"]
    assert [len(s["replicas"]) for s in shards] == [2, 2]
    assert sum(s["key-count"] for s in shards) == 100
    assert all(KvsClient(cluster.view[3]).get(f"re-{i}")[1].get("value") == f"v{i}" for i in range(100))
