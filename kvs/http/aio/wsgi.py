"""Serving a request through a WSGI application (the Flask app), on a worker thread, as waitress would.

`WsgiRunner(app, ...)(request, peer)` builds the PEP 3333 environ exactly as
waitress 3 does (PATH_INFO percent-decoded and read as latin-1, leading
slashes collapsed; header fields whose name holds "_" dropped; repeated fields
joined with ", "; a chunked body handed over with its decoded CONTENT_LENGTH
and no Transfer-Encoding), calls the application, reads its whole response and
closes the iterable. The response is written the way waitress writes it:
the application's status string, header names capitalised, Content-Length
(computed when the application gave none), Date, Server (or Via when the
application set its own Server), Connection when the connection closes (and
"Keep-Alive" for an HTTP/1.0 client that asked for it), all sorted by name.

An application that raises, or breaks the protocol (no start_response, a
header with CR or LF), gets a logged 500 with kvs's JSON error body.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Callable

from kvs.http.aio.messages import Request, error_response, http_date, wsgi_path

log = logging.getLogger(__name__)

# waitress refuses these from an application (PEP 3333: hop-by-hop headers are the server's).
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailers", "transfer-encoding", "upgrade"))


class WsgiResult:
    """An application's complete response: status string ("200 OK"), headers as the application gave
    them (names capitalised), body, and whether the status allows a body."""

    __slots__ = ("status", "headers", "body", "has_body", "app_length")

    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes, app_length: str | None):
        self.status = status
        self.headers = headers
        self.body = body
        self.has_body = not (status.startswith("1") or status.startswith("204") or status.startswith("304"))
        self.app_length = app_length

    def encode(self, version: str, keep_alive: bool, head_only: bool, ident: str) -> bytes:
        headers = list(self.headers)
        if self.has_body and (self.app_length is not None or not head_only):
            headers.append(("Content-Length", self.app_length if head_only else str(len(self.body))))
        if not keep_alive:
            headers.append(("Connection", "close"))
        elif version == "1.0":
            headers.append(("Connection", "Keep-Alive"))
        names = {name for name, _ in headers}
        headers.append(("Via", ident) if "Server" in names else ("Server", ident))
        if "Date" not in names:
            headers.append(("Date", http_date()))
        headers.sort(key=lambda field: field[0])
        lines = [f"HTTP/{version} {self.status}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only or not self.has_body else head + self.body


class WsgiRunner:
    """Calls a WSGI application for one request (on the caller's thread) and returns the encoded
    response and the result it was encoded from."""

    def __init__(self, app: Callable, *, server_name: str, server_port: int, ident: str):
        self._app = app
        self._base = {
            "SERVER_NAME": server_name,
            "SERVER_PORT": str(server_port),
            "SERVER_SOFTWARE": ident,
            "SCRIPT_NAME": "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
        self._ident = ident

    def environ(self, request: Request, peer: tuple | None) -> dict:
        env = dict(self._base)
        target = request.path + ("?" + request.query if request.query else "")
        env.update({
            "REQUEST_METHOD": request.method,
            "PATH_INFO": wsgi_path(request.path),
            "QUERY_STRING": request.query,
            "REQUEST_URI": target,
            "SERVER_PROTOCOL": f"HTTP/{request.version}",
            "REMOTE_ADDR": peer[0] if peer else "",
            "REMOTE_HOST": peer[0] if peer else "",
            "REMOTE_PORT": str(peer[1]) if peer else "",
            "wsgi.input": io.BytesIO(request.body),
        })
        chunked = False
        for name, value in request.headers.items():
            if "_" in name:
                continue            # waitress drops them: X-Foo_Bar would pose as HTTP_X_FOO_BAR
            key = name.upper().replace("-", "_")
            if key == "TRANSFER_ENCODING":
                chunked = True
                continue
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if key not in env:
                env[key] = value
        if chunked:
            env["CONTENT_LENGTH"] = str(len(request.body))
        return env

    def __call__(self, request: Request, peer: tuple | None) -> tuple[bytes, WsgiResult]:
        try:
            result = self._call(self.environ(request, peer))
        except Exception:
            log.exception("WSGI application failed on %s %s", request.method, request.path)
            reply = error_response(500, "Internal error", request.method)
            result = WsgiResult("500 Internal Server Error", [("Content-Type", "application/json")], reply.body, None)
        data = result.encode(request.version, request.keep_alive, request.method == "HEAD", self._ident)
        return data, result

    def _call(self, environ: dict) -> WsgiResult:
        state: dict = {}
        written: list[bytes] = []

        def start_response(status: str, headers: list, exc_info=None):
            if exc_info:
                try:
                    if state.get("sent"):
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif "status" in state:
                raise AssertionError("start_response called a second time without exc_info")
            if not isinstance(status, str) or "\n" in status or "\r" in status:
                raise ValueError(f"bad status {status!r}")
            checked = []
            for name, value in headers:
                if not isinstance(name, str) or not isinstance(value, str):
                    raise ValueError(f"header {(name, value)!r} is not a pair of str")
                if "\n" in name or "\r" in name or "\n" in value or "\r" in value:
                    raise ValueError(f"CR or LF in header {name!r}")
                if name.lower() in _HOP_BY_HOP:
                    raise ValueError(f"{name} is a hop-by-hop header (PEP 3333)")
                checked.append(("-".join(part.capitalize() for part in name.split("-")), value))
            state["status"], state["headers"] = status, checked
            return written.append

        iterable = self._app(environ, start_response)
        try:
            for chunk in iterable:
                if chunk:
                    state["sent"] = True
                    written.append(chunk)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
        if "status" not in state:
            raise RuntimeError("the application did not call start_response")
        body = b"".join(written)
        headers, app_length = [], None
        for name, value in state["headers"]:
            if name == "Content-Length":
                app_length = value
                if value != str(len(body)) and environ["REQUEST_METHOD"] != "HEAD":
                    log.warning("application said Content-Length %s for a %d-byte body; sent %d",
                                value, len(body), len(body))
            else:
                headers.append((name, value))
        return WsgiResult(state["status"], headers, body, app_length)
