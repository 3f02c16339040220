"""Fuzzing the key, admin and internal API of running nodes with hypothesis (issue 11).

A 2-shard x 2-replica cluster of real processes, with a cluster secret and an admin token, gets
random requests (strategies and the socket client in tests/fuzz_http.py): any method, path,
header and body, most framed correctly, some not. Every answer must be one the API documents:
below 500, or the 503 "Unable to satisfy request"; a JSON object wherever there is a body; within
the node's request timeout plus a margin (no answer by then is a hang). After each test every node
is alive and healthy, logged no unexpected error, and every preloaded key reads the same through
every node.

What keeps the fuzzer from changing what it checks:
  - admin requests never carry the real token (a random view change that happened to be valid
    would reshape the cluster): they must be refused, 401, before anything runs;
  - no request that could write names a preloaded key: "keep" appears in none of them, even
    percent-decoded; reads of preloaded keys are drawn on purpose and must get the preloaded value.

Reproducible: examples derive from each test's name (`derandomize`), so CI runs the same ones
every time. Soaks: KVS_FUZZ_EXAMPLES=N runs N examples per test, KVS_FUZZ_SEED=S draws others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, assume, given, note, seed, settings
from hypothesis import strategies as st

from kvs.http.aio.messages import split_target, wsgi_path
from kvs.http.keys import decoded_path
from kvs.routing.nonces import NonceCache
from kvs.routing.peers import (DEADLINE, FORWARDED, REQUEST_ID, SIGNATURE, SIGNATURE_WINDOW, signed_message,
                               verify)
from kvs.settings import REQUEST_TIMEOUT_SECONDS
from kvs.testing.cluster import LocalCluster, wait_until

from . import fuzz_http as fz
from .conftest import TEST_SECRET, start_cluster

pytestmark = pytest.mark.cluster

ADMIN_TOKEN = f"fuzz-admin-{uuid.uuid4().hex}"     # random per run: no strategy can draw it
# A node answers within its request timeout; the margin covers this client and a loaded CI machine.
ANSWER_SECONDS = REQUEST_TIMEOUT_SECONDS + 3.0
PRELOADED = {**{f"keep-{i}": f"value-{i}" for i in range(12)},
             "keep-café": "é", "keep-☃": "snow ☃", "keep-.": "dot", "keep-a b": "a space", "keep-/x": "slash"}
FAILURE_MARKS = (" ERROR ", " CRITICAL ", "Traceback")     # a node under fuzz logs neither in normal operation

EXAMPLES = int(os.environ.get("KVS_FUZZ_EXAMPLES", "0"))
SEED = os.environ.get("KVS_FUZZ_SEED")


def fuzzing(default_examples: int):
    """Bounded, reproducible hypothesis settings (see the module docstring for the soak variables)."""
    def decorate(test):
        test = settings(max_examples=EXAMPLES or default_examples, deadline=None, database=None,
                        derandomize=SEED is None, print_blob=True, suppress_health_check=list(HealthCheck))(test)
        return seed(int(SEED))(test) if SEED is not None else test
    return decorate


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """The cluster under fuzz, with the preloaded keys written through alternating nodes."""
    cluster = start_cluster(str(tmp_path_factory.mktemp("fuzz")), 2, 2, KVS_ADMIN_TOKEN=ADMIN_TOKEN, KVS_FSYNC="off")
    try:
        for i, (key, value) in enumerate(PRELOADED.items()):
            resp = requests.put(key_url(cluster.view[i % len(cluster.view)], key), json={"value": value}, timeout=10)
            assert resp.status_code == 201, resp.text
        yield cluster
    finally:
        cluster.stop()


def key_url(node: str, key: str) -> str:
    return f"http://{node}/kvs/keys/{quote(key, safe='')}"


# Keys that a write answered 503 for: its outcome is unknown and it may still apply, even after a later
# write (linearizable all the same: it never returned), so their value is not checked any more.
UNCERTAIN: set[str] = set()


def remember_uncertain(request: fz.FuzzRequest, answers: list[fz.Answer]) -> None:
    raw_path = split_target(request.target)[0]
    path = decoded_path(raw_path) if raw_path.startswith("/kvs/keys/") else None
    if path is not None and request.method in ("PUT", "DELETE") and any(a.status == 503 for a in answers[:1]):
        UNCERTAIN.add(path[len("/kvs/keys/"):])


# -- what every answer must be -------------------------------------------------------------------------------

def check_answer(method: str, answer: fz.Answer) -> dict | None:
    """The answer's JSON body (None when it has none); AssertionError unless the API documents it."""
    body = None
    if method != "HEAD" and answer.status not in (204, 304):
        if not (method == "OPTIONS" and answer.status == 200 and not answer.body and "allow" in answer.headers):
            # Flask's automatic OPTIONS answer (an empty 200 naming the allowed methods) is the one exception
            assert answer.headers.get("content-type", "").startswith("application/json"), answer
            body = json.loads(answer.body)
            assert isinstance(body, dict), answer
    if answer.status >= 500:
        assert answer.status == 503, answer
        assert body is None or body.get("error") == "Unable to satisfy request", answer
    if body is not None and answer.status >= 400:
        assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), answer
    return body


def send(node: str, request: fz.FuzzRequest) -> list[fz.Answer]:
    """Send `request` to `node`; its answers, each checked (the tests `note` them, on their own thread)."""
    methods = request.methods
    answers = fz.exchange(node, request.wire(), ANSWER_SECONDS, methods)
    remember_uncertain(request, answers)
    for i, answer in enumerate(answers):
        # Beyond the known methods, answers belong to what a lying framing left over: of unknown method.
        check_answer(methods[i] if i < len(methods) else "GET", answer)
    return answers


def send_noted(node: str, request: fz.FuzzRequest) -> list[fz.Answer]:
    note(f"{node} {request.framing}: {request.wire()[:600]!r}")
    answers = send(node, request)
    note(f"answers: {answers!r}"[:1200])
    return answers


def harmless(request: fz.FuzzRequest, reads_preloaded: bool = False) -> bool:
    """Whether the request may be sent: never the admin token, no preloaded key unless it reads one."""
    return not fz.mentions(request, ADMIN_TOKEN) and (reads_preloaded or not fz.mentions(request, "keep"))


def read_until_answered(node: str, key: str) -> tuple[int, str | None]:
    """(status, value) of a GET, asked again while it is a 503 (documented: a busy CI machine may
    delay an election), for at most 15 s."""
    def answered():
        resp = requests.get(key_url(node, key), timeout=ANSWER_SECONDS)
        return None if resp.status_code == 503 else (resp.status_code, resp.json().get("value"))
    return wait_until(answered, 15, message=f"an answer for {key!r} from {node}")


def assert_intact(cluster: LocalCluster) -> None:
    """Every node alive and healthy, no unexpected error in its log, every preloaded key as written."""
    for node in cluster.view:
        assert cluster.alive(node), f"{node} exited\n{cluster.log_tail(node)}"
        wait_until(lambda: cluster.healthy(node), 15, message=f"{node} healthy")
        for key, value in PRELOADED.items():
            assert read_until_answered(node, key) == (200, value), (node, key)
        with open(cluster.nodes[node].log_path, errors="replace") as f:
            log = f.read()
        found = [line for line in log.splitlines() if any(mark in line for mark in FAILURE_MARKS)]
        assert not found, f"{node} logged failures:\n" + "\n".join(found[:20]) + f"\n{cluster.log_tail(node, 60)}"


# -- the key requests ----------------------------------------------------------------------------------------

@dataclass
class KeyCase:
    request: fz.FuzzRequest
    preloaded: str | None = None        # the preloaded key it reads
    written: str | None = None          # the key a plausible write names (read back if it succeeds)
    value: str | None = None


def _plain(method: str, key: str, body: bytes) -> fz.FuzzRequest:
    return fz.FuzzRequest(method, f"/kvs/keys/{quote(key, safe='')}".encode(), [("Content-Length", str(len(body)))],
                          body)


@st.composite
def key_cases(draw) -> KeyCase:
    """An eighth reads a preloaded key; three eighths are plausible writes (a short key, a string value,
    random headers), so that many reach the groups; the rest are anything."""
    kind = draw(st.integers(0, 7))
    if kind == 0:
        key = draw(st.sampled_from(sorted(PRELOADED)))
        request = _plain("GET", key, draw(fz.bodies))
        request.headers[:0] = draw(fz.headers)
        return KeyCase(request, preloaded=key)
    if kind <= 3:
        key, value = draw(st.text(max_size=50)), draw(st.text(max_size=80))
        method = draw(st.sampled_from(["PUT", "PUT", "DELETE"]))
        body = {"value": value, "causal-context": draw(fz.contexts)} if method == "PUT" else {}
        request = _plain(method, key, json.dumps(body).encode())
        # without a request id of the client's, each write is a new operation (one that reused an earlier
        # write's id would get that write's outcome back, and change nothing: no value to read back)
        request.headers[:0] = [h for h in draw(fz.headers) if h[0].lower() != REQUEST_ID.lower()]
        request = draw(signed_or_not(st.just(request)))
        signed = any(name == REQUEST_ID for name, _ in request.headers)
        return KeyCase(request, written=None if signed else key, value=value if method == "PUT" else None)
    return KeyCase(draw(signed_or_not(fz.key_requests)))


@st.composite
def signed_or_not(draw, requests_: st.SearchStrategy[fz.FuzzRequest]) -> fz.FuzzRequest:
    """A fifth of the requests validly signed, as a forwarding node sends them, so that what lies behind
    the signature check is fuzzed too: key requests of any method (no preloaded key is written, see
    the guard), reads of anything else (a signed write to /internal/ could act: never drawn)."""
    request = draw(requests_)
    raw_path, query = split_target(request.target)
    if raw_path.startswith("/kvs/keys/"):
        path = decoded_path(raw_path)       # what the key handler verifies: the path decoded as UTF-8
    elif request.method in ("GET", "HEAD"):
        path = wsgi_path(raw_path)          # what Flask verifies: PEP 3333's latin-1 PATH_INFO
    else:
        return request
    if path is not None and draw(st.integers(0, 4)) == 0:
        rid = draw(st.text("0123456789abcdef", min_size=1, max_size=32))
        marks = {FORWARDED.lower(), REQUEST_ID.lower(), SIGNATURE.lower(), DEADLINE.lower()}
        request.headers = [h for h in request.headers if h[0].lower() not in marks]
        signed = {FORWARDED: "1", REQUEST_ID: rid}
        request.headers += list(signed.items())
        request.to_sign = (path, query, signed)        # signed for the node it goes to: see `for_node`
    return request


def for_node(node: str, request: fz.FuzzRequest) -> fz.FuzzRequest:
    """`request` as sent to `node`: with its signature, made for that node, if it is to be signed."""
    if request.to_sign is None:
        return request
    path, query, signed = request.to_sign
    return dataclasses.replace(request, headers=request.headers + [
        (SIGNATURE, signature(request.method, path, query, signed, request.body, node))])


def signature(method: str, path: str, query: str, headers: dict, body: bytes, receiver: str) -> str:
    """A valid X-Kvs-Signature for a request whose path the receiver reads as `path` (the key handler
    decodes UTF-8, Flask reads PEP 3333's latin-1; `peers.sign` itself decodes UTF-8, as the key path)."""
    ts, nonce = int(time.time()), secrets.token_hex(16)
    mac = hmac.new(TEST_SECRET.encode(), signed_message(method, path, query, ts, nonce, headers, receiver),
                   hashlib.sha256)
    mac.update(body)
    value = f"t={ts},n={nonce},s={mac.hexdigest()}"
    # the receiver's own check accepts it (so the fuzzer really reaches what lies behind it)
    verify(TEST_SECRET, {**headers, SIGNATURE: value}, method, path, query, body, NonceCache(SIGNATURE_WINDOW),
           receiver=receiver)
    return value


def test_random_key_requests_get_a_documented_answer_in_time_and_leave_preloaded_keys_alone(fuzzed):
    @fuzzing(800)
    @given(node=st.sampled_from(fuzzed.view), other=st.sampled_from(fuzzed.view), case=key_cases())
    def run(node, other, case):
        assume(harmless(case.request, case.preloaded is not None))
        answers = send_noted(node, for_node(node, case.request))
        assert len(answers) == 1, answers
        status = answers[0].status
        if case.preloaded is not None and status == 200:
            assert json.loads(answers[0].body)["value"] == PRELOADED[case.preloaded]
        if case.written is not None and case.written not in UNCERTAIN and status in (200, 201):
            # an acknowledged write is what every node reads next (linearizable), here through another one
            assert read_until_answered(other, case.written) == \
                ((200, case.value) if case.value is not None else (404, None)), case

    run()
    assert_intact(fuzzed)


# -- everything else: admin, information, internal, unknown ---------------------------------------------------

def test_random_admin_info_and_internal_requests_are_refused_or_answered_in_time(fuzzed):
    epoch = requests.get(f"http://{fuzzed.view[0]}/kvs/view-change", timeout=5).json()["epoch"]

    @fuzzing(500)
    @given(node=st.sampled_from(fuzzed.view), request=signed_or_not(fz.well_formed(fz.other_targets)))
    def run(node, request):
        assume(harmless(request))
        answers = send_noted(node, for_node(node, request))
        assert len(answers) == 1, answers
        path = split_target(request.target)[0]
        if request.method == "PUT" and path in fz.ADMIN_PATHS:
            # never acted on, the token never being right: 401, or refused earlier (413 for the body's size;
            # 405 or 400 from Werkzeug's routing for a websocket upgrade, which no route takes)
            assert 400 <= answers[0].status < 500, answers

    run()
    assert_intact(fuzzed)
    for node in fuzzed.view:        # no change ran: every node still at the epoch it started with
        assert requests.get(f"http://{node}/kvs/view-change", timeout=5).json()["epoch"] == epoch


# -- framing that lies or breaks the grammar -------------------------------------------------------------------

def test_malformed_http_is_refused_or_closed_never_a_5xx_or_a_hang(fuzzed):
    @fuzzing(400)
    @given(node=st.sampled_from(fuzzed.view), request=fz.malformed())
    def run(node, request):
        assume(harmless(request))
        send_noted(node, request)

    run()
    assert_intact(fuzzed)


# -- many at once -------------------------------------------------------------------------------------------------

def test_random_requests_sent_together_each_get_a_documented_answer_in_time(fuzzed):
    """Several connections at once: followers batch their writes to the leader, the loop serves keys
    while Flask threads serve the rest; no answer may be lost, mixed up or late."""
    anything = st.one_of(key_cases(), signed_or_not(fz.well_formed(fz.other_targets)).map(KeyCase),
                         fz.malformed().map(KeyCase))

    @fuzzing(120)
    @given(sent=st.lists(st.tuples(st.sampled_from(fuzzed.view), anything), min_size=2, max_size=8))
    def run(sent):
        assume(all(harmless(case.request, case.preloaded is not None) for _, case in sent))
        for node, case in sent:
            note(f"{node} {case.request!r}")
        with ThreadPoolExecutor(len(sent)) as pool:
            results = list(pool.map(lambda sent_one: send(sent_one[0], sent_one[1].request), sent))
        for (node, case), answers in zip(sent, results):
            assert len(answers) == 1 or not case.request.well_formed, (case, answers)
            if case.preloaded is not None and answers and answers[0].status == 200:
                assert json.loads(answers[0].body)["value"] == PRELOADED[case.preloaded]

    run()
    assert_intact(fuzzed)
