"""Bad and unusual input from the network, on real processes: a clear 4xx or the right answer, never a
500, and every node gives the same answer for the same key.

Each case is a defect an outside review found (issue 11): non-ASCII keys failed when forwarded (the
receiver read the path as latin-1, the sender signed UTF-8), a key of 26 "é" was "too long", the
keys "." and ".." answered 404 through a node that does not own them (the forwarded URL was
normalised), and several inputs answered 500: JSON nested 1,000 deep, odd X-Kvs-Deadline-Ms values,
a signature timestamp of 400 digits, a signature of non-ASCII digits, a 2,000-character host, a
value with a lone surrogate, signed malformed bodies on the internal endpoints, a malformed epoch; a
view entry with a path made a node send requests elsewhere, and resending the current view made a
new epoch. Replayed and altered signed requests: tests/test_replay.py. The fuzzer
(tests/test_fuzz.py) then found two more: a path with "//" got a 308 HTML redirect built from the
Host header, and a request line without a version an "HTTP/0.9" status line.
"""

from __future__ import annotations

import http.client
import json
import os
import pickle
import socket
import time
import uuid

import pytest
import requests

from kvs.client import KvsClient
from kvs.cluster_client import Client as ClusterClient
from kvs.routing.peers import FORWARDED, REQUEST_ID, SIGNATURE, sign
from kvs.testing.cluster import wait_until

from .conftest import TEST_SECRET, start_cluster

NON_ASCII_KEYS = ["café", "über", "☃snow", "😀x", "é" * 26]


def raw_request(address: str, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request with the path sent exactly as given (no client-side normalisation)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body or None,
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def signed(method: str, path: str, body: bytes, to: str) -> dict:
    headers = {FORWARDED: "1", REQUEST_ID: uuid.uuid4().hex}
    headers[SIGNATURE] = sign(TEST_SECRET, method, path, headers, body, to=to)
    return headers


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """3 shards of 1 node: almost every key request is forwarded by two nodes of three."""
    c = start_cluster(str(tmp_path_factory.mktemp("three")), 3, 1)
    yield c
    c.stop()


@pytest.mark.cluster
@pytest.mark.parametrize("key", NON_ASCII_KEYS)
def test_non_ascii_keys_are_written_and_read_through_every_node(three_shards, key):
    quoted = requests.utils.quote(key, safe="")
    nodes = three_shards.view
    status, body = raw_request(nodes[0], "PUT", f"/kvs/keys/{quoted}", json.dumps({"value": key}).encode())
    assert status == 201, body
    for node in nodes:
        assert raw_request(node, "GET", f"/kvs/keys/{quoted}")[1]["value"] == key


@pytest.mark.cluster
@pytest.mark.parametrize("key", [".", ".."])
def test_dot_keys_get_the_same_answer_through_every_node(three_shards, key):
    nodes = three_shards.view
    status, body = raw_request(nodes[1], "PUT", f"/kvs/keys/{key}", json.dumps({"value": "dots"}).encode())
    assert status in (200, 201), body
    for node in nodes:
        status, body = raw_request(node, "GET", f"/kvs/keys/{key}")
        assert (status, body.get("value")) == (200, "dots"), (node, body)


@pytest.mark.cluster
@pytest.mark.parametrize("condition", [{}, {"If-None-Match": "*"}])
def test_a_body_of_exactly_the_limit_is_written_through_every_node(three_shards, condition):
    """A forwarding node re-encoded the body (with spaces) and added the write's condition: a body of
    exactly 1 MiB got 201 from its owner and 413 through the other nodes."""
    limit = 1 << 20
    for i, node in enumerate(three_shards.view):
        key = f"at-the-limit-{len(condition)}-{i}"
        body = b'{"value":"' + b"v" * (limit - len(b'{"value":""}')) + b'"}'
        assert len(body) == limit
        status, answer = raw_request(node, "PUT", f"/kvs/keys/{key}", body, condition)
        assert status == 201, (node, answer)
        for reader in three_shards.view:
            assert len(raw_request(reader, "GET", f"/kvs/keys/{key}")[1]["value"]) == len(body) - 12


@pytest.mark.cluster
@pytest.mark.parametrize("given", ["k" * 129, "tab\tin-it", "caf\u00e9"])
def test_an_idempotency_key_that_is_too_long_or_not_printable_ascii_is_a_400(three_shards, given):
    """Every replica keeps a write's request id in its deduplication table and Raft log (a batch one
    per pair): a 60 KB Idempotency-Key on 900 pairs grew every node by ~27 MB per request."""
    headers = {REQUEST_ID: given.encode("utf-8").decode("latin-1")}     # http.client sends latin-1
    for node in three_shards.view:
        status, body = raw_request(node, "PUT", "/kvs/keys/idempotent", json.dumps({"value": "v"}).encode(),
                                   headers)
        assert status == 400 and REQUEST_ID in body["error"], (node, status, body)
        pair = {"key": {"encoding": "string", "data": "idempotent"}, "value": {"encoding": "string", "data": "v"}}
        status, body = raw_request(node, "PUT", "/set", json.dumps([pair]).encode(), headers)
        assert status == 400 and REQUEST_ID in body["error"], (node, status, body)
    status, body = raw_request(three_shards.view[0], "PUT", "/kvs/keys/idempotent",
                               json.dumps({"value": "v"}).encode(), {REQUEST_ID: "k" * 128})
    assert status in (200, 201), body


@pytest.mark.cluster
@pytest.mark.parametrize("key", [".", ".."])
def test_the_project_s_own_clients_reach_dot_keys_through_every_node(three_shards, key):
    """requests and urllib3 remove "." and ".." segments: the clients sent /kvs/keys/ and /kvs/."""
    value = f"written by the client: {key}"
    assert KvsClient(three_shards.view[0]).put(key, value)[0] in (200, 201)
    for node in three_shards.view:
        status, body = KvsClient(node).get(key)
        assert (status, body.get("value")) == (200, value), (node, body)
    client = ClusterClient(three_shards.view[1:2])
    assert client.get(key) == value
    client.put(key, value + "!")
    assert raw_request(three_shards.view[2], "GET", f"/kvs/keys/{key}")[1]["value"] == value + "!"
    client.close()


@pytest.mark.cluster
def test_deeply_nested_json_is_a_400_everywhere(cluster):
    deep = b"[" * 5000 + b"]" * 5000
    node = cluster.view[0]
    for method, path in (("PUT", "/kvs/keys/deep"), ("PUT", "/kvs/view-change"), ("PUT", "/kvs/reshard"),
                         ("PUT", "/kvs/view-change/add-member")):
        status, body = raw_request(node, method, path, deep)
        assert status == 400, (path, status, body)


@pytest.mark.cluster
@pytest.mark.parametrize("deadline", ["²", "9" * 5000, "-5", "1e9", ""])
def test_an_odd_deadline_header_is_ignored_not_a_500(cluster, deadline):
    status, _ = raw_request(cluster.view[0], "PUT", "/kvs/keys/deadline-odd", json.dumps({"value": "v"}).encode(),
                            {"X-Kvs-Deadline-Ms": deadline})
    assert status in (200, 201)


@pytest.mark.cluster
def test_a_signature_with_a_huge_timestamp_is_a_401(cluster):
    status, body = raw_request(cluster.view[0], "GET", "/kvs/keys/anything",
                               headers={FORWARDED: "1", SIGNATURE: "t=" + "9" * 400 + ",s=0"})
    assert status == 401, body


@pytest.mark.cluster
def test_a_signature_with_non_ascii_digits_is_a_401(cluster):
    forged = f"t={int(time.time())},n={'0' * 32},s={'é' * 64}".encode("latin-1")   # hmac's comparison raised
    host, port = cluster.view[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("GET", "/internal/status")
        conn.putheader(FORWARDED, "1")
        conn.putheader(SIGNATURE, forged)
        conn.endheaders()
        assert conn.getresponse().status == 401
    finally:
        conn.close()


@pytest.mark.cluster
@pytest.mark.parametrize("entry", ["h" * 2000 + ":13800", "127.0.0.1:23890/x?y=:1", "127.0.0.1:99999",
                                   "http://127.0.0.1:1", "127.0.0.1: 5"])
def test_malformed_addresses_in_a_view_change_are_a_400(cluster, entry):
    node = cluster.view[0]
    view = ",".join(cluster.view + [entry])
    status, body = raw_request(node, "PUT", "/kvs/view-change", json.dumps({"view": view, "repl-factor": 3}).encode())
    assert status == 400, body
    status, body = raw_request(node, "PUT", "/kvs/view-change/add-member",
                               json.dumps({"address": entry, "shard-id": "1"}).encode())
    assert status == 400, body


@pytest.mark.cluster
def test_a_view_that_names_a_node_twice_is_a_400_not_a_smaller_view(cluster):
    node = cluster.view[0]
    epoch = raw_request(node, "GET", "/kvs/view-change")[1]["epoch"]
    view = ",".join(cluster.view + [cluster.view[0]])      # 7 entries, 6 nodes: was taken as 6 with repl-factor 3
    status, body = raw_request(node, "PUT", "/kvs/view-change", json.dumps({"view": view, "repl-factor": 3}).encode())
    assert status == 400 and "twice" in body["error"], body
    assert raw_request(node, "GET", "/kvs/view-change")[1]["epoch"] == epoch


@pytest.mark.cluster
def test_a_value_with_a_lone_surrogate_is_a_400_and_digests_still_work(cluster):
    node = cluster.view[0]
    status, body = raw_request(node, "PUT", "/kvs/keys/surrogate", b'{"value": "\\ud800"}')
    assert status == 400 and "Unicode" in body["error"]
    status, body = raw_request(node, "GET", "/kvs/status?digest=1")
    assert status == 200 and all("digest" in g for name, g in body["groups"].items() if name.startswith("shard-"))


@pytest.mark.cluster
@pytest.mark.parametrize("path, body", [
    ("/internal/groups/1/commands", b'{"command": ["install", 1, 2, 3, 4, 5, "x"]}'),
    ("/internal/groups/1/commands", b'{"command": {"op": "freeze", "epoch": 3, "new_ring": 7}}'),
    ("/internal/groups/1/export", b'{"source": 1}'),
    ("/internal/groups/1/changes", b'{"source": "1", "old_ring": {}, "since": "x"}'),
    ("/internal/epochs", b'{"active": {"number": 99}}'),
    ("/internal/epochs", b'[1, 2]'),
    ("/internal/metadata", b'{"member": "yes"}'),
])
def test_signed_malformed_bodies_on_internal_endpoints_are_a_400(cluster, path, body):
    node = cluster.replicas_of("1")[0]
    status, reply = raw_request(node, "POST", path, body, signed("POST", path, body, node))
    assert status == 400, reply


@pytest.mark.cluster
def test_only_a_request_signed_like_a_node_s_may_send_an_internal_body_over_the_client_limit(cluster):
    """/internal/ takes node-to-node transfers of up to 256 MiB; anyone else is held to the client's 1 MiB
    before the body is read (found by the fuzzer's review: a node read 256 MiB before it could refuse)."""
    node = cluster.replicas_of("1")[0]
    body = b'{"pad": "' + b"a" * (1536 << 10) + b'"}'
    forged = {FORWARDED: "1", REQUEST_ID: "r", SIGNATURE: "t=1,s=0"}
    for headers in ({}, forged):
        status, reply = raw_request(node, "POST", "/internal/epochs", body, headers)
        assert status == 413, reply
    status, reply = raw_request(node, "POST", "/internal/epochs", body, signed("POST", "/internal/epochs", body, node))
    assert status == 400 and "active" in reply["error"], reply     # read, authenticated, then refused


@pytest.mark.cluster
def test_resending_the_current_view_is_a_no_op(cluster):
    node = cluster.view[0]
    before = requests.get(f"http://{node}/kvs/view-change", timeout=5).json()["epoch"]
    status, body = raw_request(node, "PUT", "/kvs/view-change",
                               json.dumps({"view": ",".join(cluster.view), "repl-factor": 3}).encode())
    assert status == 200 and [s["shard-id"] for s in body["shards"]] == ["1", "2"]
    assert requests.get(f"http://{node}/kvs/view-change", timeout=5).json()["epoch"] == before


@pytest.mark.cluster
def test_a_view_of_a_thousand_unknown_nodes_is_refused_quickly_and_keys_keep_working(cluster):
    node = cluster.view[0]
    view = ",".join(cluster.view + [f"127.1.{i // 250}.{i % 250 + 1}:1" for i in range(994)])
    started = time.monotonic()
    status, body = raw_request(node, "PUT", "/kvs/view-change", json.dumps({"view": view, "repl-factor": 1}).encode())
    assert status == 400 and "unreachable" in body["error"]
    assert time.monotonic() - started < 10          # a bound on the answer, not a speed target
    assert raw_request(node, "PUT", "/kvs/keys/after-huge-view", b'{"value": "v"}')[0] in (200, 201)
    too_many = ",".join(f"127.1.{i // 250}.{i % 250 + 1}:1" for i in range(2000))
    status, body = raw_request(node, "PUT", "/kvs/view-change", json.dumps({"view": too_many}).encode())
    assert status == 400 and "at most" in body["error"]


@pytest.mark.cluster
@pytest.mark.parametrize("path", ["/kvs/shards//1", "/kvs//shards", "/kvs/view-change//add-member"])
def test_a_path_with_a_double_slash_is_a_json_404_not_a_redirect(cluster, path):
    # found by tests/test_fuzz.py: Flask merged the slashes with a 308 HTML redirect whose Location
    # was built from the client's Host header
    host, port = cluster.view[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("PUT" if "view-change" in path else "GET", path, headers={"Host": "elsewhere.example"})
        resp = conn.getresponse()
        body = resp.read()
        assert (resp.status, resp.getheader("Location")) == (404, None), body
        assert resp.getheader("Content-Type") == "application/json" and "error" in json.loads(body)
    finally:
        conn.close()


@pytest.mark.cluster
@pytest.mark.parametrize("path", ["/health", "/kvs/keys/no-version"])
def test_a_request_without_an_http_version_is_answered_in_http_1_0(cluster, path):
    # found by tests/test_fuzz.py: "GET /x" (HTTP/0.9 to the parser) got "HTTP/0.9 200 OK" and headers,
    # a status line no client reads; waitress answers such a request in HTTP/1.0
    host, port = cluster.view[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path}\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.split(b" ")[0] == b"HTTP/1.0", data
    assert json.loads(rest.partition(b"\r\n\r\n")[2])


class _MakesADirectory:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import os
        return (os.mkdir, (self.path,))


@pytest.mark.cluster
def test_a_pickle_sent_to_a_raft_port_runs_no_code(tmp_path):
    import pickle
    import struct
    import zlib

    from kvs.settings import DEFAULT_RAFT_PORT_OFFSET
    from kvs.testing.cluster import LocalCluster, find_free_base_port

    cluster = LocalCluster(1, 1, str(tmp_path / "unsecured"), base_port=find_free_base_port(3), secret=None)
    cluster.start()
    try:
        cluster.wait_healthy(timeout=60)
        host, port = cluster.view[0].rsplit(":", 1)
        marker = tmp_path / "created-by-a-pickle"
        payload = zlib.compress(pickle.dumps(_MakesADirectory(str(marker)), 2))
        with socket.create_connection((host, int(port) + DEFAULT_RAFT_PORT_OFFSET), timeout=10) as sock:
            sock.sendall(struct.pack("i", len(payload)) + payload)
            assert sock.recv(1) == b""          # the node read the message and dropped the connection
        assert not marker.exists()
        assert "refused to unpickle posix.mkdir" in cluster.log_tail(cluster.view[0], 50)
        assert cluster.healthy(cluster.view[0])
    finally:
        cluster.stop()


@pytest.mark.cluster
def test_with_an_admin_token_a_view_change_needs_it(tmp_path):
    cluster = start_cluster(str(tmp_path / "token"), 1, 1, KVS_ADMIN_TOKEN="admin-secret")
    try:
        node = cluster.view[0]
        body = json.dumps({"view": node, "repl-factor": 1}).encode()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "admin-secret"}):
            status, reply = raw_request(node, "PUT", "/kvs/view-change", body, headers)
            assert status == 401 and "KVS_ADMIN_TOKEN" in reply["error"], headers
        for path in ("/kvs/reshard", "/kvs/view-change/add-member", "/kvs/view-change/remove-member"):
            assert raw_request(node, "PUT", path, b"{}")[0] == 401
        status, reply = raw_request(node, "PUT", "/kvs/view-change", body, {"Authorization": "Bearer admin-secret"})
        assert status == 200 and reply["shards"][0]["shard-id"] == "1"
        assert raw_request(node, "PUT", "/kvs/keys/k", b'{"value": "v"}')[0] == 201     # keys need no token
    finally:
        cluster.stop()


@pytest.mark.cluster
def test_without_a_secret_node_to_node_requests_come_only_from_the_nodes_hosts(tmp_path):
    from kvs.testing.cluster import LocalCluster, find_free_base_port

    cluster = LocalCluster(2, 1, str(tmp_path / "open"), base_port=find_free_base_port(1), secret=None,
                           distinct_hosts=True)            # nodes on 127.0.N.10 and .11; this client is 127.0.0.1
    cluster.start()
    try:
        cluster.wait_healthy(timeout=60)
        node = cluster.view[0]
        forged = {FORWARDED: "1"}
        assert raw_request(node, "GET", "/internal/status", headers=forged)[0] == 401
        assert raw_request(node, "POST", "/internal/groups/1/commands", b'{"command": {"op": "drop", "epoch": 1}}',
                           forged)[0] == 401
        assert raw_request(node, "GET", "/kvs/keys/x", headers=forged)[0] == 401
        # the nodes themselves still forward to each other: every key works through every node
        for i in range(20):
            assert raw_request(cluster.view[i % 2], "PUT", f"/kvs/keys/open-{i}", b'{"value": "v"}')[0] == 201
            assert raw_request(cluster.view[(i + 1) % 2], "GET", f"/kvs/keys/open-{i}")[1]["value"] == "v"
    finally:
        cluster.stop()


@pytest.mark.cluster
def test_the_largest_value_a_client_may_write_survives_view_changes_and_is_read_through_every_node(make_cluster):
    """Issue 11 defect 2: a value just under the 1 MiB body limit (non-ASCII, so JSON escaping would
    triple it) is read through every node, moves in two view changes, and once deleted leaves nothing
    behind that breaks a later change (the deduplication table keeps a digest, not the value)."""
    cluster = make_cluster(3, 1)
    value = "é" * 520_000                           # 1,040,000 bytes of UTF-8: just under the limit
    keys = [f"big-{i}" for i in range(3)]           # whichever shards they fall in, some move below
    writer = KvsClient(cluster.view[0])
    body = json.dumps({"value": value, "causal-context": {}}, ensure_ascii=False).encode()
    assert len(body) < 1 << 20
    for key in keys:
        resp = requests.put(f"http://{cluster.view[0]}/kvs/keys/{key}", data=body,
                            headers={"Content-Type": "application/json"}, timeout=30)
        assert resp.status_code == 201, resp.text

    def readable_everywhere() -> None:
        for node in cluster.view:
            for key in keys:
                status, body = KvsClient(node).get(key)
                assert status == 200 and body["value"] == value, (node, key, status)

    readable_everywhere()
    for shard_count in (1, 3):                      # every key moves at least once
        resp = requests.put(f"http://{cluster.view[1]}/kvs/reshard", json={"shard-count": shard_count}, timeout=120)
        assert resp.status_code == 200, resp.text
        readable_everywhere()
    for key in keys:
        assert writer.delete(key)[0] == 200
    resp = requests.put(f"http://{cluster.view[2]}/kvs/reshard", json={"shard-count": 1}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert sum(s["key-count"] for s in resp.json()["shards"]) == 0


class _Planted:
    """A pickle that, loaded by a plain unpickler, creates a directory: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


@pytest.mark.cluster
@pytest.mark.parametrize("planted_file", ["journal.meta", "snapshot"])
def test_a_pickle_planted_in_a_node_s_own_files_runs_no_code(make_cluster, tmp_path, planted_file):
    """Issue 11 defect 8 covered pickles from the network; a node's journal term/vote file and its
    snapshots are unpickled too, at start, through the same restricted unpickler."""
    cluster = make_cluster(1, 1)
    node = cluster.view[0]
    assert KvsClient(node).put("planted", "v")[0] == 201
    cluster.kill(node)
    marker = str(tmp_path / "code-ran")
    with open(os.path.join(cluster.nodes[node].data_dir, "shard-1", planted_file), "wb") as f:
        f.write(pickle.dumps(_Planted(marker), protocol=2))
    cluster.start_node(node)
    wait_until(lambda: "is not allowed" in cluster.log_tail(node, 200), 60, message="the refusal logged")
    assert "refused to unpickle os.makedirs" in cluster.log_tail(node, 200)
    assert not os.path.exists(marker)
