"""Node-to-node HTTP: sending a request to another node, authenticating it, trying replicas in turn.

Every call has a deadline and a timeout derived from it; connection failures
become `PeerUnreachable` (the caller tries another replica). "Try each replica
until one answers or the deadline passes" is `until_one_answers`, the one loop
every caller (the router, the view-change coordinator) uses.

When the cluster has a secret, each forwarded request carries an HMAC-SHA256
signature over everything that gives it its meaning: the method, the
percent-decoded path, the query string as sent, the timestamp, a fresh random
nonce, the receiving node's address, the request id, the X-Kvs-Deadline-Ms and
X-Kvs-Forwarded values and the body (`signed_message` builds that string, for
the sender and the receiver alike). A node that has the secret refuses a
forwarded request whose signature is missing, malformed, wrong (also: made for
another node), more than `SIGNATURE_WINDOW` seconds away from its own clock,
made before the node started (the nonces it accepted before a restart are
gone), or whose nonce it has already accepted (`kvs.routing.nonces`): a
captured request cannot be sent again, to any node, nor changed. The request id
is not the nonce: it stays the same across retries (that is what makes a write
exactly-once), and each retry is signed anew.

Headers kvs uses between nodes:
    Idempotency-Key     the request id, kept across every retry and hop
    X-Kvs-Forwarded     "1": the sender already routed this request; do not forward it again
    X-Kvs-Deadline-Ms   milliseconds left for the sender; the receiver answers before that
    X-Kvs-Signature     "t=<unix seconds>,n=<32 hex digits, random>,s=<64 hex digits, the hmac>"
    X-Kvs-Leader        (response) the HTTP address of the answering group's leader, a hint
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar
from urllib.parse import unquote

import requests
from requests.adapters import HTTPAdapter

from kvs.errors import BadRequest, Unauthorized, Unavailable
from kvs.routing.nonces import NonceCache

T = TypeVar("T")

FORWARDED = "X-Kvs-Forwarded"
DEADLINE = "X-Kvs-Deadline-Ms"
SIGNATURE = "X-Kvs-Signature"
LEADER_HINT = "X-Kvs-Leader"
REQUEST_ID = "Idempotency-Key"
# Every replica keeps a write's request id in its deduplication table, its Raft log and its snapshots
# (a batch keeps "<id>#<i>" for each pair), so a client's id is bounded like a key, not like a header.
MAX_REQUEST_ID_CHARS = 128
# How far a signature's time may be from the receiver's clock. A cluster's nodes are expected to keep
# NTP-synced clocks (well within a second); a request is verified once its body is read and a worker
# thread takes it, so a large transfer on a loaded node may take most of a view-change step's 30 s:
# twice that is the margin. The nonces of every accepted signature are kept this long, and no longer.
SIGNATURE_WINDOW = 60
CONNECT_TIMEOUT = 0.5


def request_id_of(headers: Mapping[str, str], new_id: Callable[[], str]) -> str:
    """The request's Idempotency-Key if it has one, else a new id; BadRequest if the key is not 1 to
    MAX_REQUEST_ID_CHARS printable ASCII characters (a retry with a key we changed would not be
    recognised as one, so a bad key is refused, never replaced)."""
    given = headers.get(REQUEST_ID)
    if given is None or given == "":
        return new_id()
    if len(given) > MAX_REQUEST_ID_CHARS or not (given.isascii() and given.isprintable()):
        raise BadRequest(f"{REQUEST_ID} must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters")
    return given


class PeerUnreachable(Exception):
    """The peer did not answer (refused, reset, timed out). Internal to routing."""


class TryNext(Exception):
    """One peer answered, but not usefully (a 503, a refusal another replica may not give)."""


_DEADLINE_MS = re.compile(r"[0-9]{1,9}")


def deadline_from(headers: Mapping[str, str], ceiling: float) -> float:
    """Now + `ceiling` seconds, shortened to what the sender says it has left (X-Kvs-Deadline-Ms).

    Only plain ASCII digits count: anything else (`²`, 5,000 digits) is ignored, not an error."""
    given = headers.get(DEADLINE) or ""
    if _DEADLINE_MS.fullmatch(given):
        ceiling = min(ceiling, int(given) / 1000.0)
    return time.monotonic() + ceiling


def until_one_answers(addresses: Sequence[str], attempt: Callable[[str, float], T], deadline: float, *,
                      what: str, attempt_seconds: float = 2.0, pause: float = 0.05) -> T:
    """`attempt(address, attempt_deadline)` on each address in turn, round after round, until one
    returns; `PeerUnreachable` and `TryNext` move on to the next address, any other exception ends
    the loop. At the deadline: `Unavailable` naming `what` and the last failure.

    Each attempt gets at most `attempt_seconds` (a paused peer must not take the whole deadline), and
    a round in which every address failed is followed by `pause` (bounded by the deadline)."""
    last = "no replica tried"
    while True:
        for address in addresses:
            now = time.monotonic()
            if now >= deadline:
                raise Unavailable(f"{what}: {last}")
            try:
                return attempt(address, min(deadline, now + attempt_seconds))
            except PeerUnreachable as exc:
                last = str(exc)
            except TryNext as exc:
                last = f"{address}: {exc}"
        if not addresses:
            raise Unavailable(f"{what}: no address to try")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))


@dataclass
class PeerResponse:
    status: int
    body: dict
    leader_hint: str | None


_SIGNATURE = re.compile(r"t=([0-9]{1,12}),n=([0-9a-f]{32}),s=([0-9a-f]{64})")


def signed_message(method: str, path: str, query: str, ts: int, nonce: str, headers: Mapping[str, str],
                   receiver: str) -> bytes:
    """What a signature covers besides the body (which follows it), the one definition for sender and
    receiver: the receiving node (its address as the view names it: a request captured on its way to
    one node is refused by every other), `path` percent-decoded (as the receiver's router reads it),
    `query` as sent (without the "?"), and the headers that change what the receiver does. Each field
    of free text is prefixed by its length, so that none can pose as another (a decoded path may hold a
    newline); the method (an HTTP token), the time and the nonce (hex) cannot. An f-string, not JSON:
    a third of the cost."""
    rid, deadline, forwarded = headers.get(REQUEST_ID, ""), headers.get(DEADLINE, ""), headers.get(FORWARDED, "")
    return (f"{method}\n{ts}\n{nonce}\n{len(receiver)}:{receiver}\n{len(path)}:{path}\n{len(query)}:{query}\n"
            f"{len(rid)}:{rid}\n{len(deadline)}:{deadline}\n{len(forwarded)}:{forwarded}\n"
            ).encode("utf-8", "surrogatepass")


def _mac(secret: str, message: bytes, body: bytes) -> str:
    mac = hmac.new(secret.encode(), message, hashlib.sha256)
    mac.update(body)                # not concatenated: an internal body may be hundreds of megabytes
    return mac.hexdigest()


def sign(secret: str, method: str, target: str, headers: Mapping[str, str], body: bytes, *, to: str,
         now: float | None = None, nonce: str | None = None) -> str:
    """The X-Kvs-Signature value of a request to the node at `to` for `target` (its path and query as
    sent, percent-encoded) whose other headers are `headers`: a fresh nonce unless one is given (tests
    give one)."""
    ts = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16) if nonce is None else nonce
    path, _, query = target.partition("?")
    message = signed_message(method, unquote(path), query, ts, nonce, headers, to)
    return f"t={ts},n={nonce},s={_mac(secret, message, body)}"


def plausible_signature(header: str | None, now: float | None = None) -> bool:
    """Whether `header` is a well-formed signature dated within the window: what can be known of a
    request before its body is read (the MAC covers the body). Only a gate for reading large bodies."""
    match = _SIGNATURE.fullmatch(header or "")
    return match is not None and abs((time.time() if now is None else now) - int(match[1])) <= SIGNATURE_WINDOW


def verify(secret: str, headers: Mapping[str, str], method: str, path: str, query: str, body: bytes,
           seen: NonceCache, now: float | None = None, *, receiver: str) -> None:
    """Raise Unauthorized unless the request carries a valid signature for `receiver` (this node's
    address), made within the window, whose nonce `seen` has not admitted before. `path` is
    percent-decoded, `query` as received."""
    header = headers.get(SIGNATURE)
    if not header:
        raise Unauthorized("forwarded request without a signature")
    match = _SIGNATURE.fullmatch(header)
    if match is None:
        raise Unauthorized("malformed signature")
    ts, nonce, given = int(match[1]), match[2], match[3]
    now = time.time() if now is None else now
    if abs(now - ts) > SIGNATURE_WINDOW:
        raise Unauthorized("signature expired")
    message = signed_message(method, path, query, ts, nonce, headers, receiver)
    if not hmac.compare_digest(_mac(secret, message, body), given):
        raise Unauthorized("bad signature")
    # Only now, authentic: a sender without the secret cannot fill the cache.
    if not seen.admit(ts, nonce, now):
        raise Unauthorized("replayed request")


def forwarded_headers(secret: str | None, method: str, target: str, request_id: str, body: bytes,
                      remaining: float, to: str) -> dict[str, str]:
    """The headers of one transmission of a node-to-node request to the node at `to` for `target` (path
    and query as sent): marked forwarded, its deadline, its id, and signed with a fresh nonce (build
    them again to resend)."""
    headers = {
        FORWARDED: "1",
        DEADLINE: str(max(1, int(remaining * 1000))),
        REQUEST_ID: request_id,
        "Content-Type": "application/json",
    }
    if secret:
        headers[SIGNATURE] = sign(secret, method, target, headers, body, to=to)
    return headers


def peer_response(address: str, status: int, raw: bytes, leader_hint: str | None) -> PeerResponse:
    """A peer's answer as routing reads it (PeerUnreachable if it is not a JSON body)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise PeerUnreachable(f"{address}: answered {status} without JSON") from None
    return PeerResponse(status, data if isinstance(data, dict) else {}, leader_hint)


class _SourceAddressAdapter(HTTPAdapter):
    """Connections leave from the node's own IP, as its Raft connections do (see kvs.raft.replica)."""

    def __init__(self, source_ip: str):
        self._source_ip = source_ip
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self._source_ip, 0)
        super().init_poolmanager(*args, **kwargs)


class Forwarder:
    """Sends requests to peer nodes, one pooled HTTP session per thread."""

    def __init__(self, secret: str | None, source_ip: str | None = None):
        self._secret = secret
        self._source_ip = source_ip if source_ip not in (None, "", "0.0.0.0", "::") else None
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            if self._source_ip:
                session.mount("http://", _SourceAddressAdapter(self._source_ip))
        return session

    def send(self, address: str, method: str, path: str, payload: dict | None, request_id: str,
             deadline: float) -> PeerResponse:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerUnreachable(f"{address}: no time left")
        body = b"" if payload is None else json.dumps(payload).encode()
        headers = forwarded_headers(self._secret, method, path, request_id, body, remaining, address)
        try:
            resp = self._session().request(method, f"http://{address}{path}", data=body or None, headers=headers,
                                           timeout=(min(CONNECT_TIMEOUT, remaining), remaining))
        except requests.RequestException as exc:
            raise PeerUnreachable(f"{address}: {exc.__class__.__name__}") from None
        return peer_response(address, resp.status_code, resp.content, resp.headers.get(LEADER_HINT))
