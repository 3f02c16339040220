"""Versions and compare-and-set over the REST API (issue 13), on real processes.

Every key carries a version (`"version"` and an `ETag`); `If-Match` / `If-None-Match: *` make a PUT
or DELETE conditional, applied atomically in the shard's Raft log, 412 with the current version
otherwise; exactly-once under retries; through every node (a forwarded hop carries the condition);
versions survive a restart and a reshard; 16 clients counting with compare-and-set count exactly and
linearizably.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import quote

import pytest
import requests

from kvs.testing.linearizability import OK, UNKNOWN, Operation, check_history

from .conftest import keys_of_shard

pytestmark = pytest.mark.cluster


def url(node: str, key: str) -> str:
    return f"http://{node}/kvs/keys/{quote(key, safe='')}"


def put(node: str, key: str, value: str, **headers: str) -> requests.Response:
    return requests.put(url(node, key), json={"value": value}, headers=_headers(headers), timeout=15)


def delete(node: str, key: str, **headers: str) -> requests.Response:
    return requests.delete(url(node, key), headers=_headers(headers), timeout=15)


def get(node: str, key: str) -> requests.Response:
    return requests.get(url(node, key), timeout=15)


def _headers(given: dict) -> dict:
    return {name.replace("_", "-"): value for name, value in given.items()}


def version_of(resp: requests.Response) -> int:
    version = resp.json()["version"]
    assert resp.headers["ETag"] == f'"{version}"', resp.headers
    return version


def test_a_read_returns_the_version_and_etag_of_the_last_write(cluster):
    node = cluster.view[0]
    created = put(node, "versioned", "one")
    assert created.status_code == 201 and created.json()["replaced"] is False
    first = version_of(created)
    read = get(node, "versioned")
    assert read.status_code == 200 and read.json()["value"] == "one" and version_of(read) == first
    updated = put(cluster.view[4], "versioned", "two")
    assert updated.status_code == 200 and version_of(updated) > first
    assert version_of(get(cluster.view[5], "versioned")) == version_of(updated)


@pytest.mark.parametrize("shard_id", ["1", "2"])
def test_compare_and_set_through_every_node_applies_only_when_its_condition_holds(cluster, shard_id):
    for i, node in enumerate(cluster.view):
        key = keys_of_shard(cluster, shard_id, 1, prefix=f"cas-{i}")[0]
        created = put(node, key, "a", If_None_Match="*")
        assert created.status_code == 201, created.text
        v1 = version_of(created)
        again = put(node, key, "b", If_None_Match="*")
        assert again.status_code == 412 and version_of(again) == v1 and again.json()["doesExist"] is True
        swapped = put(node, key, "b", If_Match=f'"{v1}"')
        assert swapped.status_code == 200, swapped.text
        v2 = version_of(swapped)
        stale = put(node, key, "lost", If_Match=str(v1))
        assert stale.status_code == 412 and version_of(stale) == v2, stale.text
        assert put(node, key, "c", If_Match="*").status_code == 200
        v3 = version_of(get(node, key))
        assert delete(node, key, If_Match=str(v2)).status_code == 412
        assert get(node, key).json()["value"] == "c"
        assert delete(node, key, If_Match=str(v3)).status_code == 200
        gone = put(node, key, "d", If_Match=str(v3))
        body = {k: v for k, v in gone.json().items() if k != "address"}       # "address": a forwarded reply's
        assert gone.status_code == 412 and body == {
            "doesExist": False, "version": 0, "message": "Error in PUT",
            "error": "Precondition failed: it does not exist", "causal-context": {}}
        assert "ETag" not in gone.headers
        assert put(node, key, "d", If_Match="*").status_code == 412
        assert get(node, key).status_code == 404


@pytest.mark.parametrize("headers", [{"If-Match": "abc"}, {"If-Match": '"1", "2"'}, {"If-Match": "-1"},
                                     {"If-Match": "9" * 40}, {"If-None-Match": '"5"'},
                                     {"If-Match": "1", "If-None-Match": "*"}, {"If-Match": ""}])
def test_malformed_conditions_get_a_400_and_change_nothing(cluster, headers):
    node = cluster.view[1]
    put(node, "cond-key", "kept")
    before = version_of(get(node, "cond-key"))
    resp = requests.put(url(node, "cond-key"), json={"value": "changed"}, headers=headers, timeout=15)
    assert resp.status_code == 400 and "error" in resp.json(), resp.text
    resp = requests.delete(url(cluster.view[3], "cond-key"), headers=headers, timeout=15)
    assert resp.status_code == 400, resp.text
    read = get(node, "cond-key")
    assert read.json()["value"] == "kept" and version_of(read) == before


def test_a_retried_compare_and_set_is_applied_once_and_answers_as_it_did_the_first_time(cluster):
    a, b = cluster.view[0], cluster.view[3]
    v1 = version_of(put(a, "retried-cas", "start"))
    first = put(a, "retried-cas", "mine", If_Match=str(v1), Idempotency_Key="cas-retry-1")
    assert first.status_code == 200
    assert put(b, "retried-cas", "theirs").status_code == 200          # the version moved on
    retry = put(b, "retried-cas", "mine", If_Match=str(v1), Idempotency_Key="cas-retry-1")
    assert retry.status_code == 200 and version_of(retry) == version_of(first)
    assert get(a, "retried-cas").json()["value"] == "theirs"            # not applied a second time


def test_sixteen_clients_counting_with_compare_and_set_count_exactly_and_linearizably(cluster):
    key, nodes, seconds = "counter", cluster.view, 20.0
    assert put(nodes[0], key, "0").status_code in (200, 201)
    history: list[Operation] = []
    lock = threading.Lock()
    won = [0]
    start = time.monotonic()

    def client(n: int) -> None:
        session, node, name = requests.Session(), nodes[n % len(nodes)], f"c{n}"
        while time.monotonic() - start < seconds:
            t0 = time.monotonic()
            try:
                read = session.get(url(node, key), timeout=10)
            except requests.RequestException:
                continue                        # a read that failed took no effect
            if read.status_code != 200:
                continue
            value, version = read.json()["value"], read.json()["version"]
            ops = [Operation(name, "get", key, None, t0, time.monotonic(), OK, value)]
            t1 = time.monotonic()
            try:
                resp = session.put(url(node, key), json={"value": str(int(value) + 1)},
                                   headers={"If-Match": f'"{version}"'}, timeout=10)
                status = resp.status_code
            except requests.RequestException:
                status = None
            t2 = time.monotonic()
            if status in (200, 412):
                ops.append(Operation(name, "cas", key, str(int(value) + 1), t1, t2, OK, status == 200, value))
            else:                               # 503, or no answer: it may have been applied
                ops.append(Operation(name, "cas", key, str(int(value) + 1), t1, None, UNKNOWN, None, value))
            with lock:
                history.extend(ops)
                won[0] += status == 200

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    final = int(get(nodes[2], key).json()["value"])
    unknown = sum(1 for op in history if op.outcome == UNKNOWN)
    assert won[0] > 16, f"only {won[0]} increments in {seconds:g}s"
    assert won[0] <= final <= won[0] + unknown, (final, won[0], unknown)
    assert [op for op in history if op.kind == "cas" and op.result is False], "16 clients never conflicted"
    result = check_history(history + [Operation("init", "put", key, "0", -2.0, -1.0, OK)], 60)
    assert result.ok, result.summary() + "; " + "; ".join(k.explanation for k in result.failures())


def test_versions_survive_a_restart_and_a_reshard_and_keep_growing(make_cluster):
    cluster = make_cluster(2, 1)
    a, b = cluster.view
    keys = [f"moved-{i}" for i in range(40)]
    versions = {}
    for key in keys:
        versions[key] = version_of(put(a, key, f"v-{key}"))
    for node in (a, b):
        cluster.restart(node)
    cluster.wait_healthy(timeout=60)
    assert {k: version_of(get(b, k)) for k in keys} == versions
    resp = requests.put(f"http://{b}/kvs/reshard", json={"shard-count": 1}, timeout=180)
    assert resp.status_code == 200, resp.text
    assert {k: version_of(get(a, k)) for k in keys} == versions       # every key moved to one shard
    newest = max(versions.values())
    for key in keys[:5]:
        swapped = put(b, key, "after", If_Match=str(versions[key]))
        assert swapped.status_code == 200 and version_of(swapped) > newest
