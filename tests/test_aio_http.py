"""kvs.http.aio: the asyncio HTTP server (chosen requests on the loop, the rest through WSGI on threads)
and the pooled node-to-node client.

Real sockets on 127.0.0.1. Each server runs on its own event loop on a thread; every test runs on
uvloop and on the standard asyncio loop. Tests synchronise on events and on bytes received, never on
sleeps; every wait (socket reads included) is bounded by WAIT seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import pathlib
import re
import select
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import requests
from flask import Flask, Response as FlaskResponse, request as flask_request

from kvs.http.aio import HttpClient, HttpServer, Request, Response, new_event_loop
from kvs.http.aio.connection import Connection
from kvs.http.aio.streaming import drained
from kvs.routing.peers import PeerUnreachable

WAIT = 10.0


# -- the applications under test ---------------------------------------------------------------------------------

class FastApp:
    """The fast handler: /fast/echo, /fast/wait (until `gate` opens), /fast/sleep?ms=, /fast/boom, /fast/big?n=."""

    def __init__(self):
        self.calls = 0
        self.threads: set[str] = set()
        self.entered = threading.Event()
        self.gate = asyncio.Event()

    async def __call__(self, req: Request) -> Response:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        kind = req.path.split("/")[2]
        if kind == "wait":
            self.entered.set()
            await asyncio.wait_for(self.gate.wait(), WAIT)
        elif kind == "sleep":
            await asyncio.sleep(int(req.query.partition("=")[2]) / 1000)
        elif kind == "boom":
            raise RuntimeError("secret detail")
        elif kind == "big":
            return Response(200, b"b" * int(req.query.partition("=")[2]))
        elif kind in ("stream", "streamfail"):
            return Response(200, headers=[("Content-Type", "text/plain")],
                            stream=self.pieces(int(req.query.partition("=")[2]), fail=kind == "streamfail"))
        return Response.json(200, {"method": req.method, "path": req.path, "query": req.query,
                                   "body": req.body.decode("latin-1"), "x-a": req.headers.get("X-A"),
                                   "version": req.version, "keep_alive": req.keep_alive},
                             [("X-Handler", "fast")])


    async def pieces(self, count: int, fail: bool):
        for i in range(count):
            yield bytes([65 + i % 26]) * PIECE
            await asyncio.sleep(0)
            if fail and i == 1:
                raise RuntimeError("the listing broke midway")


PIECE = 64 * 1024


def make_flask() -> Flask:
    app = Flask("aio-test")

    @app.route("/flask/echo/<path:rest>", methods=["GET", "PUT", "POST", "DELETE", "HEAD"])
    def echo(rest):
        env = flask_request.environ
        return {"rest": rest, "path": flask_request.path, "args": flask_request.args.to_dict(flat=False),
                "method": env["REQUEST_METHOD"], "body": flask_request.get_data().decode("latin-1"),
                "environ": {k: env.get(k) for k in ("PATH_INFO", "QUERY_STRING", "SCRIPT_NAME", "CONTENT_TYPE",
                                                    "CONTENT_LENGTH", "SERVER_PROTOCOL", "wsgi.url_scheme")},
                "http": {k: v for k, v in env.items() if k.startswith("HTTP_")},
                "remote": env["REMOTE_ADDR"], "input_terminated": env.get("wsgi.input_terminated")}

    @app.route("/flask/created", methods=["PUT"])
    def created():
        resp = FlaskResponse(b'{"created":true}', status=201, mimetype="application/json")
        resp.headers["x-custom"] = "yes"
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        return resp

    @app.route("/flask/fixed")
    def fixed():
        return FlaskResponse(b"fixed body", mimetype="text/plain")

    @app.route("/flask/stream")
    def stream():
        return FlaskResponse((part for part in (b"one,", b"two,", b"three")), mimetype="text/plain")

    @app.route("/flask/empty", methods=["DELETE"])
    def empty():
        return "", 204

    return app


def failing_wsgi_app(environ, start_response):
    raise RuntimeError("secret detail")


def is_fast(method: str, path: str) -> bool:
    return path.startswith("/fast/")


# -- running a server on its own loop ------------------------------------------------------------------------

class Running:
    def __init__(self, loop_kind: str, app=None, **options):
        self.loop = new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
        self.fast = FastApp()
        self.server = HttpServer(self.fast, app or make_flask(), fast_paths=is_fast, **options)
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio-test-loop", daemon=True)
        self.thread.start()
        self.call(self.server.start("127.0.0.1", 0))
        self.port = self.server.port
        self.address = f"127.0.0.1:{self.port}"
        self.base = f"http://{self.address}"

    def call(self, coro, timeout: float = WAIT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn):
        async def call():
            return fn()
        return self.call(call())

    def open_gate(self) -> None:
        self.loop.call_soon_threadsafe(self.fast.gate.set)

    def wait_until(self, predicate, what: str) -> None:
        """Poll `predicate` on the loop until it holds; fail after WAIT seconds."""
        async def poll():
            deadline = time.monotonic() + WAIT
            while not predicate():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.005)
        self.call(poll(), WAIT + 1)

    def close(self) -> None:
        self.open_gate()
        self.call(self.server.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        if not self.thread.is_alive():
            self.loop.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def serve(request):
    started: list[Running] = []

    def start(**options) -> Running:
        running = Running(request.param, **options)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


# -- a raw HTTP/1.1 client ------------------------------------------------------------------------------------

class Raw:
    """A socket that sends bytes as given and reads responses one at a time (every read bounded)."""

    opened: list["Raw"] = []

    def __init__(self, port: int, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        Raw.opened.append(self)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(WAIT)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""

    def send(self, data: bytes) -> "Raw":
        self.sock.sendall(data)
        return self

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert self._fill(), f"connection closed after {len(self.buf)} of {n} bytes"
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self, head_only: bool = False) -> tuple[int, dict, bytes, bytes]:
        """(status, headers with lowercase names, body, the raw bytes) of the next response."""
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed before a full head: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_only or status in (100, 204, 304):
            body = b""
        elif "content-length" in headers:
            body = self.read_exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            while not self.buf.endswith(b"0\r\n\r\n"):
                assert self._fill()
            body, self.buf = self.buf, b""
        else:
            while self._fill():
                pass
            body, self.buf = self.buf, b""
        return status, headers, body, head + b"\r\n\r\n" + body

    def at_eof(self) -> bool:
        """True once the server has closed (or reset) the connection; waits at most WAIT seconds."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(autouse=True)
def close_raw_sockets():
    yield
    while Raw.opened:
        Raw.opened.pop().close()


def get(path: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: test\r\n{extra}\r\n".encode("latin-1")


def put(path: str, body: bytes, extra: str = "") -> bytes:
    return f"PUT {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


# -- the server: fast path and HTTP/1.1 ---------------------------------------------------------------------

def test_a_fast_request_is_served_on_the_loop_thread_with_content_length_date_and_server(serve):
    running = serve()
    resp = requests.put(running.base + "/fast/echo/a%20b?x=1&y=%C3%A9", data=b"hello", headers={"x-a": "1"},
                        timeout=WAIT)
    assert resp.status_code == 200
    assert resp.json() == {"method": "PUT", "path": "/fast/echo/a%20b", "query": "x=1&y=%C3%A9", "body": "hello",
                           "x-a": "1", "version": "1.1", "keep_alive": True}
    assert resp.headers["Content-Length"] == str(len(resp.content))
    assert resp.headers["Server"] == "kvs" and resp.headers["X-Handler"] == "fast"
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", resp.headers["Date"])
    assert running.fast.threads == {"aio-test-loop"}


def test_keep_alive_serves_sequential_requests_on_one_connection(serve):
    running = serve()
    with requests.Session() as session:
        for i in range(20):
            assert session.get(f"{running.base}/fast/echo/{i}", timeout=WAIT).json()["path"] == f"/fast/echo/{i}"
            assert session.get(f"{running.base}/flask/echo/{i}", timeout=WAIT).json()["rest"] == str(i)
        assert running.on_loop(lambda: len(running.server.connections)) == 1


def test_an_http_1_0_client_keeps_its_connection_only_when_it_asks_for_keep_alive(serve):
    running = serve()
    raw = Raw(running.port)
    for _ in range(2):
        status, headers, body, _ = raw.send(get("/fast/echo/k", "Connection: keep-alive\r\n", "1.0")).response()
        assert status == 200 and headers["connection"] == "Keep-Alive" and json.loads(body)["keep_alive"]
    status, headers, _, data = raw.send(get("/fast/echo/k", "", "1.0")).response()
    assert status == 200 and headers["connection"] == "close" and data.startswith(b"HTTP/1.0 200 OK\r\n")
    assert raw.at_eof()


def test_connection_close_from_an_http_1_1_client_is_answered_then_the_socket_closed(serve):
    running = serve()
    for path in ("/fast/echo/c", "/flask/echo/c"):
        raw = Raw(running.port)
        status, headers, _, _ = raw.send(get(path, "Connection: close\r\n")).response()
        assert status == 200 and headers["connection"] == "close"
        assert raw.at_eof()


def test_pipelined_requests_are_answered_in_the_order_they_were_sent(serve):
    running = serve()
    paths = ["/fast/sleep/1?ms=50", "/flask/echo/2", "/fast/echo/3", "/flask/echo/4", "/fast/sleep/5?ms=0",
             "/fast/echo/6"]
    raw = Raw(running.port).send(b"".join(get(p) for p in paths))
    answered = []
    for _ in paths:
        status, _, body, _ = raw.response()
        assert status == 200
        data = json.loads(body)
        answered.append(data["path"] + ("?" + data["query"] if data.get("query") else "") if "rest" not in data
                        else "/flask/echo/" + data["rest"])
    assert answered == paths


def test_expect_100_continue_is_answered_before_the_client_sends_its_body(serve):
    running = serve()
    body = b"v" * 2048
    for path in ("/fast/echo/e", "/flask/echo/e"):
        raw = Raw(running.port)
        raw.send(f"PUT {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
                 .encode())
        assert raw.read_exactly(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        status, _, answer, _ = raw.send(body).response()
        assert status == 200 and json.loads(answer)["body"] == body.decode()
    # requests does not wait for the 100; http.client skips it and reads the real answer
    resp = requests.put(running.base + "/fast/echo/e", data=body, headers={"Expect": "100-continue"}, timeout=WAIT)
    assert resp.status_code == 200 and resp.json()["body"] == body.decode()


def test_an_upgrade_request_is_answered_in_http_1_1_then_the_connection_closed(serve):
    running = serve()
    raw = Raw(running.port)
    status, _, body, _ = raw.send(get("/fast/echo/up", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                      "HTTP2-Settings: AAMAAABkAAQAAP__\r\n") + b"PRI * HTTP/2.0\r\n").response()
    assert status == 200 and json.loads(body)["path"] == "/fast/echo/up"
    assert raw.at_eof()


def test_a_chunked_request_body_reaches_the_handler_and_the_wsgi_app_decoded(serve):
    running = serve()
    raw = Raw(running.port)
    raw.send(b"PUT /fast/echo/c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    status, _, body, _ = raw.send(b"6\r\n world\r\n0\r\n\r\n").response()
    assert status == 200 and json.loads(body)["body"] == "hello world"
    resp = requests.put(running.base + "/flask/echo/c", data=iter([b"ab", b"cd", b"e"]), timeout=WAIT)
    echoed = resp.json()
    assert echoed["body"] == "abcde" and echoed["environ"]["CONTENT_LENGTH"] == "5"
    assert "HTTP_TRANSFER_ENCODING" not in echoed["http"]


def test_a_content_length_over_the_limit_gets_413_before_the_body_is_sent(serve):
    running = serve(max_body_bytes=1000)
    raw = Raw(running.port)
    status, headers, body, _ = raw.send(b"PUT /fast/echo/big HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n"
                                        b"Expect: 100-continue\r\n\r\n").response()
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body) == {"error": "Request body larger than 1000 bytes", "message": "Error in PUT"}
    assert raw.at_eof()
    assert running.fast.calls == 0
    # a client that sends the body anyway still reads the answer (the server discards, then closes)
    resp = requests.put(running.base + "/flask/echo/big", data=b"x" * 300_000, timeout=WAIT)
    assert resp.status_code == 413 and resp.json()["message"] == "Error in PUT"


def test_a_chunked_body_that_grows_past_the_limit_gets_413(serve):
    running = serve(max_body_bytes=10)
    raw = Raw(running.port)
    raw.send(b"PUT /fast/echo/c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n")
    status, _, body, _ = raw.send(b"8\r\n12345678\r\n").response()
    assert status == 413 and json.loads(body)["error"] == "Request body larger than 10 bytes"
    assert raw.at_eof() and running.fast.calls == 0


def test_a_path_s_larger_body_limit_applies_only_to_requests_its_gate_admits(serve):
    def gate(headers, peer):
        return headers.get("X-Peer") == "yes" and peer is not None and peer[0] == "127.0.0.1"

    running = serve(max_body_bytes=10, body_limits=[("/fast/echo/large/", 1000)], large_body_gate=gate)
    body = b"x" * 500
    refused = requests.put(running.base + "/fast/echo/large/a", data=body, timeout=WAIT)
    assert refused.status_code == 413 and refused.json()["error"] == "Request body larger than 10 bytes"
    admitted = requests.put(running.base + "/fast/echo/large/a", data=body, headers={"X-Peer": "yes"}, timeout=WAIT)
    assert admitted.status_code == 200 and admitted.json()["body"] == body.decode()
    running.wait_until(lambda: running.server.large_bodies_in_flight == 0, "the budget is given back")


def test_large_bodies_held_at_once_are_bounded_and_the_budget_is_given_back(serve):
    running = serve(max_body_bytes=10, body_limits=[("/fast/echo/large/", 1000)], large_body_gate=lambda h, p: True,
                    large_bodies_bytes=1500)
    held = Raw(running.port)                 # 800 bytes of a 900-byte body: held while the rest is awaited
    held.send(b"PUT /fast/echo/large/a HTTP/1.1\r\nHost: t\r\nContent-Length: 900\r\n\r\n" + b"x" * 800)
    running.wait_until(lambda: running.server.large_bodies_in_flight == 800, "the first body is held")
    over = Raw(running.port)
    status, _, body, _ = over.send(b"PUT /fast/echo/large/b HTTP/1.1\r\nHost: t\r\nContent-Length: 900\r\n\r\n"
                                   + b"y" * 900).response()
    assert status == 503 and json.loads(body)["error"] == "Too many large transfers at once"
    assert running.server.large_bodies_in_flight == 800
    status, _, body, _ = held.send(b"x" * 100).response()      # the first one completes and is answered
    assert status == 200 and len(json.loads(body)["body"]) == 900
    running.wait_until(lambda: running.server.large_bodies_in_flight == 0, "the budget is given back")
    held.sock.close()
    cut = Raw(running.port)                  # a client that goes away mid-body gives its share back too
    cut.send(b"PUT /fast/echo/large/c HTTP/1.1\r\nHost: t\r\nContent-Length: 900\r\n\r\n" + b"z" * 400)
    running.wait_until(lambda: running.server.large_bodies_in_flight == 400, "the cut body is held")
    cut.sock.close()
    running.wait_until(lambda: running.server.large_bodies_in_flight == 0, "a lost connection gives it back")


@pytest.mark.parametrize("garbage", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
                                     b"GET / HTTP/9.9\r\n\r\n", b"GET /a b HTTP/1.1\r\n\r\n",
                                     b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",    # waitress refuses raw UTF-8 too
                                     b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
def test_malformed_http_gets_400_and_the_connection_is_closed(serve, garbage):
    running = serve()
    raw = Raw(running.port)
    status, headers, body, _ = raw.send(garbage).response()
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["error"] == "Malformed HTTP request"
    assert raw.at_eof()


def test_a_malformed_request_is_refused_only_after_the_good_ones_before_it_are_answered(serve):
    running = serve()
    raw = Raw(running.port).send(get("/fast/sleep/1?ms=30") + get("/flask/echo/2") + b"NONSENSE\r\n\r\n")
    assert [raw.response()[0] for _ in range(3)] == [200, 200, 400]
    assert raw.at_eof()


def test_too_many_header_fields_or_too_large_a_head_get_431(serve):
    running = serve(max_headers=20, max_header_bytes=8192)
    raw = Raw(running.port)
    many = "".join(f"X-H{i}: {i}\r\n" for i in range(21))
    assert raw.send(get("/fast/echo/h", many)).response()[0] == 431
    assert raw.at_eof()
    raw = Raw(running.port)
    raw.send(b"GET /fast/echo/h HTTP/1.1\r\nHost: t\r\nX-Long: ")
    try:
        for _ in range(256):            # a head that never ends: refused after a few reads, not buffered whole
            raw.send(b"a" * 4096)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert raw.response()[0] == 431
    assert Raw(running.port).send(get("/fast/echo/" + "u" * 9000)).response()[0] == 414


def test_an_exception_in_the_fast_handler_is_a_logged_500_without_a_traceback(serve, caplog):
    running = serve()
    with caplog.at_level(logging.ERROR, logger="kvs.http.aio"):
        resp = requests.get(running.base + "/fast/boom", timeout=WAIT)
    assert resp.status_code == 500
    assert resp.json() == {"error": "Internal error", "message": "Error in GET"}
    assert "secret" not in resp.text and "Traceback" not in resp.text
    assert any("fast handler failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert requests.get(running.base + "/fast/echo/after", timeout=WAIT).status_code == 200


def test_a_wsgi_app_that_raises_gets_the_same_json_500(serve, caplog):
    running = serve(app=failing_wsgi_app)
    with caplog.at_level(logging.ERROR, logger="kvs.http.aio"):
        resp = requests.put(running.base + "/anything", data=b"{}", timeout=WAIT)
    assert resp.status_code == 500 and resp.json() == {"error": "Internal error", "message": "Error in PUT"}
    assert "secret" not in resp.text
    assert any(r.exc_info for r in caplog.records)


def test_connections_over_the_limit_get_503_and_are_closed(serve):
    running = serve(max_connections=2)
    held = [Raw(running.port), Raw(running.port)]
    for raw in held:
        assert raw.send(get("/fast/echo/held")).response()[0] == 200
    extra = Raw(running.port)
    status, _, body, _ = extra.response()
    assert status == 503 and json.loads(body)["error"] == "Too many connections"
    assert extra.at_eof()
    held[0].close()
    running.wait_until(lambda: len(running.server.connections) == 1, "the closed connection to be forgotten")
    assert Raw(running.port).send(get("/fast/echo/again")).response()[0] == 200


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(serve):
    running = serve(idle_timeout=0.2)
    raw = Raw(running.port)
    assert raw.send(get("/fast/echo/idle")).response()[0] == 200
    started = time.monotonic()
    assert raw.at_eof()
    assert 0.15 <= time.monotonic() - started < WAIT


def test_reading_pauses_while_the_client_does_not_read_its_responses(serve):
    running = serve(write_buffer_bytes=64 * 1024)
    raw = Raw(running.port, rcvbuf=32 * 1024)
    count, size = 40, 512 * 1024
    raw.send(b"".join(get(f"/fast/big/{i}?n={size}") for i in range(count)))
    running.wait_until(lambda: any(c.write_paused for c in running.server.connections), "the write buffer to fill")
    assert running.fast.calls < count            # the rest wait until the client reads
    for _ in range(count):
        status, _, body, _ = raw.response()
        assert status == 200 and len(body) == size
    assert running.fast.calls == count


def test_many_clients_at_once_are_all_answered(serve):
    running = serve(wsgi_threads=4)

    def client(n: int) -> int:
        ok = 0
        with requests.Session() as session:
            for i in range(15):
                path = f"/fast/echo/{n}-{i}" if i % 3 else f"/flask/echo/{n}-{i}"
                data = session.put(running.base + path, data=f"{n}:{i}".encode(), timeout=WAIT).json()
                ok += data["body"] == f"{n}:{i}"
        return ok

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert list(pool.map(client, range(32), timeout=4 * WAIT)) == [15] * 32


def test_stop_lets_an_in_flight_request_finish_and_closes_idle_connections(serve):
    running = serve()
    idle = Raw(running.port)
    assert idle.send(get("/fast/echo/idle")).response()[0] == 200
    busy = Raw(running.port).send(get("/fast/wait"))
    assert running.fast.entered.wait(WAIT)
    stopped = asyncio.run_coroutine_threadsafe(running.server.stop(WAIT), running.loop)
    assert idle.at_eof()                            # closed at once
    with pytest.raises(ConnectionRefusedError):     # no longer accepting
        socket.create_connection(("127.0.0.1", running.port), timeout=WAIT)
    assert not stopped.done()
    running.open_gate()
    status, headers, body, _ = busy.response()
    assert status == 200 and headers["connection"] == "close" and json.loads(body)["path"] == "/fast/wait"
    assert busy.at_eof()
    stopped.result(WAIT)


def test_stop_aborts_a_request_that_outlives_the_grace_period(serve):
    running = serve()
    busy = Raw(running.port).send(get("/fast/wait"))
    assert running.fast.entered.wait(WAIT)
    started = time.monotonic()
    running.call(running.server.stop(0.2))
    assert time.monotonic() - started < 5
    assert busy.at_eof() and busy.buf == b""


# -- the WSGI fallback, against waitress -------------------------------------------------------------------

WSGI_REQUESTS = [
    get("/flask/echo/a%20b/%C3%A9?x=1&y=%C3%A9&x=2"),
    get("//flask/echo/slashes?q"),
    get("/flask/echo/h", "X-Dup: 1\r\nX-Dup: 2\r\nX_Under: no\r\nX-Latin: caf\xe9\r\n"),
    put("/flask/echo/p?z=%2F", b'{"value": "v"}', "Content-Type: application/json\r\n"),
    put("/flask/created", b""),
    get("/flask/missing"),
    b"POST /flask/created HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
    get("/flask/echo/old", "", "1.0"),
    get("/flask/echo/old-ka", "Connection: keep-alive\r\n", "1.0"),
    get("/flask/echo/closing", "Connection: close\r\n"),
]


def _comparable(raw: bytes) -> bytes:
    """The Date's value blanked; Allow's methods sorted (Flask lists a set, ordered by each process's hash seed)."""
    raw = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", raw)
    return re.sub(rb"\r\nAllow: ([^\r]*)", lambda m: b"\r\nAllow: " + b", ".join(sorted(m[1].split(b", "))), raw)


WAITRESS = """
import sys, waitress
sys.path.insert(0, sys.argv[1])
from test_aio_http import make_flask
server = waitress.create_server(make_flask(), host="127.0.0.1", port=0, threads=2, ident="kvs")
print(server.effective_port, flush=True)
server.run()
"""


@pytest.fixture(scope="module")
def waitress_port():
    """waitress 3 serving the same Flask app, in a process of its own."""
    proc = subprocess.Popen([sys.executable, "-c", WAITRESS, str(pathlib.Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 3 * WAIT)
        assert ready, "waitress did not start"
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(WAIT)
        proc.stdout.close()


@pytest.mark.parametrize("index", range(len(WSGI_REQUESTS)))
def test_the_wsgi_fallback_answers_byte_for_byte_like_waitress(serve, waitress_port, index):
    running = serve()
    data = WSGI_REQUESTS[index]
    ours, theirs = Raw(running.port).send(data).response(), Raw(waitress_port).send(data).response()
    assert _comparable(ours[3]) == _comparable(theirs[3])


def test_a_204_keeps_the_connection_open_where_waitress_would_close_it(serve):
    running = serve()
    raw = Raw(running.port)
    status, headers, _, _ = raw.send(b"DELETE /flask/empty HTTP/1.1\r\nHost: test\r\n\r\n").response()
    assert status == 204 and "connection" not in headers and "content-length" not in headers
    assert raw.send(get("/flask/fixed")).response()[2] == b"fixed body"


def test_the_wsgi_environ_follows_pep_3333(serve):
    running = serve()
    raw = Raw(running.port)
    _, _, body, _ = raw.send(put("/flask/echo/a%20b/%C3%A9?x=1&y=%C3%A9", b"data",
                                 "Content-Type: text/plain\r\nX-Dup: 1\r\nX-Dup: 2\r\nX_Under: no\r\n")).response()
    echoed = json.loads(body)
    assert echoed["rest"] == "a b/é" and echoed["path"] == "/flask/echo/a b/é"
    assert echoed["args"] == {"x": ["1"], "y": ["é"]}
    assert echoed["environ"] == {"PATH_INFO": "/flask/echo/a b/Ã©", "QUERY_STRING": "x=1&y=%C3%A9", "SCRIPT_NAME": "",
                                 "CONTENT_TYPE": "text/plain", "CONTENT_LENGTH": "4", "SERVER_PROTOCOL": "HTTP/1.1",
                                 "wsgi.url_scheme": "http"}
    assert echoed["http"] == {"HTTP_HOST": "test", "HTTP_X_DUP": "1, 2"}
    assert echoed["remote"] == "127.0.0.1" and echoed["input_terminated"] is True and echoed["body"] == "data"


def test_a_streamed_wsgi_response_is_sent_whole_with_a_content_length(serve):
    running = serve()
    status, headers, body, _ = Raw(running.port).send(get("/flask/stream")).response()
    assert status == 200 and headers["content-length"] == "13" and body == b"one,two,three"
    assert "transfer-encoding" not in headers


def test_a_head_request_gets_the_headers_of_a_get_and_no_body(serve):
    running = serve()
    raw = Raw(running.port)
    for path in ("/flask/fixed", "/fast/big/h?n=100"):
        length = raw.send(get(path)).response()[1]["content-length"]
        status, headers, _, _ = raw.send(f"HEAD {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()).response(
            head_only=True)
        assert status == 200 and headers["content-length"] == length
    assert raw.send(get("/fast/echo/next")).response()[0] == 200     # no stray body bytes in between


# -- the client ---------------------------------------------------------------------------------------------

def test_the_client_reuses_one_connection_for_sequential_requests(serve):
    running = serve()

    async def scenario():
        client = HttpClient()
        answers = [await client.request(running.address, "PUT", f"/fast/echo/{i}", {"X-A": "a"}, b"b%d" % i,
                                        time.monotonic() + WAIT) for i in range(10)]
        client.close()
        return client.connections_opened, answers

    opened, answers = running.call(scenario())
    assert opened == 1
    for i, (status, headers, body) in enumerate(answers):
        assert status == 200 and headers["content-type"] == "application/json" and headers["X-HANDLER"] == "fast"
        assert json.loads(body) == {"method": "PUT", "path": f"/fast/echo/{i}", "query": "", "body": f"b{i}",
                                    "x-a": "a", "version": "1.1", "keep_alive": True}


def test_the_client_opens_a_connection_per_concurrent_request_and_keeps_a_bounded_pool(serve):
    running = serve()

    async def scenario():
        client = HttpClient(max_idle_per_address=2)
        deadline = time.monotonic() + WAIT
        results = await asyncio.gather(*(client.request(running.address, "GET", "/fast/sleep/x?ms=30", None, b"",
                                                        deadline) for _ in range(5)))
        idle = len(client._idle[running.address])
        await client.request(running.address, "GET", "/fast/echo/again", None, b"", deadline)
        client.close()
        return [r[0] for r in results], client.connections_opened, idle

    statuses, opened, idle = running.call(scenario())
    assert statuses == [200] * 5 and opened == 5 and idle == 2


def test_the_client_gives_up_at_the_deadline_with_peer_unreachable(serve):
    running = serve()

    async def scenario():
        client = HttpClient()
        started = time.monotonic()
        with pytest.raises(PeerUnreachable, match="timed out"):
            await client.request(running.address, "GET", "/fast/wait", None, b"", started + 0.2)
        elapsed = time.monotonic() - started
        with pytest.raises(PeerUnreachable, match="no time left"):
            await client.request(running.address, "GET", "/fast/echo/x", None, b"", time.monotonic() - 1)
        idle = len(client._idle.get(running.address, ()))
        client.close()
        return elapsed, idle

    elapsed, idle = running.call(scenario())
    assert 0.15 <= elapsed < 5 and idle == 0


def test_the_client_raises_peer_unreachable_on_a_refused_port(serve):
    running = serve()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]

    async def scenario():
        with pytest.raises(PeerUnreachable, match="Connection"):
            await HttpClient().request(f"127.0.0.1:{free}", "GET", "/", None, b"", time.monotonic() + WAIT)

    running.call(scenario())


class ScriptedPeer:
    """A TCP peer on a thread: each accepted connection is handed to `script(sock, index)`."""

    def __init__(self, script):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.script = script
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                sock, _ = self.listener.accept()
                sock.settimeout(WAIT)
                threading.Thread(target=self.script, args=(sock, self.accepted), daemon=True).start()
                self.accepted += 1
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()


def _read_request(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


@pytest.mark.parametrize("answer", [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"])
def test_the_client_raises_peer_unreachable_on_a_malformed_or_truncated_response(serve, answer):
    running = serve()

    def script(sock, index):
        _read_request(sock)
        sock.sendall(answer)
        sock.close()

    peer = ScriptedPeer(script)

    async def scenario():
        with pytest.raises(PeerUnreachable):
            await HttpClient().request(peer.address, "GET", "/", None, b"", time.monotonic() + WAIT)

    try:
        running.call(scenario())
    finally:
        peer.close()


def test_the_client_reads_chunked_and_close_delimited_responses(serve):
    running = serve()
    answers = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
               b"HTTP/1.1 201 Created\r\nConnection: close\r\n\r\nuntil the end"]

    def script(sock, index):
        _read_request(sock)
        sock.sendall(answers[index])
        sock.close()

    peer = ScriptedPeer(script)

    async def scenario():
        client = HttpClient()
        first = await client.request(peer.address, "GET", "/", None, b"", time.monotonic() + WAIT)
        second = await client.request(peer.address, "GET", "/", None, b"", time.monotonic() + WAIT)
        client.close()
        return first, second

    try:
        first, second = running.call(scenario())
    finally:
        peer.close()
    assert (first[0], first[2]) == (200, b"abcde") and (second[0], second[2]) == (201, b"until the end")


def test_the_client_sends_again_on_a_new_connection_when_the_peer_closed_a_pooled_one(serve):
    running = serve()

    def script(sock, index):
        _read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if index == 0:
            _read_request(sock)                 # the second request on this connection: closed unanswered
        sock.close()

    peer = ScriptedPeer(script)

    async def scenario():
        client = HttpClient()
        statuses = [(await client.request(peer.address, "PUT", "/k", None, b"{}", time.monotonic() + WAIT))[0]
                    for _ in range(2)]
        client.close()
        return statuses, client.connections_opened

    try:
        statuses, opened = running.call(scenario())
    finally:
        peer.close()
    assert statuses == [200, 200] and opened == 2


def test_a_request_sent_again_after_a_closed_pooled_connection_gets_headers_made_anew(serve):
    """A signed request must not go out twice with the same nonce: the receiver would refuse it."""
    running = serve()
    received: list[bytes] = []

    def script(sock, index):
        received.append(_read_request(sock))
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if index == 0:
            received.append(_read_request(sock))        # read, then closed unanswered
        sock.close()

    peer = ScriptedPeer(script)
    made = itertools.count(1)

    async def scenario():
        client = HttpClient()
        for _ in range(2):
            await client.request(peer.address, "PUT", "/k", lambda: {"X-Made": str(next(made))}, b"{}",
                                 time.monotonic() + WAIT)
        client.close()

    try:
        running.call(scenario())
    finally:
        peer.close()
    assert [request.split(b"X-Made: ")[1][:1] for request in received] == [b"1", b"2", b"3"]


def test_the_client_connects_from_its_source_ip(serve):
    running = serve()

    async def scenario():
        client = HttpClient(source_ip="127.0.0.2")
        try:
            return await client.request(running.address, "GET", "/flask/echo/from", None, b"",
                                        time.monotonic() + WAIT)
        finally:
            client.close()

    status, _, body = running.call(scenario())
    assert status == 200 and json.loads(body)["remote"] == "127.0.0.2"


def test_a_taken_port_raises_os_error_at_start(serve):
    running = serve()
    other = HttpServer(None, make_flask())
    with pytest.raises(OSError):
        running.call(other.start("127.0.0.1", running.port))


# -- streamed bodies (GET /fetch of a whole store) ---------------------------------------------------------------

def dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return out
        out, rest = out + rest[:size], rest[size + 2:]


def expected_pieces(count: int) -> bytes:
    return b"".join(bytes([65 + i % 26]) * PIECE for i in range(count))


def test_a_streamed_body_is_chunked_and_the_connection_then_serves_the_next_request(serve):
    running = serve()
    raw = Raw(running.port).send(get("/fast/stream?n=5"))
    status, headers, body, _ = raw.response()
    assert status == 200 and headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert dechunk(body) == expected_pieces(5)
    status, _, body, _ = raw.send(get("/fast/echo")).response()
    assert status == 200 and json.loads(body)["path"] == "/fast/echo"


def test_a_streamed_body_to_an_http_1_0_client_ends_with_the_connection(serve):
    running = serve()
    raw = Raw(running.port).send(get("/fast/stream?n=3", version="1.0"))
    status, headers, body, _ = raw.response()
    assert status == 200 and "transfer-encoding" not in headers and headers["connection"] == "close"
    assert body == expected_pieces(3)


def test_a_stream_that_fails_midway_breaks_the_connection_instead_of_ending_the_body(serve, caplog):
    running = serve()
    raw = Raw(running.port).send(get("/fast/streamfail?n=10"))
    while b"\r\n\r\n" not in raw.buf:
        assert raw._fill()
    assert raw.at_eof()
    assert not raw.buf.endswith(b"0\r\n\r\n") and len(raw.buf) < len(expected_pieces(3))
    assert "failed midway" in caplog.text


def test_a_streamed_body_waits_while_the_client_does_not_read(serve):
    running = serve(write_buffer_bytes=64 * 1024)
    raw = Raw(running.port, rcvbuf=32 * 1024).send(get("/fast/stream?n=200"))
    running.wait_until(lambda: any(c.write_paused for c in running.server.connections), "the write buffer to fill")
    status, _, body, _ = raw.response()
    assert status == 200 and dechunk(body) == expected_pieces(200)


def test_a_streaming_client_that_reads_nothing_is_dropped_after_the_idle_timeout(serve):
    running = serve(write_buffer_bytes=64 * 1024, idle_timeout=1.0)
    raw = Raw(running.port, rcvbuf=32 * 1024).send(get("/fast/stream?n=400"))
    running.wait_until(lambda: any(c.write_paused for c in running.server.connections), "the write buffer to fill")
    running.wait_until(lambda: not running.server.connections, "the stalled stream's connection dropped")
    assert raw.at_eof()


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_a_resume_that_comes_before_the_streamed_body_waits_is_not_missed(uvloop):
    # The race the big-value listing hit: the transport paused, then resumed in the same loop turn in which
    # the body began to wait. A waiter that missed the resume stalled the stream for the idle timeout.
    loop = new_event_loop() if uvloop else asyncio.new_event_loop()
    server = types.SimpleNamespace(loop=loop, max_body_bytes=1024, idle_timeout=60.0, max_pipelined=8)
    conn = Connection(server)
    conn.transport = types.SimpleNamespace(pause_reading=lambda: None, resume_reading=lambda: None)
    conn.current = loop.create_future()     # a request (the stream) is being served

    async def pause_then_resume_before_the_waiter_runs() -> bool:
        conn.pause_writing()
        waiting = asyncio.ensure_future(drained(conn))
        conn.resume_writing()
        return await asyncio.wait_for(waiting, WAIT)

    try:
        assert loop.run_until_complete(pause_then_resume_before_the_waiter_runs()) is True
        conn.pause_writing()                 # and a later pause is waited out by a later resume
        later = asyncio.ensure_future(drained(conn), loop=loop)
        loop.call_soon(conn.resume_writing)
        assert loop.run_until_complete(asyncio.wait_for(later, WAIT)) is True
    finally:
        loop.close()
