"""`kvs.Client` (issue 14) on a real 2 x 3 cluster: it routes each key to its shard's leader (no node
forwards), follows a leader change, retries a write through an election with one Idempotency-Key, and
raises typed errors."""

from __future__ import annotations

import pytest

from kvs import Client, KeyNotFound, PreconditionFailed, Unavailable

from .test_metrics import scrape, value

pytestmark = pytest.mark.cluster


def forwards(cluster) -> float:
    return sum(value(scrape(n), "kvs_forwards_total", kind="forward") for n in cluster.view)


def test_the_client_sends_each_key_to_its_shard_and_raises_typed_errors(cluster):
    kv = Client([cluster.view[0], cluster.view[3]], timeout=15)
    before = forwards(cluster)
    versions = {f"cc-{i}": kv.put(f"cc-{i}", f"v{i}") for i in range(40)}
    assert all(kv.get(k) == f"v{k[3:]}" for k in versions)
    assert forwards(cluster) == before              # every request went straight to a replica of its shard
    with pytest.raises(KeyNotFound):
        kv.get("cc-none")
    with pytest.raises(PreconditionFailed) as stale:
        kv.put("cc-1", "w", if_match=versions["cc-1"] + 1000)
    assert stale.value.version == versions["cc-1"]
    assert kv.put("cc-1", "w", if_match=versions["cc-1"]) > versions["cc-1"]
    kv.delete("cc-2")
    with pytest.raises(KeyNotFound):
        kv.get("cc-2")
    assert kv.set_many({"cc-a": "1", b"\xff\x01": b"\x00"})["keys_added"] == 2
    assert kv.get_many(["cc-a", b"\xff\x01", "cc-none"]) == {"cc-a": "1", b"\xff\x01": b"\x00"}
    assert kv.shards() == ["1", "2"] and kv.key_count() >= 40


def test_the_client_rides_out_a_leader_kill_with_one_write_per_key(make_cluster):
    cluster = make_cluster(1, 3)
    kv = Client(cluster.view, timeout=20)
    assert kv.put("before", "1") > 0
    cluster.kill(cluster.leader_of("1"))
    versions = [kv.put(f"after-{i}", "x") for i in range(20)]     # retried through the election
    # applied once each: the shard's revision counter moved by exactly one per write
    assert versions == list(range(versions[0], versions[0] + 20))
    assert [kv.get_versioned(f"after-{i}") for i in range(20)] == [("x", v) for v in versions]
    cluster_down = Client(["127.0.0.1:1"], timeout=1)
    with pytest.raises(Unavailable):
        cluster_down.put("k", "v")
