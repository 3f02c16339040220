"""Every row of the REST API table, through a replica and through a forwarding node.

Runs on one 6-node cluster (2 shards x 3 replicas) of real processes. Bodies
are compared exactly, as the seeds' clients do.
"""

from __future__ import annotations

import socket
import uuid

import pytest
import requests

from kvs.testing.cluster import wait_until

from .conftest import keys_of_shard

pytestmark = pytest.mark.cluster

CTX = {"causal-context": {}}


def call(address: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    kwargs = {"data": raw} if raw is not None else {"json": body}
    resp = requests.request(method, f"http://{address}{path}", headers=headers, timeout=10, **kwargs)
    return resp.status_code, resp.json()


def routes(cluster):
    """(label, node to ask, expected 'address' or None) for a key of shard 1."""
    replica = cluster.replicas_of("1")[1]
    forwarder = cluster.replicas_of("2")[0]
    return [("replica", replica, None), ("forwarding", forwarder, cluster.replicas_of("1"))]


@pytest.mark.parametrize("route", ["replica", "forwarding"])
def test_put_get_delete_rows(cluster, route):
    label, node, served_by = next(r for r in routes(cluster) if r[0] == route)
    key = keys_of_shard(cluster, "1", 1, prefix=f"rows-{route}")[0]
    path = f"/kvs/keys/{key}"

    def expect(status, body, got):
        got_status, got_body = got
        if served_by is not None:
            assert got_body.pop("address") in served_by, got_body
        assert (got_status, got_body) == (status, body)

    versions = []

    def versioned(got):
        """A reply that carries the key's version (a number the shard gives): checked apart."""
        versions.append(got[1].pop("version"))
        return got

    expect(404, {"doesExist": False, "error": "Key does not exist", "message": "Error in GET", **CTX},
           call(node, "GET", path, CTX))
    expect(201, {"message": "Added successfully", "replaced": False, **CTX},
           versioned(call(node, "PUT", path, {"value": "v1", **CTX})))
    expect(200, {"message": "Updated successfully", "replaced": True, **CTX},
           versioned(call(node, "PUT", path, {"value": "v2", **CTX})))
    expect(200, {"doesExist": True, "message": "Retrieved successfully", "value": "v2", **CTX},
           versioned(call(node, "GET", path, CTX)))
    assert 0 < versions[0] < versions[1] == versions[2], versions
    expect(200, {"doesExist": True, "message": "Deleted successfully", **CTX},
           call(node, "DELETE", path, CTX))
    expect(404, {"doesExist": False, "error": "Key does not exist", "message": "Error in DELETE", **CTX},
           call(node, "DELETE", path, CTX))
    expect(404, {"doesExist": False, "error": "Key does not exist", "message": "Error in GET", **CTX},
           call(node, "GET", path, CTX))


@pytest.mark.parametrize("route", ["replica", "forwarding"])
def test_put_input_errors(cluster, route):
    _, node, _ = next(r for r in routes(cluster) if r[0] == route)
    key = keys_of_shard(cluster, "1", 1, prefix=f"errors-{route}")[0]
    assert call(node, "PUT", f"/kvs/keys/{key}", CTX) == (
        400, {"error": "Value is missing", "message": "Error in PUT", **CTX})
    assert call(node, "PUT", f"/kvs/keys/{'k' * 51}", {"value": "v", **CTX}) == (
        400, {"error": "Key is too long", "message": "Error in PUT", **CTX})
    assert call(node, "PUT", f"/kvs/keys/{'k' * 50}", {"value": "v", **CTX})[0] in (200, 201)


def test_malformed_and_oversized_bodies_get_clear_errors(cluster):
    node = cluster.view[0]
    status, body = call(node, "PUT", "/kvs/keys/malformed", raw=b"{not json")
    assert status == 400 and body["error"] == "Malformed JSON body"
    status, body = call(node, "PUT", "/kvs/keys/typed", {"value": 42})
    assert status == 400 and body["error"] == "Value must be a string"
    status, body = call(node, "PUT", "/kvs/keys/ctx", {"value": "v", "causal-context": [1]})
    assert status == 400 and "causal-context" in body["error"]
    status, body = call(node, "PUT", "/kvs/keys/big", {"value": "x" * (1024 * 1024 + 10)})
    assert body == {"error": "Request body larger than 1048576 bytes", "message": "Error in PUT",
                    "causal-context": {}} and status == 413
    status, body = call(node, "POST", "/kvs/keys/x", {"value": "v"})
    assert status == 405 and "error" in body
    # the node still works after all that
    assert call(node, "PUT", "/kvs/keys/after-errors", {"value": "ok"})[0] == 201


def test_causal_context_is_returned(cluster):
    context = {"opaque": [1, 2, 3]}
    status, body = call(cluster.view[0], "PUT", "/kvs/keys/ctx-echo", {"value": "v", "causal-context": context})
    assert status == 201 and body["causal-context"] == context


def test_a_retried_write_with_the_same_idempotency_key_is_applied_once(cluster):
    key = keys_of_shard(cluster, "2", 1, prefix="idem")[0]
    node = cluster.replicas_of("1")[0]          # forwards to shard 2
    first = {"Idempotency-Key": uuid.uuid4().hex}
    second = {"Idempotency-Key": uuid.uuid4().hex}
    assert call(node, "PUT", f"/kvs/keys/{key}", {"value": "a"}, first)[0] == 201
    assert call(node, "PUT", f"/kvs/keys/{key}", {"value": "b"}, second)[0] == 200
    # the retry of the first write answers as the first time did and does not overwrite "b"
    status, body = call(node, "PUT", f"/kvs/keys/{key}", {"value": "a"}, first)
    assert status == 201 and body["replaced"] is False
    assert call(node, "GET", f"/kvs/keys/{key}")[1]["value"] == "b"
    # the same key for a different operation is refused
    assert call(node, "PUT", f"/kvs/keys/{key}", {"value": "c"}, first)[0] == 400


def test_key_count_is_per_shard_and_equal_on_every_replica(cluster):
    keys = {sid: keys_of_shard(cluster, sid, 7, prefix="count") for sid in ("1", "2")}
    for sid, ks in keys.items():
        for k in ks:
            assert call(cluster.view[0], "PUT", f"/kvs/keys/{k}", {"value": "v"})[0] in (200, 201)
    for sid in ("1", "2"):
        counts = set()
        for address in cluster.replicas_of(sid):
            status, body = call(address, "GET", "/kvs/key-count")
            assert status == 200
            assert body["message"] == "Key count retrieved successfully" and body["shard-id"] == sid
            assert set(body) == {"message", "key-count", "shard-id"}
            counts.add(body["key-count"])
        assert len(counts) == 1 and counts.pop() >= 7


def test_shard_membership_and_information(cluster):
    for node in (cluster.view[0], cluster.view[5]):
        assert call(node, "GET", "/kvs/shards") == (
            200, {"message": "Shard membership retrieved successfully", "shards": ["1", "2"]})
        for sid in ("1", "2"):
            status, body = call(node, "GET", f"/kvs/shards/{sid}")
            assert status == 200
            count = body.pop("key-count")
            assert isinstance(count, int)
            assert body == {"message": "Shard information retrieved successfully", "shard-id": sid,
                            "replicas": cluster.replicas_of(sid)}
            assert count == call(cluster.replicas_of(sid)[0], "GET", "/kvs/key-count")[1]["key-count"]
        status, body = call(node, "GET", "/kvs/shards/9")
        assert status == 404 and "error" in body


def test_status_and_health(cluster):
    for address in cluster.view:
        for path in ("/health", "/readyz", "/livez"):
            assert call(address, "GET", path) == (200, {"status": "ok", "reason": "ok"})
        status, body = call(address, "GET", "/kvs/status")
        assert status == 200
        assert body["epoch"] == 1 and body["secured"] is True and body["member"] is True
        own = body["shard-id"]
        assert set(body["groups"]) == {"meta", f"shard-{own}"}
        for group in body["groups"].values():
            assert group["role"] in ("leader", "follower")
            assert group["leader"] is not None and group["commit-index"] >= 1
    leaders = {sid: cluster.leader_of(sid) for sid in ("1", "2")}
    assert all(leaders.values())


def test_forwarded_requests_need_the_cluster_secret(cluster):
    node = cluster.replicas_of("1")[0]
    key = keys_of_shard(cluster, "1", 1, prefix="unsigned")[0]
    status, body = call(node, "PUT", f"/kvs/keys/{key}", {"value": "v"}, {"X-Kvs-Forwarded": "1"})
    assert status == 401 and "signature" in body["error"]
    bad = {"X-Kvs-Forwarded": "1", "X-Kvs-Signature": "t=1,s=00"}
    assert call(node, "PUT", f"/kvs/keys/{key}", {"value": "v"}, bad)[0] == 401
    assert call(node, "GET", f"/kvs/keys/{key}")[0] == 404


def test_an_idle_node_outside_its_view_stays_harmless(cluster):
    address = cluster.add_idle_node(cluster.base_port + len(cluster.view))
    wait_until(lambda: cluster.http(address, "/health")[0] == 503, 20, message="idle node answers")
    for path in ("/health", "/readyz"):
        status, body = call(address, "GET", path)
        assert status == 503 and "not in any configuration" in body["reason"]
    assert call(address, "GET", "/livez") == (200, {"status": "ok", "reason": "ok"})     # live, not ready
    status, body = call(address, "GET", "/kvs/status")
    assert status == 200 and body["member"] is False and body["groups"] == {} and body["epoch"] is None
    assert call(address, "PUT", "/kvs/keys/idle", {"value": "v"})[0] == 503
    assert call(address, "GET", "/kvs/key-count")[0] == 503
    # it opened no Raft port and the cluster never heard of it
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(address.split(":")[1]) + 1000)) != 0
    members = call(cluster.view[0], "GET", "/kvs/status")[1]["groups"]["meta"]["members"]
    assert len(members) == len(cluster.view)
    cluster.kill(address)
