"""Node-to-node requests from the event loop: `AsyncForwarder` and the async "try each replica" loop.

The same contract as `kvs.routing.peers` (same headers, same signature, same
`PeerResponse`, `PeerUnreachable` and `TryNext`), on an event loop: requests
go over pooled keep-alive connections (`kvs.http.aio.HttpClient`) instead of a
thread each.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Awaitable, Callable, Sequence, TypeVar

from kvs.errors import Unavailable
from kvs.routing.peers import (LEADER_HINT, PeerResponse, PeerUnreachable, TryNext, forwarded_headers,
                               peer_response)

T = TypeVar("T")


class AsyncForwarder:
    def __init__(self, client, secret: str | None):
        self._client = client           # kvs.http.aio.HttpClient
        self._secret = secret

    async def send(self, address: str, method: str, path: str, payload: dict | None, request_id: str,
                   deadline: float, body: bytes | None = None) -> PeerResponse:
        """`body` (already encoded JSON) is sent as is when given, else `payload` encoded."""
        if deadline - time.monotonic() <= 0:
            raise PeerUnreachable(f"{address}: no time left")
        if body is None:
            # Compact UTF-8, not \\u escapes: a value re-encoded so takes no more bytes than in the client's
            # body; with its condition, what a client could send fits the receiver's FORWARDED_BODY_MARGIN.
            body = b"" if payload is None else json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()

        def headers() -> dict[str, str]:
            # made for each transmission: if the client sends it again, it goes with a new nonce
            return forwarded_headers(self._secret, method, path, request_id, body, deadline - time.monotonic(),
                                     address)

        status, response_headers, raw = await self._client.request(address, method, path, headers, body, deadline)
        return peer_response(address, status, raw, response_headers.get(LEADER_HINT))


async def until_one_answers(addresses: Sequence[str], attempt: Callable[[str, float], Awaitable[T]],
                            deadline: float, *, what: str, attempt_seconds: float = 2.0,
                            pause: float = 0.05) -> T:
    """`kvs.routing.peers.until_one_answers`, awaiting each attempt."""
    last = "no replica tried"
    if not addresses:
        raise Unavailable(f"{what}: no address to try")
    while True:
        for address in addresses:
            now = time.monotonic()
            if now >= deadline:
                raise Unavailable(f"{what}: {last}")
            try:
                return await attempt(address, min(deadline, now + attempt_seconds))
            except PeerUnreachable as exc:
                last = str(exc)
            except TryNext as exc:
                last = f"{address}: {exc}"
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
