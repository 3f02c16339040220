"""Degraded clusters: a group without a majority answers 503 in time; a node without a secret says so."""

from __future__ import annotations

import time

import pytest

from kvs.client import KvsClient
from kvs.testing.cluster import LocalCluster, find_free_base_port

from .conftest import keys_of_shard

pytestmark = pytest.mark.cluster


def test_a_group_without_a_majority_answers_503_within_5s_and_recovers(make_cluster):
    cluster = make_cluster(2, 3)
    shard1 = cluster.replicas_of("1")
    key1 = keys_of_shard(cluster, "1", 1, prefix="minority")[0]
    key2 = keys_of_shard(cluster, "2", 1, prefix="minority")[0]
    forwarder = KvsClient(cluster.replicas_of("2")[0], timeout=15)
    survivor = KvsClient(shard1[0], timeout=15)
    assert forwarder.put(key1, "before")[0] == 201
    for address in shard1[1:]:
        cluster.kill(address)

    for client, method in ((forwarder, "PUT"), (survivor, "PUT"), (survivor, "GET"), (forwarder, "DELETE")):
        started = time.monotonic()
        if method == "PUT":
            status, body = client.put(key1, "during")
        elif method == "GET":
            status, body = client.get(key1)
        else:
            status, body = client.delete(key1)
        elapsed = time.monotonic() - started
        assert (status, body) == (503, {"error": "Unable to satisfy request", "message": f"Error in {method}",
                                        "causal-context": {}})
        assert elapsed <= 6.0, f"{method} took {elapsed:.1f}s"

    # the other shard is unaffected
    assert forwarder.put(key2, "fine")[0] == 201
    for address in shard1[1:]:
        cluster.start_node(address)
    cluster.wait_healthy(shard1, timeout=30)
    status, body = forwarder.put(key1, "after")
    assert status in (200, 201)
    assert survivor.get(key1)[1]["value"] == "after"


def test_a_node_without_a_secret_runs_and_reports_itself_unsecured(tmp_path):
    cluster = LocalCluster(1, 1, str(tmp_path), base_port=find_free_base_port(1), secret=None)
    cluster.start()
    try:
        cluster.wait_healthy(timeout=30)
        client = KvsClient(cluster.view[0])
        assert client.put("k", "v")[0] == 201
        status, body = client.status()
        assert status == 200 and body["secured"] is False
        with open(cluster.nodes[cluster.view[0]].log_path) as f:
            assert "KVS_SECRET is not set" in f.read()
    finally:
        cluster.stop()
