"""One client connection of `kvs.http.aio.server.HttpServer`: parsing, serving in order, refusing, closing.

The server's docstring says what a connection does; this module is how. A connection reads the server's
limits and shared pieces (loop, thread pool, WSGI runner, fast handler) from the server it is built with.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from typing import Any

import httptools

from kvs.http.aio.messages import Headers, Request, Response, encode_response, error_response, split_target
from kvs.http.aio.streaming import write_streamed

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_METHODS = {m.encode(): m for m in ("GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS", "PATCH")}


class _Refused(Exception):
    """Raised in a parser callback: answer `status` and stop reading this connection."""

    def __init__(self, status: int, error: str):
        super().__init__(error)
        self.status = status
        self.error = error


class _Refusal:
    __slots__ = ("status", "error", "method", "path")

    def __init__(self, status: int, error: str, method: str, path: str):
        self.status, self.error, self.method, self.path = status, error, method, path


class Connection(asyncio.Protocol):
    """One client connection: parses requests, serves them one at a time, in order."""

    def __init__(self, server: Any):
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer: tuple | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque = deque()         # Requests (and at most one final _Refusal) waiting their turn
        self.current: asyncio.Future | None = None      # the request being served
        self.closing = False                # no more requests are read; close once the queue is answered
        self.lost = False
        self.write_paused = False
        self._resumed: asyncio.Future | None = None     # a streamed body waiting for resume_writing
        self.read_paused = False
        self.last_activity = self.loop.time()
        self.continue_owed = False
        self.started = self.loop.time()     # when the request being served started (metrics)
        self.messages = 0
        self.large_receiving = 0            # bytes of a large body being read, counted in the server's budget
        self._reset_message()
        self.in_head = self.in_message = False
        self.head_bytes = self.head_reads = 0

    def _reset_message(self) -> None:
        self._drop_receiving()
        self.large = False                  # the body may exceed max_body_bytes (see HttpServer.body_limit)
        self.url = b""
        self.fields: dict[str, str] = {}
        self.field_count = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.method = ""
        self.keep_alive = True
        self.body_limit = self.server.max_body_bytes

    # -- transport callbacks ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        server = self.server
        if len(server.connections) >= server.max_connections or server.stopping:
            self.closing = True
            transport.write(encode_response(error_response(503, "Too many connections", ""), "1.1", False, False,
                                            server.ident))
            transport.close()
            return
        server.connections.add(self)
        self.peer = transport.get_extra_info("peername")
        transport.set_write_buffer_limits(high=server.write_buffer_bytes)

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop_receiving()
        self.lost = self.closing = True
        self.queue.clear()
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)          # a streamed body stops writing
        self.server.forget(self)

    def eof_received(self) -> bool:
        # The client sent its last request (half-close): answer what is complete, then close.
        self.closing = True
        return self.current is not None or bool(self.queue)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._resumed = None
        self.last_activity = self.loop.time()
        if self.current is None:
            self._next()
        else:
            self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return                          # refused or closing: what follows is discarded
        self.last_activity = self.loop.time()
        was_in_head, messages = self.in_head, self.messages
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close_after_queue()       # what follows an Upgrade or CONNECT is not HTTP/1.1
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.status, cause.error)
            else:
                log.error("HTTP parser callback failed", exc_info=cause or exc)
                self._refuse(500, "Internal error")
            return
        except httptools.HttpParserError:
            self._refuse(400, "Malformed HTTP request")
            return
        # A field still incomplete is held by the parser: a head that spans reads is also measured by the
        # reads that began and ended inside it (so at most two reads beyond the limit are ever held).
        if was_in_head and self.in_head and messages == self.messages:
            self.head_reads += len(data)
            if self.head_reads > self.server.max_header_bytes:
                self._refuse(431, "Request header fields too large")

    # -- parser callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.messages += 1
        self.in_head = self.in_message = True
        self.head_bytes = self.head_reads = 0
        self._reset_message()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.server.max_header_bytes:
            raise _Refused(414, "Request URI too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        self.field_count += 1
        if self.head_bytes > self.server.max_header_bytes or self.field_count > self.server.max_headers:
            raise _Refused(431, "Request header fields too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip(" \t")
        fields = self.fields
        fields[key] = f"{fields[key]}, {text}" if key in fields else text

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        raw = parser.get_method()
        self.method = _METHODS.get(raw) or raw.decode("latin-1")
        self.keep_alive = parser.should_keep_alive()
        fields = self.fields
        length = fields.get("content-length")
        self.body_limit = self.server.body_limit(self.url, Headers._of(fields), self.peer)
        self.large = self.body_limit > self.server.max_body_bytes
        if length is not None and int(length) > self.body_limit:
            raise _Refused(413, f"Request body larger than {self.body_limit} bytes")
        expect = fields.get("expect")
        if expect is not None and expect.lower() == "100-continue" and parser.get_http_version() == "1.1":
            if self.current is None and not self.queue:
                self.transport.write(CONTINUE)
            else:
                self.continue_owed = True   # sent when the requests before this one are answered

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.body_limit:
            raise _Refused(413, f"Request body larger than {self.body_limit} bytes")
        if self.large:
            if not self.server.hold_large(len(chunk)):
                raise _Refused(503, "Too many large transfers at once")
            self.large_receiving += len(chunk)
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        body = self.body
        path, query = split_target(self.url)
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            # "GET /x" without a version is HTTP/0.9 to the parser; answer in a version we speak, as waitress does
            # (a status line "HTTP/0.9 ..." is one no client can read).
            version = "1.0"
        request = Request(self.method, path, query, Headers._of(self.fields),
                          body[0] if len(body) == 1 else b"".join(body), self.keep_alive, version)
        request.peer = self.peer
        if self.large_receiving:
            # held in the budget for as long as the request (and so its body) lives: until it is answered
            # or dropped, whichever path that takes
            weakref.finalize(request, self.server.release_large, self.large_receiving)
            self.large_receiving = 0
        self.continue_owed = self.in_message = False
        self._reset_message()
        self.queue.append(request)
        if not request.keep_alive:
            self.closing = True             # nothing after this request is read
        if self.current is None:
            self._next()
        elif len(self.queue) >= self.server.max_pipelined:
            self._update_reading()

    # -- serving -------------------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start serving the oldest waiting request, or finish the connection if it must close."""
        server = self.server
        # While the client does not read its responses, the next one waits (resume_writing restarts).
        while self.current is None and self.queue and not self.lost and not self.write_paused:
            item = self.queue.popleft()
            if isinstance(item, _Refusal):
                self._send_refusal(item)
                return
            self.started = self.loop.time()
            try:
                if server.is_fast(item.method, item.path):
                    self.current = self.loop.create_task(self._serve_fast(item))
                else:
                    future = self.loop.run_in_executor(server.executor, server.wsgi, item, self.peer)
                    future.add_done_callback(lambda f, request=item: self._wsgi_done(request, f))
                    self.current = future
            except Exception:               # fast_paths raised, or the pool is shut down
                log.exception("could not start serving %s %s", item.method, item.path)
                self.queue.clear()
                self._send_refusal(_Refusal(500, "Internal error", item.method))
                return
        if self.current is None and not self.queue and not self.lost:
            if self.closing:
                self.transport.close()
            elif self.continue_owed:
                self.continue_owed = False
                self.transport.write(CONTINUE)
        self._update_reading()

    async def _serve_fast(self, request: Request) -> None:
        head_only = request.method == "HEAD"
        try:
            response = await self.server.serve_fast(request)
            if response.stream is not None and not head_only:
                await self._stream(request, response, self.started)
                return
            data = encode_response(response, request.version, self._keeps(request), head_only, self.server.ident)
            status, headers = response.status, response.headers
        except Exception:
            log.exception("fast handler failed on %s %s", request.method, request.path)
            data = encode_response(error_response(500, "Internal error", request.method), request.version,
                                   self._keeps(request), head_only, self.server.ident)
            status, headers = 500, ()
        self._observe(request, status, headers)
        self._finish(request, data)

    def _observe(self, request: Request, status: int, headers, started: float | None = None) -> None:
        if self.server.observe is not None:
            try:
                request_id = next((v for n, v in headers if n == "X-Request-Id"), None)
                self.server.observe(request.method, request.path, status,
                                    self.loop.time() - (self.started if started is None else started),
                                    request_id, self.peer[0] if self.peer else None)
            except Exception:           # a metric must never cost an answer
                log.exception("observing %s %s failed", request.method, request.path)

    async def _stream(self, request: Request, response: Response, started: float) -> None:
        keeps = request.version == "1.1" and self._keeps(request)
        complete = await write_streamed(self, request, response, keeps)
        # observed before the next request may start (and reset `started`); a body cut off counts as 499
        self._observe(request, response.status if complete else 499, response.headers, started)
        if not complete:
            self.current = None
            self.abort()
        elif not keeps:                     # HTTP/1.0, or the server stops: the end of the body is the close
            self.current = None
            self.closing = True
            self.queue.clear()
            self.transport.close()
        else:
            self._finish(request, b"")

    def writable(self) -> asyncio.Future:
        """Done once writing resumes or the connection is lost. Made now, not in a coroutine: its task would
        run a loop turn later and could miss a resume in between (the stream then stalled for idle_timeout)."""
        if self._resumed is None or self._resumed.done():
            self._resumed = self.loop.create_future()
        if not self.write_paused or self.lost:
            self._resumed.set_result(None)
        return self._resumed

    def _wsgi_done(self, request: Request, future: asyncio.Future) -> None:
        if future.cancelled():
            self.current = None
            self.abort()
            return
        try:
            data, result = future.result()  # the runner turns the application's errors into a 500
            if request.keep_alive and not self._keeps(request):
                data = result.encode(request.version, False, request.method == "HEAD", self.server.ident)
            self._observe(request, int(result.status[:3]) if result.status[:3].isdigit() else 0, result.headers)
        except Exception:
            log.exception("serving %s %s through WSGI failed", request.method, request.path)
            data = encode_response(error_response(500, "Internal error", request.method), request.version,
                                   self._keeps(request), request.method == "HEAD", self.server.ident)
        self._finish(request, data)

    def _keeps(self, request: Request) -> bool:
        return request.keep_alive and not self.server.stopping

    def _finish(self, request: Request, data: bytes) -> None:
        self.current = None
        if self.lost:
            return
        self.transport.write(data)
        self.last_activity = self.loop.time()
        if not self._keeps(request):
            self.closing = True
            self.queue.clear()
        self._next()

    def _update_reading(self) -> None:
        if self.lost:
            return
        pause = self.write_paused or len(self.queue) >= self.server.max_pipelined
        if pause != self.read_paused:
            self.read_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _drop_receiving(self) -> None:
        if self.large_receiving:
            self.server.release_large(self.large_receiving)
            self.large_receiving = 0

    # -- refusing and closing ----------------------------------------------------------------------------------

    def _refuse(self, status: int, error: str) -> None:
        """Answer `status` after the requests already complete, then close; read no further request."""
        self.closing = True
        self._drop_receiving()
        self.continue_owed = self.in_message = self.in_head = False
        self.queue.append(_Refusal(status, error, self.method, split_target(self.url)[0] if self.url else ""))
        if self.current is None:
            self._next()

    def _send_refusal(self, refusal: _Refusal) -> None:
        transport = self.transport
        response = self.server.refusal(refusal.status, refusal.error, refusal.method, refusal.path)
        transport.write(encode_response(response, "1.1", False, False, self.server.ident))
        # Half-close, keep reading (and discarding) so that unread input does not turn the close into
        # a reset that could destroy the answer; the client closes, or LINGER_SECONDS end it.
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.abort)
        else:                               # pragma: no cover - TCP transports can
            transport.close()

    def _close_after_queue(self) -> None:
        self.closing = True
        if self.current is None and not self.queue:
            self.transport.close()

    def close_if_idle(self) -> None:
        """Stop: close now if nothing is in flight (a request being received is let finish)."""
        if self.current is None and not self.queue and not self.in_message:
            self.transport.close()

    def close_if_inactive(self, now: float) -> None:
        """Close a connection with no request being served and no progress for `idle_timeout`: idle, stuck in
        the middle of a request, or with answers its client stopped reading (requests may wait behind them)."""
        if self.current is None and now - self.last_activity > self.server.idle_timeout:
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()

    def abort(self) -> asyncio.Future | None:
        """Drop the connection at once; returns the request still being served, if any."""
        if not self.lost:
            self.transport.abort()
        return self.current if isinstance(self.current, asyncio.Task) else None
