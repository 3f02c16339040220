"""Replica-set changes in place: a shard keeps its id, its Raft group and its keys (issue 12).

Real processes: a 2 x 3 cluster holding data, concurrent clients during every
change (their history must be linearizable). The changes: a node added to one
shard, a live replica removed, a killed replica removed, repl-factor 3 -> 4 and
back on the same shard count, and every node of one shard replaced one at a
time. After each: both shards keep their ids and their exact key counts, the
shard the change did not touch kept its Raft members, its term and its
ownership (no command of the view change entered its log), every key reads back
the same through every node, and every replica of a shard has the same digest.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Callable

import pytest
import requests

from kvs.client import KvsClient
from kvs.config.epoch import ConfigEpoch
from kvs.testing.cluster import LocalCluster, wait_until
from kvs.testing.linearizability import check_history
from kvs.testing.workload import WorkloadSpec, run_workload

PRELOADED = 200
HOT_PER_CHANGE = 12         # fresh keys for each change: the checker starts every key from "absent"


def put_json(node: str, path: str, body: dict) -> tuple[int, dict]:
    resp = requests.put(f"http://{node}{path}", json=body, timeout=180)
    return resp.status_code, resp.json()


def add_member(node: str, address: str, shard_id: str) -> Callable[[], tuple[int, dict]]:
    return lambda: put_json(node, "/kvs/view-change/add-member", {"address": address, "shard-id": shard_id})


def remove_member(node: str, address: str) -> Callable[[], tuple[int, dict]]:
    return lambda: put_json(node, "/kvs/view-change/remove-member", {"address": address})


def view_change(node: str, view: list[str], repl_factor: int) -> Callable[[], tuple[int, dict]]:
    return lambda: put_json(node, "/kvs/view-change", {"view": ",".join(view), "repl-factor": repl_factor})


def group_status(node: str, shard_id: str) -> dict | None:
    body = requests.get(f"http://{node}/kvs/status?digest=1", timeout=10).json()
    return body["groups"].get(f"shard-{shard_id}")


def assert_directory_deleted(cluster: LocalCluster, node: str, shard_id: str) -> None:
    """A replica removed by a committed epoch loses its data directory (once the metadata group's
    decided epochs, read linearizably, give its node no replica of the shard)."""
    path = os.path.join(cluster.nodes[node].data_dir, f"shard-{shard_id}")
    wait_until(lambda: not os.path.exists(path), 60, message=f"{node} deletes its directory of shard {shard_id}")


class Store:
    """The cluster under test: its keys, and checks after each change."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        self.ring = ConfigEpoch.initial(tuple(cluster.view), cluster.replicas).ring   # never changes here
        self.preloaded = [f"pre-{i}" for i in range(PRELOADED)]
        client = KvsClient(cluster.view[0])
        for i, key in enumerate(self.preloaded):
            assert client.put(key, f"v{i}")[0] == 201
        self.seed = 0
        self.hot: list[str] = []

    def change_under_load(self, entries: list[str], change: Callable[[], tuple[int, dict]]) -> dict:
        """Run `change` while 4 clients read and write the hot keys through `entries`; the reply."""
        self.seed += 1
        hot = tuple(f"hot-{self.seed}-{i}" for i in range(HOT_PER_CHANGE))
        self.hot.extend(hot)
        stop = threading.Event()
        spec = WorkloadSpec(addresses=tuple(entries), keys=hot, clients=4, duration=240.0, seed=self.seed, stop=stop)
        history: list = []
        worker = threading.Thread(target=lambda: history.extend(run_workload(spec)))
        worker.start()
        try:
            status, body = change()
        finally:
            stop.set()
        worker.join(60)
        assert not worker.is_alive(), "the clients did not stop"
        assert status == 200, body
        result = check_history(history)
        assert result.ok, result.summary() + "; " + "; ".join(k.explanation for k in result.failures()[:3])
        assert sum(op.outcome == "ok" for op in history) > 10
        return body

    def untouched(self, shard_id: str, replicas: list[str]) -> dict:
        """What must not change in a shard a change does not touch: members, term, ownership."""
        seen = {}
        for node in replicas:
            g = group_status(node, shard_id)
            seen[node] = (sorted(g["members"]), g["term"], g["ownership-epoch"])
        return seen

    def check(self, body: dict, layout: dict[str, list[str]], view: list[str]) -> None:
        assert [(s["shard-id"], s["replicas"]) for s in body["shards"]] == sorted(layout.items())
        keys = self.preloaded + self.hot
        reader = KvsClient(view[0])
        values = {k: reader.get(k)[1].get("value") for k in keys}
        assert all(values[k] == f"v{i}" for i, k in enumerate(self.preloaded)), "a preloaded key was lost"
        for node in view[1:]:
            client = KvsClient(node)
            assert {k: client.get(k)[1].get("value") for k in keys} == values, node
        counts = Counter(self.ring.group_for(k) for k, v in values.items() if v is not None)
        for shard_id, replicas in layout.items():
            def agreed() -> bool:
                statuses = [group_status(node, shard_id) for node in replicas]
                return all(g is not None and g.get("key-count") == counts[shard_id] for g in statuses) \
                    and len({g["digest"] for g in statuses}) == 1 \
                    and len({tuple(sorted(g["members"])) for g in statuses}) == 1
            wait_until(agreed, 30, message=f"shard {shard_id}'s replicas agree on {counts[shard_id]} keys")
            # the reply counted while the clients still wrote: off by at most the shard's hot keys
            reply = next(s for s in body["shards"] if s["shard-id"] == shard_id)
            hot_here = sum(self.ring.group_for(k) == shard_id for k in self.hot[-HOT_PER_CHANGE:])
            assert abs(reply["key-count"] - counts[shard_id]) <= hot_here, (reply, counts[shard_id])


@pytest.mark.cluster
def test_add_a_node_remove_a_live_replica_and_remove_a_killed_one_move_no_key(make_cluster):
    cluster = make_cluster(2, 3)
    a1, a2, a3, b1, b2, b3 = cluster.view
    spare = cluster.add_idle_node(cluster.base_port + 6)
    store = Store(cluster)
    layout = {"1": [a1, a2, a3], "2": [b1, b2, b3]}

    before = store.untouched("2", layout["2"])
    body = store.change_under_load([a1, b1], add_member(b1, spare, "1"))
    layout["1"] = [a1, a2, a3, spare]
    store.check(body, layout, [a1, a2, a3, spare, b1, b2, b3])
    assert store.untouched("2", layout["2"]) == before

    body = store.change_under_load([a2, b1], remove_member(a2, a1))
    layout["1"] = [a2, a3, spare]
    store.check(body, layout, [a2, a3, spare, b1, b2, b3])
    assert store.untouched("2", layout["2"]) == before
    wait_until(lambda: not any(n.startswith("shard-") for n in KvsClient(a1).status()[1]["groups"]), 30,
               message="the removed node closes its replica")
    assert_directory_deleted(cluster, a1, "1")

    cluster.kill(b3)
    before = store.untouched("1", layout["1"])
    body = store.change_under_load([a2, b1], remove_member(b1, b3))
    layout["2"] = [b1, b2]
    store.check(body, layout, [a2, a3, spare, b1, b2])
    assert store.untouched("1", layout["1"]) == before


@pytest.mark.cluster
def test_repl_factor_up_and_down_and_a_shard_replaced_node_by_node_move_no_key(make_cluster):
    cluster = make_cluster(2, 3)
    a1, a2, a3, b1, b2, b3 = cluster.view
    spares = [cluster.add_idle_node(cluster.base_port + 6 + i) for i in range(3)]
    store = Store(cluster)

    # 3 -> 4 replicas per shard on the same 2 shards: one spare joins each
    body = store.change_under_load([a1, b1], view_change(a1, [a1, a2, a3, spares[0], b1, b2, b3, spares[1]], 4))
    layout = {"1": [a1, a2, a3, spares[0]], "2": [b1, b2, b3, spares[1]]}
    store.check(body, layout, [a1, a2, a3, spares[0], b1, b2, b3, spares[1]])

    # and back to 3: the spares leave
    body = store.change_under_load([a1, b1], view_change(b2, [a1, a2, a3, b1, b2, b3], 3))
    layout = {"1": [a1, a2, a3], "2": [b1, b2, b3]}
    store.check(body, layout, [a1, a2, a3, b1, b2, b3])

    for spare in spares[:2]:
        assert_directory_deleted(cluster, spare, "1" if spare == spares[0] else "2")

    # every node of shard 2 replaced, one at a time; shard 1 does nothing meanwhile
    before = store.untouched("1", layout["1"])
    view = [a1, a2, a3, b1, b2, b3]
    for old, new in zip([b1, b2, b3], spares):
        wait_until(lambda: not KvsClient(new).status()[1]["groups"], 60, message=f"{new} is idle again")
        body = store.change_under_load([a1], add_member(a1, new, "2"))
        layout["2"] = layout["2"] + [new]
        view.append(new)
        store.check(body, layout, view)
        body = store.change_under_load([a1], remove_member(a1, old))
        layout["2"] = [n for n in layout["2"] if n != old]
        view.remove(old)
        store.check(body, layout, view)
    assert store.untouched("1", layout["1"]) == before
