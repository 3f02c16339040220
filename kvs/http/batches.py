"""Seed 004's batch API, served on the event loop beside the key requests.

    PUT  /set     [{"key": K, "value": V}, ...]  -> [{"keys_added": n, "keys_failed": [{"key": K, "error": why}]}]
    POST /fetch   [K, ...]                        -> [{"key": K, "value": V}
                                                      | {"key": K, "value": null, "error": why}, ...]
    POST /query   [K, ...]                        -> [{"key": K, "value": true | false}
                                                      | {"key": K, "value": null, "error": why}, ...]
    GET  /fetch                                   -> [{"key": K, "value": V}, ...]  every pair, streamed

where K and V are {"encoding": "string" | "binary", "data": text or base64}.
A binary key that is valid UTF-8 is the string key with the same bytes: one
keyspace with `/kvs/keys/<key>`. Values keep the encoding they were written
with. Each shard's part of a `/set` is applied atomically and exactly once per
Idempotency-Key (`kvs.routing.batches`); the batch as a whole is not atomic
across shards, so a pair of a shard that cannot be reached is listed in
keys_failed with the reason while the others are written.

Limits: at most MAX_PAIRS pairs or keys per request (413), the body at most
`NodeSettings.max_body_bytes` (413 from the server); a malformed body or item
is a 400 naming the item; a key longer than MAX_KEY_LENGTH (characters, or
bytes for a binary key) fails alone, as the REST API refuses it; a batched
read answers with up to `kvs.routing.batches.FETCH_BYTES` of values ("not
read" for the keys past it).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any, AsyncIterator, Callable

from kvs.errors import BadRequest, NotMember, PayloadTooLarge, Unauthorized
from kvs.fsm.batch import MAX_BATCH_PAIRS as MAX_PAIRS
from kvs.fsm.shard import Written
from kvs.http.aio import Request, Response
from kvs.http.common import PeerAuth, error_reply, parse_body, request_deadline
from kvs.logs import REQUEST_ID_HEADER
from kvs.routing import peers
from kvs.routing.batches import OPS, ROUTE, BatchRouter
from kvs.settings import NodeSettings

MAX_KEY_LENGTH = 50
PUBLIC = {"/set": ("PUT",), "/fetch": ("GET", "POST"), "/query": ("POST",)}


def is_batch(method: str, raw_path: str) -> bool:
    return raw_path in PUBLIC or (raw_path.startswith(ROUTE) and method == "POST")


class BatchRequests:
    def __init__(self, settings: NodeSettings, router: BatchRouter, peer_auth: PeerAuth, new_id: Callable[[], str]):
        self._settings = settings
        self._router = router
        self._peer_auth = peer_auth
        self._new_id = new_id

    async def __call__(self, request: Request) -> Response:
        method, path = request.method, request.path
        request_id = self._new_id()         # echoed if the client's Idempotency-Key is refused
        echo = [(REQUEST_ID_HEADER, request_id)]
        try:
            request_id = peers.request_id_of(request.headers, lambda: request_id)
            echo = [(REQUEST_ID_HEADER, request_id)]
            if path.startswith(ROUTE):
                return await self._forwarded(request, request_id)
            if method not in PUBLIC[path]:
                return Response.json(405, {"error": f"Method {method} is not allowed here",
                                           "message": f"Error in {method}"}, [("Allow", ", ".join(PUBLIC[path]))])
            deadline = request_deadline(self._settings, request.headers)
            if method == "GET":
                return await self._fetch_all(request_id)
            items = _json_list(request.body)
            if path == "/set":
                return Response.json(200, await self._set(items, request_id, deadline), echo)
            return Response.json(200, await self._read(items, path == "/query", request_id, deadline), echo)
        except Exception as exc:
            reply = error_reply(exc, method, path)
            return Response.json(reply.status, reply.body, echo)

    async def _set(self, items: list, request_id: str, deadline: float) -> list:
        pairs, failed = [], []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "key" not in item or "value" not in item:
                raise BadRequest(f"item {i}: a pair is {{\"key\": {{...}}, \"value\": {{...}}}}")
            key, value = decode_key(item["key"], f"item {i}: key"), decode(item["value"], f"item {i}: value")
            why = _key_refused(key)
            if why:
                failed.append({"key": item["key"], "error": why})
            else:
                pairs.append((i, key, value))
        outcomes = await self._router.set_pairs(pairs, request_id, deadline) if pairs else {}
        added = 0
        for i, _, _ in pairs:
            if isinstance(outcomes.get(i), Written):
                added += 1
            else:
                failed.append({"key": items[i]["key"], "error": str(outcomes.get(i, "not written"))})
        return [{"keys_added": added, "keys_failed": failed}]

    async def _read(self, items: list, exists_only: bool, request_id: str, deadline: float) -> list:
        keys = [(i, decode_key(item, f"item {i}")) for i, item in enumerate(items)]
        outcomes = await self._router.read_keys(keys, exists_only, request_id, deadline) if keys else {}
        answers = []
        for i, _ in keys:
            found = outcomes.get(i, "not read")
            if isinstance(found, str):
                answers.append({"key": items[i], "value": None, "error": found})
            elif exists_only:
                answers.append({"key": items[i], "value": found})
            elif found is None:
                answers.append({"key": items[i], "value": None, "error": "Key does not exist"})
            else:
                answers.append({"key": items[i], "value": encode(found[0])})
        return answers

    async def _fetch_all(self, request_id: str) -> Response:
        epoch = self._router_epoch()
        shards = epoch.shard_ids()
        listing = self._new_id()          # this node's own id: listings never share a key list by accident
        # The first page is read before the answer starts: a shard that cannot answer at all is a clean 503.
        first = await self._router.scan(shards[0], listing, None, request_id, self._page_deadline())
        return Response(200, headers=[("Content-Type", "application/json"), (REQUEST_ID_HEADER, request_id)],
                        stream=self._listing(epoch.number, shards, listing, first, request_id))

    async def _listing(self, number: int, shards: list[str], listing: str, first: tuple,
                       request_id: str) -> AsyncIterator[bytes]:
        """The listing's body; raising breaks the connection off (kvs.http.aio)."""
        yield b"["
        separator = b""
        for n, shard_id in enumerate(shards):
            page = first if n == 0 else await self._router.scan(shard_id, listing, None, request_id,
                                                                 self._page_deadline())
            shard_epoch = page[2]
            while True:
                rows, after, epoch = page
                if epoch != shard_epoch:
                    raise RuntimeError(f"shard {shard_id} changed ownership during the listing")
                if rows:
                    yield separator + b",".join(_pair_json(k, v) for k, v in rows)
                    separator = b","
                if after is None:
                    break
                page = await self._router.scan(shard_id, listing, after, request_id, self._page_deadline())
            if self._router_epoch().number != number:
                # keys may have moved between shards already listed and the rest: no silent gap or repeat
                raise RuntimeError(f"the configuration changed from epoch {number} during the listing")
        yield b"]"

    async def _forwarded(self, request: Request, request_id: str) -> Response:
        """POST /internal/batches/<shard>/<op>: a part another node sends this node to serve."""
        if not self._peer_auth.is_forwarded(request.headers, request.method, request.path, request.query,
                                            request.body, request.peer[0] if request.peer else None):
            raise Unauthorized("internal endpoints are for nodes only")
        shard_id, _, op = request.path[len(ROUTE):].partition("/")
        if op not in OPS or not shard_id:
            raise BadRequest(f"not a batch operation: {op[:20]!r}")
        body = await self._router.serve_forwarded(shard_id, op, parse_body(request.body), request_id,
                                                  request_deadline(self._settings, request.headers))
        return Response.json(200, body, [(REQUEST_ID_HEADER, request_id)])

    def _router_epoch(self):
        epoch = self._router.epoch
        if epoch is None:
            raise NotMember("this node does not know the cluster configuration")
        return epoch

    def _page_deadline(self) -> float:
        return time.monotonic() + self._settings.request_timeout


# -- the seed's data objects -----------------------------------------------------------------------------

def decode(obj: object, what: str) -> str | bytes:
    """{"encoding": "string" | "binary", "data": ...} -> str or bytes; BadRequest if malformed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), str) \
            or obj.get("encoding") not in ("string", "binary"):
        raise BadRequest(f'{what} must be {{"encoding": "string" or "binary", "data": "..."}}')
    data = obj["data"]
    if obj["encoding"] == "binary":
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{what}: binary data must be base64") from None
    try:
        data.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what}: a string must be valid Unicode (no lone surrogates)") from None
    return data


def decode_key(obj: object, what: str) -> str | bytes:
    """A key: binary keys that are valid UTF-8 become the string key of the same bytes (one keyspace)."""
    key = decode(obj, what)
    if isinstance(key, bytes):
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            return key
    return key


def encode(data: str | bytes) -> dict:
    if isinstance(data, bytes):
        return {"encoding": "binary", "data": base64.b64encode(data).decode("ascii")}
    return {"encoding": "string", "data": data}


def _pair_json(key: str | bytes, value: str | bytes) -> bytes:
    return json.dumps({"key": encode(key), "value": encode(value)}, separators=(",", ":")).encode()


def _key_refused(key: str | bytes) -> str | None:
    if not key:
        return "Key is empty"
    if len(key) > MAX_KEY_LENGTH:
        return "Key is too long"
    return None


def _json_list(raw: bytes) -> list[Any]:
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):
        raise BadRequest("Malformed JSON body") from None
    if not isinstance(body, list):
        raise BadRequest("The JSON body must be a list")
    if len(body) > MAX_PAIRS:
        raise PayloadTooLarge(f"at most {MAX_PAIRS} pairs or keys per request ({len(body)} sent)")
    return body
