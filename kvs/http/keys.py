"""GET/PUT/DELETE /kvs/keys/<key>: the hot path, served on the node's event loop.

The asyncio server (`kvs.http.aio`) hands these requests to `KeyRequests` on
the loop itself, with no thread per request and no hand-off; everything else
goes to the Flask app on worker threads. The bodies, codes and headers are the
same as the API has always answered (`kvs.routing.replies`).

The key is the path after /kvs/keys/, percent-decoded as UTF-8 (a path that is
not valid UTF-8 is a 400): every node reads the same key from the same URL, and
a forwarded request is signed and verified over that same decoded path.

Compare-and-set: `If-Match: "<version>"` (or `*`: the key exists) and
`If-None-Match: *` (create-only) make a PUT or DELETE conditional, applied
atomically in the shard's log (`kvs.fsm.shard`); 412 names the current version
when the condition does not hold. Every reply that carries a version carries
it as an `ETag` too. A forwarded request carries its condition in its signed
body. Conditions on GET are ignored.

Limits: keys longer than 50 characters are refused on PUT; request bodies
larger than `NodeSettings.max_body_bytes` (1 MiB by default,
KVS_MAX_BODY_BYTES) get 413 from the server before they are read.
"""

from __future__ import annotations

import itertools
import json
import uuid
from urllib.parse import unquote

from kvs.errors import BadRequest
from kvs.http.aio import Request, Response
from kvs.http.batches import BatchRequests, is_batch
from kvs.http.common import PeerAuth, error_reply, parse_body, request_deadline
from kvs.logs import REQUEST_ID_HEADER
from kvs.routing import peers
from kvs.routing.batches import BatchRouter
from kvs.routing.keys import KeyRouter
from kvs.routing.replies import Reply, etag
from kvs.settings import NodeSettings

MAX_KEY_LENGTH = 50
KEYS_PREFIX = "/kvs/keys/"
# A forwarded key request may be this much larger than the client's body limit: its sender re-encodes
# the value compactly (never longer than the client's encoding) and adds the write's condition. Only a
# request that may be a node's gets it (kvs.http.aio.HttpServer's large-body gate): a value refused
# through one node must be refused through every node, and one accepted accepted through every node.
FORWARDED_BODY_MARGIN = 4096
KEY_METHODS = ("GET", "PUT", "DELETE")


def decoded_path(raw: str) -> str | None:
    """The request path percent-decoded as UTF-8 (None if it is not UTF-8)."""
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return None


def is_fast(method: str, raw_path: str) -> bool:
    """Served on the loop (the server's `fast_paths`): key requests, seed 004's batches and their
    forwarded parts."""
    if raw_path.startswith(KEYS_PREFIX):
        return len(raw_path) > len(KEYS_PREFIX)
    return is_batch(method, raw_path)


def refusal(status: int, error: str, method: str, raw_path: str) -> Response:
    """The body of a request the server refuses before any handler (a 413 body, say): a key request's
    carries "causal-context" like every key reply."""
    body = {"error": error, "message": f"Error in {method}"}
    if raw_path.startswith(KEYS_PREFIX):
        body["causal-context"] = {}
    return Response.json(status, body)


class KeyRequests:
    def __init__(self, settings: NodeSettings, router: KeyRouter, peer_auth: PeerAuth):
        self._settings = settings
        self._router = router
        self._peer_auth = peer_auth       # the node's one instance: the Flask apps share its nonces
        # Request ids: unique per node incarnation, cheaper than a uuid4 per request.
        self._id_prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)
        self._batches = BatchRequests(settings, BatchRouter(router.node, router), peer_auth, self._new_id)

    async def __call__(self, request: Request) -> Response:
        if is_batch(request.method, request.path):
            return await self._batches(request)
        return await self._key_request(request)

    async def _key_request(self, request: Request) -> Response:
        method = request.method
        context: dict = {}
        path = decoded_path(request.path)
        request_id = self._new_id()         # echoed if the client's Idempotency-Key is refused
        try:
            request_id = peers.request_id_of(request.headers, lambda: request_id)
            if path is None:
                raise BadRequest("The key is not valid UTF-8")
            if method not in KEY_METHODS:
                reply = Reply(405, {"error": f"Method {method} is not allowed here",
                                    "message": f"Error in {method}"}, {"Allow": ", ".join(KEY_METHODS)})
            else:
                headers = request.headers
                body = parse_body(request.body)
                given = body.get("causal-context", {})
                if not isinstance(given, dict):
                    raise BadRequest("causal-context must be a JSON object")
                context = given
                forwarded = self._peer_auth.is_forwarded(headers, method, path, request.query, request.body,
                                                         _host(request))
                key = path[len(KEYS_PREFIX):]
                condition = None if method == "GET" else \
                    _forwarded_condition(body) if forwarded else condition_from_headers(headers)
                reply = await self._router.key_request(method, key, _value(method, key, body), request_id,
                                                       request_deadline(self._settings, headers), forwarded, condition)
                reply.body["causal-context"] = context      # the client's, also over a forwarded reply's
                version = reply.body.get("version")
                if type(version) is int and version > 0:
                    reply.headers["ETag"] = etag(version)
        except Exception as exc:
            reply = error_reply(exc, method, path or request.path, context)
        payload = json.dumps(reply.body, separators=(",", ":")).encode()
        return Response(reply.status, payload, [("Content-Type", "application/json"), (REQUEST_ID_HEADER, request_id),
                                                *reply.headers.items()])

    def _new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"


def _host(request: Request) -> str | None:
    return request.peer[0] if request.peer else None


def condition_from_headers(headers) -> tuple | None:
    """The compare-and-set condition of a client's If-Match / If-None-Match headers (None: none)."""
    match, none_match = headers.get("If-Match"), headers.get("If-None-Match")
    if match is not None and none_match is not None:
        raise BadRequest("use either If-Match or If-None-Match, not both")
    if none_match is not None:
        if none_match.strip() != "*":
            raise BadRequest("If-None-Match supports only * (create the key only if it does not exist)")
        return ("absent",)
    if match is None:
        return None
    tag = match.strip()
    if tag == "*":
        return ("exists",)
    digits = tag[1:-1] if len(tag) >= 2 and tag[0] == tag[-1] == '"' else tag
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise BadRequest('If-Match must be one version, as the ETag gives it ("42") or bare (42), or *')
    return ("match", int(digits))


def _forwarded_condition(body: dict) -> tuple | None:
    condition = body.get("condition")
    if condition is None:
        return None
    if not isinstance(condition, list):
        raise BadRequest("a forwarded condition is a list")
    return tuple(condition)


def _value(method: str, key: str, body: dict) -> str | None:
    if method != "PUT":
        return None
    if len(key) > MAX_KEY_LENGTH:
        raise BadRequest("Key is too long")
    value = body.get("value")
    if value is None:
        raise BadRequest("Value is missing")
    if not isinstance(value, str):
        raise BadRequest("Value must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("Value must be valid Unicode (a lone surrogate such as \\ud800 is not)") from None
    return value
