"""`GET /metrics` on a real 2 x 3 cluster, parsed with prometheus-client's own parser (issue 14)."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from kvs.client import KvsClient

from .conftest import keys_of_shard

pytestmark = pytest.mark.cluster


def scrape(node: str) -> dict:
    resp = requests.get(f"http://{node}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    samples: dict = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_forwards_fsyncs_and_report_every_group(cluster):
    node = cluster.replicas_of("1")[0]
    before = scrape(node)
    mine, theirs = keys_of_shard(cluster, "1", 5, "metric-a"), keys_of_shard(cluster, "2", 5, "metric-b")
    client = KvsClient(node)
    for key in mine + theirs:
        assert client.put(key, "v")[0] == 201
    assert client.get("metric-none")[0] == 404
    after = scrape(node)
    assert value(after, "kvs_http_requests_total", endpoint="keys", method="PUT", code="201") \
        - value(before, "kvs_http_requests_total", endpoint="keys", method="PUT", code="201") == 10
    assert value(after, "kvs_http_requests_total", endpoint="keys", method="GET", code="404") >= 1
    assert value(after, "kvs_http_request_duration_seconds_count", endpoint="keys", code="201") \
        - value(before, "kvs_http_request_duration_seconds_count", endpoint="keys", code="201") == 10
    # the other shard's keys went to its replicas
    assert value(after, "kvs_forwards_total", kind="forward") - value(before, "kvs_forwards_total", kind="forward") >= 5
    # the writes of this node's own shard were fsynced before they were acknowledged
    assert value(after, "kvs_journal_fsync_duration_seconds_count") > value(before, "kvs_journal_fsync_duration_seconds_count")
    for group in ("meta", "shard-1"):
        roles = [r for r in ("leader", "follower", "candidate", "learner", "failed")
                 if value(after, "kvs_group_role", group=group, role=r) == 1.0]
        assert roles in (["leader"], ["follower"]), (group, roles)
        assert value(after, "kvs_group_has_leader", group=group) == 1.0
        assert value(after, "kvs_group_commit_index", group=group) >= value(after, "kvs_group_applied_index", group=group) > 0
        assert value(after, "kvs_group_members", group=group) >= 3
    assert value(after, "kvs_group_keys", group="shard-1") >= 5
    assert value(after, "kvs_dedup_entries", group="shard-1") >= 5
    assert value(after, "kvs_epoch") == 1.0
    assert all(value(after, "kvs_view_change_phase", phase=p) == 0.0 for p in ("prepared", "copying", "committed"))
    # a scrape is counted like any request, under its own endpoint
    assert value(scrape(node), "kvs_http_requests_total", endpoint="metrics", method="GET", code="200") >= 2


def test_a_followers_writes_are_all_taken_by_its_leader_on_a_healthy_group(cluster):
    """Every write that reaches a follower is forwarded to the leader and answered (kvs.raft.forwarding):
    counted under 'leader', and none as a fallback. A term that changes meanwhile (an election: a
    fallback is then right) makes the round count for nothing; three rounds are allowed."""
    def shard_1(samples: dict) -> tuple:
        role = next((r for r in ("leader", "follower") if value(samples, "kvs_group_role", group="shard-1", role=r)), None)
        return role, value(samples, "kvs_group_term", group="shard-1")

    for attempt in range(3):
        before = {node: scrape(node) for node in cluster.replicas_of("1")}
        follower = next((node for node, samples in before.items() if shard_1(samples)[0] == "follower"), None)
        if follower is None:
            continue
        client = KvsClient(follower)
        for key in keys_of_shard(cluster, "1", 5, f"metric-forwarded-{attempt}"):
            assert client.put(key, "v")[0] == 201
        after = scrape(follower)
        if shard_1(after) != shard_1(before[follower]):
            continue
        assert value(after, "kvs_forwards_total", kind="leader") \
            - value(before[follower], "kvs_forwards_total", kind="leader") == 5
        assert value(after, "kvs_forward_fallbacks_total") == value(before[follower], "kvs_forward_fallbacks_total")
        return
    pytest.fail("shard 1 had no follower with a steady term in three rounds")
