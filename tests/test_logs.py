"""Logs (issue 14): one JSON object per line with KVS_LOG_FORMAT=json, an access line per request with
KVS_ACCESS_LOG=on, and one request id from the client through every hop, echoed in X-Request-Id."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import requests

from kvs.logs import JsonFormatter
from kvs.testing.cluster import wait_until

from .conftest import keys_of_shard


def json_lines(path: str) -> list[dict]:
    with open(path, errors="replace") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.cluster
def test_a_request_id_runs_from_the_client_through_the_forwarding_hop_into_json_access_lines(make_cluster):
    cluster = make_cluster(2, 3, KVS_LOG_FORMAT="json", KVS_ACCESS_LOG="on")
    entry = cluster.replicas_of("1")[0]
    key = keys_of_shard(cluster, "2", 1, "traced")[0]
    resp = requests.put(f"http://{entry}/kvs/keys/{key}", json={"value": "v"},
                        headers={"Idempotency-Key": "trace-me-1"}, timeout=10)
    assert resp.status_code == 201 and resp.headers["X-Request-Id"] == "trace-me-1"
    served_by = resp.json()["address"]
    assert served_by in cluster.replicas_of("2")
    # a request without an id gets one; admin and information routes answer with one too
    assert requests.get(f"http://{entry}/kvs/keys/{key}", timeout=10).headers["X-Request-Id"]
    assert requests.get(f"http://{entry}/kvs/shards", timeout=10).headers["X-Request-Id"]

    def traced(node: str) -> list[dict]:
        return [e for e in json_lines(cluster.nodes[node].log_path)
                if e.get("logger") == "kvs.access" and e.get("request_id") == "trace-me-1"]

    wait_until(lambda: traced(entry) and traced(served_by), 10, message="access lines on both hops")
    for line in traced(entry) + traced(served_by):
        assert line["method"] == "PUT" and line["path"] == f"/kvs/keys/{key}" and line["status"] == 201
        assert line["ms"] >= 0 and line["level"] == "INFO" and line["ts"].endswith("Z")
    # every line of every node is one JSON object (json_lines raises otherwise)
    for node in cluster.view:
        assert json_lines(cluster.nodes[node].log_path)


def test_the_json_formatter_keeps_the_traceback_in_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("kvs.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed here" and "ValueError: boom" in entry["exc"] and entry["level"] == "ERROR"
