"""HttpClient: node-to-node HTTP/1.1 requests on an asyncio event loop, over pooled keep-alive connections.

`await client.request(address, method, path, headers, body, deadline)` returns
(status, headers, body) or raises `kvs.routing.peers.PeerUnreachable` when the
peer does not answer usefully: refused, reset, closed early, no time left,
timed out (connecting gets min(CONNECT_TIMEOUT, time left); the whole exchange
ends at `deadline`, a `time.monotonic()` value), or a malformed response.

Connections leave from `source_ip` when one is given, as the node's Raft
connections and `kvs.routing.peers.Forwarder` do (a peer that checks where a
request comes from sees the node's own address). A connection goes back to the
address's pool (at most `max_idle_per_address` idle ones, most recent first)
only after a complete keep-alive response; a timed-out, cancelled or failed
exchange closes it. A request sent on a pooled connection that the peer had
already closed (nothing was received) is sent once more on a new connection;
`headers` may be a function, called for each transmission, so that a signed
request is signed anew (a receiver refuses a signature's nonce twice).

One client belongs to one event loop; requests may run concurrently (each
takes its own connection).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable, Iterable, Mapping

import httptools

from kvs.http.aio.messages import Headers
from kvs.routing.peers import CONNECT_TIMEOUT, PeerUnreachable


class _Stale(Exception):
    """A pooled connection was closed by the peer before any byte of the response arrived."""


class HttpClient:
    def __init__(self, *, source_ip: str | None = None, max_idle_per_address: int = 8,
                 max_response_bytes: int = 64 << 20):
        source_ip = source_ip if source_ip not in (None, "", "0.0.0.0", "::") else None
        self._local_addr = (source_ip, 0) if source_ip else None
        self._max_idle = max_idle_per_address
        self._max_response_bytes = max_response_bytes
        self._idle: dict[str, deque[_ClientConnection]] = {}
        self.connections_opened = 0         # for tests and metrics

    async def request(self, address: str, method: str, path: str,
                      headers: Mapping[str, str] | Callable[[], Mapping[str, str]] | None,
                      body: bytes, deadline: float) -> tuple[int, Headers, bytes]:
        """One request; `path` as sent (percent-encoded, with its query); `deadline` in time.monotonic();
        `headers` a mapping, or a function that makes them for each transmission."""
        if time.monotonic() >= deadline:
            raise PeerUnreachable(f"{address}: no time left")
        make = headers if callable(headers) else None
        data = _encode_request(address, method, path, make() if make else headers or {}, body)
        conn = self._pooled(address)
        if conn is not None:
            try:
                return await self._exchange(address, conn, data, method, deadline)
            except _Stale:
                # the peer closed it while idle: one more try, on a new connection (with headers made anew)
                if make is not None:
                    data = _encode_request(address, method, path, make(), body)
        conn = await self._connect(address, deadline)
        try:
            return await self._exchange(address, conn, data, method, deadline)
        except _Stale:
            raise PeerUnreachable(f"{address}: connection closed before a response") from None

    def close(self) -> None:
        """Close every idle connection (those in use close when their exchange ends)."""
        for pool in self._idle.values():
            while pool:
                pool.pop().close()
        self._idle.clear()

    # -- connections ------------------------------------------------------------------------------------------

    def _pooled(self, address: str) -> "_ClientConnection | None":
        pool = self._idle.get(address)
        while pool:
            conn = pool.pop()
            if conn.usable():
                return conn
        return None

    def _release(self, address: str, conn: "_ClientConnection") -> None:
        pool = self._idle.setdefault(address, deque())
        if len(pool) < self._max_idle and conn.usable():
            pool.append(conn)
        else:
            conn.close()

    async def _connect(self, address: str, deadline: float) -> "_ClientConnection":
        host, port = _split_address(address)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerUnreachable(f"{address}: no time left")
        loop = asyncio.get_running_loop()
        conn = _ClientConnection(loop, self._max_response_bytes)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, host, port, local_addr=self._local_addr),
                                   min(CONNECT_TIMEOUT, remaining))
        except asyncio.TimeoutError:
            raise PeerUnreachable(f"{address}: connect timed out") from None
        except OSError as exc:
            raise PeerUnreachable(f"{address}: {exc.__class__.__name__}: {exc.strerror or exc}") from None
        self.connections_opened += 1
        return conn

    async def _exchange(self, address: str, conn: "_ClientConnection", data: bytes, method: str,
                        deadline: float) -> tuple[int, Headers, bytes]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            conn.close()
            raise PeerUnreachable(f"{address}: no time left")
        waiter = conn.send(data, method)
        timer = conn.loop.call_later(remaining, conn.time_out)
        try:
            status, headers, body, reusable = await waiter
        except _Stale:
            conn.close()
            raise
        except _Failure as exc:
            raise PeerUnreachable(f"{address}: {exc}") from None
        except BaseException:
            conn.close()                    # cancelled: the exchange is in an unknown state
            raise
        finally:
            timer.cancel()
        if reusable:
            self._release(address, conn)
        else:
            conn.close()
        return status, headers, body


class _Failure(Exception):
    pass


class _ClientConnection(asyncio.Protocol):
    """One connection to a peer; one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_response_bytes: int):
        self.loop = loop
        self.max_response_bytes = max_response_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.received = 0
        self.head_only = False
        self._reset()

    def _reset(self) -> None:
        self.fields: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.headers_done = False

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes, method: str) -> asyncio.Future:
        self.waiter = self.loop.create_future()
        self.received = 0
        self.head_only = method == "HEAD"
        self._reset()
        if not self.usable():
            self.waiter.set_exception(_Stale())
        else:
            self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def time_out(self) -> None:
        self._fail(_Failure("timed out"), abort=True)

    def _fail(self, exc: Exception, abort: bool = True) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if abort and self.transport is not None:
            self.transport.abort()

    def _done(self, reusable: bool) -> None:
        if self.waiter is not None and not self.waiter.done():
            status = self.parser.get_status_code()
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            self.waiter.set_result((status, Headers._of(self.fields), body, reusable and not self.closed))

    # -- transport callbacks ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self.received == 0:
                self._fail(_Stale(), abort=False)
            elif self.headers_done and self._delimited_by_close():
                self._done(False)
            else:
                self._fail(_Failure(f"connection lost mid-response: {exc or 'closed'}"), abort=False)

    def eof_received(self) -> bool:
        return False                        # connection_lost follows and decides

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()                    # bytes nobody asked for: the connection is not reusable
            return
        self.received += len(data)
        if self.received > self.max_response_bytes + 65536:
            self._fail(_Failure("response too large"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self._fail(_Failure(str(exc.__context__ or exc)))
        except httptools.HttpParserError as exc:
            self._fail(_Failure(f"malformed response ({exc})"))

    # -- parser callbacks -------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.waiter is None or self.waiter.done():
            self.closed = True              # a second response nobody asked for: do not reuse

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip(" \t")
        fields = self.fields
        fields[key] = f"{fields[key]}, {text}" if key in fields else text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return
        self.headers_done = True
        if self.head_only:
            self._done(False)               # no body follows; the parser would wait for one

    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_response_bytes:
            raise _Failure("response too large")
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._reset()                   # an interim response: the real one follows
            return
        self._done(self.parser.should_keep_alive())

    def _delimited_by_close(self) -> bool:
        # A response with neither Content-Length nor chunked coding ends when the peer closes.
        return "content-length" not in self.fields and "chunked" not in self.fields.get("transfer-encoding", "")


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise PeerUnreachable(f"{address}: not a host:port address")
    return host.strip("[]"), int(port)


def _encode_request(address: str, method: str, path: str, headers: Mapping[str, str] | Iterable, body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\n"]
    items = headers.items() if isinstance(headers, Mapping) else headers
    has_host = False
    for name, value in items:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"CR or LF in request header {name!r}")
        lower = name.lower()
        if lower == "content-length" or lower == "transfer-encoding":
            continue
        has_host = has_host or lower == "host"
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        lines.append(f"Host: {address}\r\n")
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    if " " in path or "\r" in path or "\n" in path:
        raise ValueError(f"path {path!r} must be percent-encoded")
    return "".join(lines).encode("latin-1") + body
