"""Signed node-to-node requests cannot be replayed or changed (issue 11, defect 9).

The review sent the same signed request three times within the old +-300 s
window and all three were accepted; the query string, X-Kvs-Deadline-Ms and
X-Kvs-Forwarded were not signed. Now every signature carries a fresh nonce that
a node accepts once, covers everything that changes a request's meaning, and is
valid for SIGNATURE_WINDOW (60 s). A retry (the same Idempotency-Key, signed
anew) is still accepted, and still applied once.

The first tests are units (sign/verify, the nonce cache); the rest run against
real processes of a secured cluster and cover every receiver: the key path
(event loop), the internal and public Flask
routes (worker threads).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from kvs.errors import Unauthorized
from kvs.routing.nonces import NonceCache
from kvs.routing.peers import (DEADLINE, FORWARDED, REQUEST_ID, SIGNATURE, SIGNATURE_WINDOW, sign, signed_message,
                               verify)

from .conftest import TEST_SECRET, keys_of_shard, start_cluster
from .test_hostile_input import raw_request

SECRET = "unit-secret"


RECEIVER = "10.0.0.1:13800"       # the node the unit tests' requests are signed for and checked by


def headers_for(method: str, target: str, body: bytes = b"", *, to: str = RECEIVER, secret: str = TEST_SECRET,
                request_id: str | None = None, now: float | None = None, **extra: str) -> dict[str, str]:
    """The headers a node sends to the node at `to` with `target` (its path and query as sent), signed
    as it signs them."""
    headers = {FORWARDED: "1", DEADLINE: "5000", REQUEST_ID: request_id or uuid.uuid4().hex, **extra}
    headers = {name: value for name, value in headers.items() if value is not None}
    headers[SIGNATURE] = sign(secret, method, target, headers, body, to=to, now=now)
    return headers


def check(headers: dict, method: str = "PUT", path: str = "/kvs/keys/k", query: str = "", body: bytes = b"{}",
          seen: NonceCache | None = None, now: float | None = None, receiver: str = RECEIVER) -> None:
    verify(SECRET, headers, method, path, query, body, seen if seen is not None else NonceCache(SIGNATURE_WINDOW),
           now, receiver=receiver)


def refusal(call) -> str:
    with pytest.raises(Unauthorized) as caught:
        call()
    return caught.value.message


# -- sign and verify ------------------------------------------------------------------------------------

def test_a_signed_request_is_accepted_once_and_its_replay_is_refused():
    seen = NonceCache(SIGNATURE_WINDOW)
    headers = headers_for("PUT", "/kvs/keys/k", b"{}", secret=SECRET)
    check(headers, seen=seen)
    assert refusal(lambda: check(headers, seen=seen)) == "replayed request"


def test_a_retry_signed_anew_with_the_same_request_id_is_accepted():
    seen, request_id = NonceCache(SIGNATURE_WINDOW), uuid.uuid4().hex
    for _ in range(3):
        check(headers_for("PUT", "/kvs/keys/k", b"{}", secret=SECRET, request_id=request_id), seen=seen)
    assert len(seen) == 3


@pytest.mark.parametrize("changed", [
    {"method": "DELETE"}, {"path": "/kvs/keys/other"}, {"query": "digest=1"}, {"body": b'{"value": "x"}'},
    {DEADLINE: "60000"}, {REQUEST_ID: "another-id"}, {FORWARDED: "1, 1"},
])
def test_changing_any_part_of_a_signed_request_breaks_its_signature(changed):
    headers = headers_for("PUT", "/kvs/keys/k", b"{}", secret=SECRET)
    arguments = {name: value for name, value in changed.items() if name in ("method", "path", "query", "body")}
    headers.update({name: value for name, value in changed.items() if name not in arguments})
    assert refusal(lambda: check(headers, **arguments)) == "bad signature"


def test_the_path_is_signed_decoded_and_the_query_as_sent():
    headers = headers_for("GET", "/kvs/keys/caf%C3%A9%0Aq?x=%2F&y=1", secret=SECRET)
    check(headers, method="GET", path="/kvs/keys/café\nq", query="x=%2F&y=1", body=b"")
    # a newline in a decoded path cannot pose as the boundary between path and query
    assert signed_message("GET", "/a\nb", "", 1, "n", {}, RECEIVER) != signed_message("GET", "/a", "b", 1, "n", {},
                                                                                RECEIVER)


def test_a_request_signed_for_one_node_is_refused_by_another():
    headers = headers_for("PUT", "/kvs/keys/k", b"{}", secret=SECRET, to="10.0.0.2:13800")
    assert refusal(lambda: check(headers)) == "bad signature"
    check(headers, receiver="10.0.0.2:13800")


@pytest.mark.parametrize("age", [SIGNATURE_WINDOW + 1, -(SIGNATURE_WINDOW + 1), 300])
def test_a_signature_outside_the_window_is_refused(age):
    headers = headers_for("PUT", "/kvs/keys/k", b"{}", secret=SECRET, now=time.time() - age)
    assert refusal(lambda: check(headers)) == "signature expired"


@pytest.mark.parametrize("value", ["t=1,s=" + "0" * 64, "t=1,n=" + "0" * 32 + ",s=" + "é" * 64,
                                   "s=" + "0" * 64 + ",n=" + "0" * 32 + ",t=1", "t=1,n=zz,s=00", ""])
def test_a_malformed_signature_is_refused(value):
    message = refusal(lambda: check({FORWARDED: "1", SIGNATURE: value}))
    assert message in ("malformed signature", "forwarded request without a signature")


# -- the nonce cache --------------------------------------------------------------------------------------

def test_the_nonce_cache_forgets_a_second_once_its_signatures_have_expired():
    seen = NonceCache(window=30)
    assert seen.admit(1000, "a", now=1000.5) and seen.admit(1001, "b", now=1001.0)
    assert not seen.admit(1000, "a", now=1029.0)            # still within the window: a replay
    assert seen.admit(1040, "c", now=1031.0) and len(seen) == 2     # second 1000 forgotten
    assert not seen.admit(1000, "a", now=1031.0)            # ...and refused, never admitted again
    assert seen.admit(2000, "d", now=2000.0) and len(seen) == 1     # after an idle spell, all forgotten


def test_the_nonce_cache_of_a_node_refuses_signatures_from_before_it_started():
    # the nonces a node admitted before a restart are gone: what was signed before then cannot be told apart
    seen = NonceCache(window=30, since=1000)
    assert not seen.admit(999, "a", now=1000.2)
    assert seen.admit(1000, "b", now=1000.2) and not seen.admit(1000, "b", now=1001.0)


def test_the_nonce_cache_at_capacity_drops_its_oldest_second_and_refuses_signatures_from_it():
    seen = NonceCache(window=30, capacity=4)
    for nonce, second in (("a", 100), ("b", 100), ("c", 101), ("d", 102)):
        assert seen.admit(second, nonce, now=105.0)
    assert seen.admit(103, "e", now=105.0) and len(seen) == 3           # second 100 dropped
    assert not seen.admit(100, "z", now=105.0)          # a nonce of second 100 might have been seen: refused
    assert not seen.admit(101, "c", now=105.0) and seen.admit(101, "f", now=105.0)


def test_the_nonce_cache_admits_a_nonce_once_across_threads():
    seen, admitted, start = NonceCache(window=30), [], threading.Barrier(8)

    def admit() -> None:
        start.wait()
        admitted.extend(n for n in range(500) if seen.admit(100, str(n), now=100.0))

    threads = [threading.Thread(target=admit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(admitted) == list(range(500)) and len(seen) == 500


# -- on a running, secured cluster ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """2 shards of 1 node, with the cluster secret."""
    c = start_cluster(str(tmp_path_factory.mktemp("replay")), 2, 1)
    yield c
    c.stop()


def receivers(cluster) -> list[tuple[str, str, bytes]]:
    """One request per receiving path of a node: (method, path, body), each accepted once with a 200/201."""
    key = keys_of_shard(cluster, "1", 1, prefix="replay")[0]
    return [("PUT", f"/kvs/keys/{key}", b'{"value": "v"}'), ("GET", f"/kvs/keys/{key}", b""),
            ("GET", "/internal/status", b""),
            ("GET", "/kvs/shards/1", b"")]


@pytest.mark.cluster
def test_the_same_signed_request_sent_twice_is_accepted_once(secured):
    node = secured.replicas_of("1")[0]
    for method, path, body in receivers(secured):
        headers = headers_for(method, path, body, to=node)
        status, reply = raw_request(node, method, path, body, headers)
        assert status in (200, 201), (path, reply)
        status, reply = raw_request(node, method, path, body, headers)
        assert (status, reply.get("error")) == (401, "replayed request"), path


@pytest.mark.cluster
def test_a_captured_request_with_a_changed_query_deadline_or_forwarded_marker_is_refused(secured):
    node = secured.replicas_of("1")[0]
    key = keys_of_shard(secured, "1", 1, prefix="tamper")[0]
    path, body = f"/kvs/keys/{key}", b'{"value": "v"}'
    captured = headers_for("PUT", path, body, to=node)
    assert raw_request(node, "PUT", path + "?x=1", body, captured) == (401, {
        "error": "bad signature", "message": "Error in PUT", "causal-context": {}})
    assert raw_request(node, "PUT", path, body, {**captured, DEADLINE: "60000"})[0] == 401
    status_path = "/internal/status"
    assert raw_request(node, "GET", status_path + "?digest=1", b"", headers_for("GET", status_path, to=node))[0] == 401
    # signed as a client's request (no X-Kvs-Forwarded), it cannot be passed off as a node's
    unmarked = headers_for("PUT", path, body, to=node, **{FORWARDED: None})
    assert raw_request(node, "PUT", path, body, {**unmarked, FORWARDED: "1"})[0] == 401
    # refused forgeries are not remembered: the untouched request is still accepted, once
    assert raw_request(node, "PUT", path, body, captured)[0] == 201
    assert raw_request(node, "PUT", path, body, captured)[0] == 401


@pytest.mark.cluster
def test_a_signature_older_than_the_window_is_refused(secured):
    node = secured.replicas_of("1")[0]
    for age in (SIGNATURE_WINDOW + 5, 300):
        headers = headers_for("GET", "/internal/status", to=node, now=time.time() - age)
        assert raw_request(node, "GET", "/internal/status", b"", headers) == (401, {
            "error": "signature expired", "message": "Error in GET"})


@pytest.mark.cluster
def test_a_retried_write_signed_anew_is_accepted_and_applied_once(secured):
    node = secured.replicas_of("1")[0]
    key = keys_of_shard(secured, "1", 1, prefix="retry")[0]
    path, request_id = f"/kvs/keys/{key}", uuid.uuid4().hex
    assert raw_request(node, "PUT", path, b'{"value": "a"}', headers_for("PUT", path, b'{"value": "a"}', to=node,
                                                                        request_id=request_id))[0] == 201
    assert raw_request(node, "PUT", path, b'{"value": "b"}')[0] == 200
    status, reply = raw_request(node, "PUT", path, b'{"value": "a"}',
                                headers_for("PUT", path, b'{"value": "a"}', to=node, request_id=request_id))
    assert status == 201 and reply["replaced"] is False          # the first answer, not a second write
    assert raw_request(node, "GET", path)[1]["value"] == "b"
    # and through the other node, which forwards with signatures of its own
    other = secured.replicas_of("2")[0]
    for i in range(10):
        assert raw_request(other, "PUT", f"{path}-{i}", b'{"value": "v"}')[0] == 201
        assert raw_request(other, "GET", f"{path}-{i}")[1]["value"] == "v"


@pytest.mark.cluster
def test_a_request_captured_on_its_way_to_one_node_is_refused_by_another(secured):
    """The review replayed a signed GET /internal/status to a second node, and a forwarded PUT to the
    other replica of its shard: both were accepted. A signature now names the node it was made for."""
    first, second = secured.replicas_of("1")[0], secured.replicas_of("2")[0]
    captured = headers_for("GET", "/internal/status", to=first)
    assert raw_request(second, "GET", "/internal/status", b"", captured) == (401, {
        "error": "bad signature", "message": "Error in GET"})
    assert raw_request(first, "GET", "/internal/status", b"", captured)[0] == 200


@pytest.mark.cluster
def test_a_request_signed_before_a_node_restarted_is_refused_after_it(make_cluster):
    """A node's memory of accepted nonces does not survive a restart: without a fence, a request it had
    accepted within the window was accepted again once it was back."""
    cluster = make_cluster(1, 1)
    node = cluster.view[0]
    key = keys_of_shard(cluster, "1", 1, prefix="restart")[0]
    path, body = f"/kvs/keys/{key}", b'{"value": "before"}'
    captured = headers_for("PUT", path, body, to=node)
    assert raw_request(node, "PUT", path, body, captured)[0] == 201
    assert raw_request(node, "PUT", path, b'{"value": "after"}')[0] == 200
    cluster.kill(node)
    # The fence is the second the node starts: wait until a new second begins, so that the restarted node's
    # start is strictly after the captured signature's second (a time bound of the test, not a sync).
    started_after = int(time.time()) + 1
    while time.time() < started_after:
        time.sleep(started_after - time.time())
    cluster.start_node(node)
    cluster.wait_healthy(timeout=60)
    assert raw_request(node, "PUT", path, body, captured) == (401, {
        "error": "replayed request", "message": "Error in PUT", "causal-context": {}})
    assert raw_request(node, "GET", path)[1]["value"] == "after"
