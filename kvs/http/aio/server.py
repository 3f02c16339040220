"""HttpServer: HTTP/1.1 on one asyncio event loop (uvloop when installed), httptools for parsing.

A request for which `fast_paths(method, path)` is true is served by `await
fast_handler(request)` on the loop itself, with no thread hand-off; every other
request goes to the WSGI application on a pool of `wsgi_threads` threads (see
`kvs.http.aio.wsgi`). Responses on one connection leave in the order their
requests arrived (pipelining); one request per connection is served at a time.

What a real client needs, and what a server must refuse:
  - keep-alive: HTTP/1.1 by default, HTTP/1.0 with "Connection: keep-alive";
  - "Expect: 100-continue" answered "100 Continue" once the request is next in
    line, unless its Content-Length is refused;
  - chunked request bodies (the handler sees the decoded body);
  - a Content-Length over `max_body_bytes`: 413 with kvs's JSON error body,
    sent before the body is read; a chunked body that grows past it: 413 too;
  - malformed HTTP: 400 (a target with raw bytes over 0x7F included, as with
    waitress: clients percent-encode); a target over `max_header_bytes`: 414; a
    head over it or with more than `max_headers` fields: 431. After a 4xx refusal the server stops reading
    requests, half-closes, and discards what the client still sends for at most
    `connection.LINGER_SECONDS` (closing at once would reset the connection and
    the client could lose the answer);
  - at most `max_connections` connections: the next ones get 503 and are closed;
  - a connection with nothing in flight and no byte received for `idle_timeout`
    seconds is closed;
  - backpressure: while the transport's write buffer is over its high-water mark
    (`write_buffer_bytes`), reading pauses and the next request waits; reading
    also pauses while `max_pipelined` requests wait on one connection.
Every response carries Content-Length (but 1xx/204) and Date. An exception in
the fast handler is logged and becomes a 500 with a JSON body, never a traceback.

`stop(grace_seconds)` stops accepting, closes idle connections, lets in-flight
requests finish and answers them with "Connection: close", then aborts what is
left at the end of the grace period and shuts the thread pool down. A fast
handler whose client hangs up is not cancelled: its response is dropped.
"""

from __future__ import annotations

import asyncio
import threading
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Mapping, Sequence

from kvs.http.aio.connection import Connection
from kvs.http.aio.messages import Request, Response, error_response
from kvs.http.aio.wsgi import WsgiRunner

log = logging.getLogger(__name__)

FastHandler = Callable[[Request], Awaitable[Response]]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, the standard one otherwise."""
    try:
        import uvloop
    except ImportError:     # pragma: no cover - uvloop is a dependency; this keeps plain asyncio working
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _never(method: str, path: str) -> bool:
    return False


class HttpServer:
    def __init__(self, fast_handler: FastHandler | None, wsgi_app: Callable | None, *,
                 fast_paths: Callable[[str, str], bool] = _never, max_body_bytes: int = 1 << 20,
                 wsgi_threads: int = 16, max_header_bytes: int = 64 * 1024, max_headers: int = 100,
                 max_connections: int = 1000, idle_timeout: float = 75.0, max_pipelined: int = 32,
                 write_buffer_bytes: int = 256 * 1024, ident: str = "kvs",
                 refusal: Callable[[int, str, str, str], Response] | None = None,
                 body_limits: Sequence[tuple[str, int]] = (),
                 large_body_gate: Callable[[Mapping[str, str], tuple | None], bool] | None = None,
                 large_bodies_bytes: int = 512 << 20,
                 observe: Callable[[str, str, int, float, str | None, str | None], None] | None = None):
        if fast_handler is None and fast_paths is not _never:
            raise ValueError("fast_paths without a fast_handler")
        self._fast_handler = fast_handler
        # observe(method, raw path, status, seconds, X-Request-Id of the reply, peer host) after each answered
        # request (metrics, access log), on the loop
        self.observe = observe
        self._fast_paths = fast_paths
        self._wsgi_app = wsgi_app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_pipelined = max_pipelined
        self.write_buffer_bytes = write_buffer_bytes
        self.ident = ident
        # The body of a request refused before it reached a handler (413, 400, ...):
        # refusal(status, error, method, raw path) -> Response; kvs's error body by default.
        self.refusal = refusal or (lambda status, error, method, path: error_response(status, error, method))
        # (path prefix, limit) pairs that replace max_body_bytes for requests whose raw target starts so
        # (node-to-node transfers carry more than a client may send in one request).
        self._body_limits = [(prefix.encode("latin-1"), limit) for prefix, limit in body_limits]
        # A limit above max_body_bytes applies only to a request `large_body_gate(headers, peer)` admits
        # (one that looks like it comes from a node, checked before its body is read: the signature itself
        # covers the body), and all such bodies being read at once hold at most `large_bodies_bytes`, so
        # that nobody can make a node hold many huge bodies before it can tell they are forged.
        self._large_body_gate = large_body_gate
        self.large_bodies_bytes = large_bodies_bytes
        self.large_bodies_in_flight = 0
        self._large_lock = threading.Lock()     # released by finalizers, maybe on a WSGI worker thread
        self._wsgi_threads = wsgi_threads
        self.loop: asyncio.AbstractEventLoop | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.wsgi: WsgiRunner | None = None
        self.connections: set[Connection] = set()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None
        self._drained: asyncio.Event | None = None
        self.port = 0

    async def start(self, host: str, port: int, *, backlog: int = 1024) -> None:
        """Bind and listen (OSError at once if the port is taken); serve until `stop`."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: Connection(self), host, port,
                                                     reuse_address=True, backlog=backlog)
        self.port = self._server.sockets[0].getsockname()[1]
        self.executor = ThreadPoolExecutor(self._wsgi_threads, thread_name_prefix="kvs-http")
        self.wsgi = WsgiRunner(self._wsgi_app or _no_app, server_name=host or "0.0.0.0", server_port=self.port,
                               ident=self.ident)
        self._drained = asyncio.Event()
        self._sweeper = self.loop.create_task(self._sweep())

    def body_limit(self, raw_target: bytes, headers: Mapping[str, str] | None = None, peer: tuple | None = None) -> int:
        for prefix, limit in self._body_limits:
            if raw_target.startswith(prefix):
                if limit > self.max_body_bytes and self._large_body_gate is not None \
                        and not self._large_body_gate(headers or {}, peer):
                    return self.max_body_bytes
                return limit
        return self.max_body_bytes

    def hold_large(self, size: int) -> bool:
        """Count `size` more bytes of large bodies held at once; False (nothing counted) over the budget."""
        with self._large_lock:
            if self.large_bodies_in_flight + size > self.large_bodies_bytes:
                return False
            self.large_bodies_in_flight += size
            return True

    def release_large(self, size: int) -> None:
        with self._large_lock:
            self.large_bodies_in_flight -= size

    def is_fast(self, method: str, path: str) -> bool:
        return self._fast_handler is not None and self._fast_paths(method, path)

    async def serve_fast(self, request: Request) -> Response:
        return await self._fast_handler(request)

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop accepting; close idle connections; give in-flight requests `grace_seconds` to finish;
        abort the rest; shut the thread pool down (without waiting for a thread still running)."""
        if self._server is None or self.stopping:
            return
        self.stopping = True
        self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.connections:
            try:
                await asyncio.wait_for(self._drained.wait(), max(0.0, grace_seconds))
            except asyncio.TimeoutError:
                log.warning("%d connection(s) still busy after %ss: aborted", len(self.connections), grace_seconds)
        tasks = [task for conn in list(self.connections) for task in [conn.abort()] if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self._sweeper.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        try:
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        except asyncio.TimeoutError:
            pass

    def forget(self, conn: "Connection") -> None:
        self.connections.discard(conn)
        if self.stopping and not self.connections:
            self._drained.set()

    async def _sweep(self) -> None:
        period = min(1.0, max(0.02, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.close_if_inactive(now)


def _no_app(environ: dict, start_response: Callable) -> list[bytes]:
    body = b'{"error":"Not found","message":"Error in ' + environ["REQUEST_METHOD"].encode("latin-1") + b'"}'
    start_response("404 Not Found", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
