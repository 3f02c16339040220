"""Shared fixtures: real kvs clusters of local processes on 127.0.0.1."""

from __future__ import annotations

import pytest

from kvs.testing.cluster import LocalCluster, find_free_base_port
from kvs.config.epoch import ConfigEpoch

TEST_SECRET = "kvs-test-secret"


def start_cluster(root: str, shards: int, replicas: int, spare_ports: int = 2, **env: str) -> LocalCluster:
    cluster = LocalCluster(shards, replicas, root, base_port=find_free_base_port(shards * replicas + spare_ports),
                           secret=TEST_SECRET, env=env)
    cluster.start()
    try:
        cluster.wait_healthy(timeout=60)
    except TimeoutError:
        report = "\n".join(f"--- {a}\n{cluster.log_tail(a)}" for a in cluster.view)
        cluster.stop()
        pytest.fail(f"cluster did not become healthy\n{report}")
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 6-node cluster (2 shards x 3 replicas), shared by the tests of one module."""
    c = start_cluster(str(tmp_path_factory.mktemp("cluster")), 2, 3)
    yield c
    c.stop()


@pytest.fixture
def make_cluster(tmp_path):
    """Factory for a private cluster that a destructive test may break."""
    started: list[LocalCluster] = []

    def make(shards: int = 2, replicas: int = 3, **env: str) -> LocalCluster:
        c = start_cluster(str(tmp_path / f"cluster{len(started)}"), shards, replicas, **env)
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


def keys_of_shard(cluster: LocalCluster, shard_id: str, count: int, prefix: str = "key") -> list[str]:
    """`count` keys that the cluster's initial layout maps to `shard_id`."""
    epoch = ConfigEpoch.initial(tuple(cluster.view), cluster.replicas)
    keys, i = [], 0
    while len(keys) < count:
        key = f"{prefix}-{i}"
        if epoch.shard_for_key(key) == shard_id:
            keys.append(key)
        i += 1
    return keys
