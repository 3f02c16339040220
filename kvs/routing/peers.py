"""Node-to-node HTTP: sending a request to another node, authenticating it, trying replicas in turn.

Every call has a deadline and a timeout derived from it; connection failures
become `PeerUnreachable` (the caller tries another replica). "Try each replica
until one answers or the deadline passes" is `until_one_answers`, the one loop
every caller (the router, the view-change coordinator) uses. When the cluster
has a secret, each forwarded request carries an HMAC-SHA256 signature over the
method, path, timestamp, request id and body; a node that has the secret
refuses forwarded requests whose signature is missing, wrong or older than
`SIGNATURE_MAX_AGE` seconds.

Headers kvs uses between nodes:
    Idempotency-Key     the request id, kept across every retry and hop
    X-Kvs-Forwarded     "1": the sender already routed this request; do not forward it again
    X-Kvs-Deadline-Ms   milliseconds left for the sender; the receiver answers before that
    X-Kvs-Signature     "t=<unix seconds>,s=<hex hmac>"
    X-Kvs-Leader        (response) the HTTP address of the answering group's leader, a hint
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar
from urllib.parse import unquote

import requests
from requests.adapters import HTTPAdapter

from kvs.errors import Unauthorized, Unavailable

T = TypeVar("T")

FORWARDED = "X-Kvs-Forwarded"
DEADLINE = "X-Kvs-Deadline-Ms"
SIGNATURE = "X-Kvs-Signature"
LEADER_HINT = "X-Kvs-Leader"
REQUEST_ID = "Idempotency-Key"
SIGNATURE_MAX_AGE = 300
CONNECT_TIMEOUT = 0.5


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


def sign(secret: str, method: str, path: str, request_id: str, body: bytes, now: float | None = None) -> str:
    """Signature header value; `path` is the unquoted path, as the receiver's router sees it."""
    ts = int(time.time() if now is None else now)
    mac = hmac.new(secret.encode(), f"{method}\n{path}\n{ts}\n{request_id}\n".encode() + body, hashlib.sha256)
    return f"t={ts},s={mac.hexdigest()}"


def verify(secret: str, header: str | None, method: str, path: str, request_id: str, body: bytes) -> None:
    """Raise Unauthorized unless `header` is a fresh, valid signature of the request."""
    if not header:
        raise Unauthorized("forwarded request without a signature")
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        ts = int(fields["t"]) if re.fullmatch(r"[0-9]{1,12}", fields["t"]) else -1
        given = fields["s"]
    except (ValueError, KeyError):
        raise Unauthorized("malformed signature") from None
    if ts < 0:
        raise Unauthorized("malformed signature")
    if abs(time.time() - ts) > SIGNATURE_MAX_AGE:
        raise Unauthorized("signature expired")
    expected = sign(secret, method, path, request_id, body, now=ts).split(",s=", 1)[1]
    if not hmac.compare_digest(expected, given):
        raise Unauthorized("bad signature")


def forwarded_headers(secret: str | None, method: str, path: str, request_id: str, body: bytes,
                      remaining: float) -> dict[str, str]:
    """The headers of a node-to-node request: marked forwarded, its deadline, its id, and signed."""
    headers = {
        FORWARDED: "1",
        DEADLINE: str(max(1, int(remaining * 1000))),
        REQUEST_ID: request_id,
        "Content-Type": "application/json",
    }
    if secret:
        headers[SIGNATURE] = sign(secret, method, unquote(path), request_id, body)
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
        headers = forwarded_headers(self._secret, method, path, request_id, body, remaining)
        try:
            resp = self._session().request(method, f"http://{address}{path}", data=body or None, headers=headers,
                                           timeout=(min(CONNECT_TIMEOUT, remaining), remaining))
        except requests.RequestException as exc:
            raise PeerUnreachable(f"{address}: {exc.__class__.__name__}") from None
        return peer_response(address, resp.status_code, resp.content, resp.headers.get(LEADER_HINT))
