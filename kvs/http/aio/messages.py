"""What the asyncio server and client exchange: `Request`, `Response`, `Headers`, and the wire form.

Everything here is decoded the way PEP 3333 servers decode it: header names and
values, the request target and the query string are the bytes as sent, read as
latin-1 (every byte maps to one character, nothing can fail); the path stays
percent-encoded in `Request.path`, and `wsgi_path` gives the PATH_INFO a WSGI
server (waitress) would compute from it.
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus
from typing import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from urllib.parse import unquote_to_bytes

# Headers the server writes itself; a handler's own values for them are dropped.
MANAGED_HEADERS = frozenset(("content-length", "connection", "transfer-encoding", "date", "server", "keep-alive"))


class Headers(Mapping[str, str]):
    """A read-only, case-insensitive mapping of header name -> value (str, latin-1).

    Names are kept lowercased; a field sent more than once is joined with ", " (RFC 9110 5.3), as
    waitress does for its environ."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, str] | Iterable[tuple[str, str]] = ()):
        merged: dict[str, str] = {}
        for name, value in (fields.items() if isinstance(fields, Mapping) else fields):
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        self._fields = merged

    @classmethod
    def _of(cls, lowered: dict[str, str]) -> "Headers":
        """Wrap a dict whose keys are already lowercase and merged (the parsers build one)."""
        headers = cls.__new__(cls)
        headers._fields = lowered
        return headers

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    def get(self, name: str, default=None):
        return self._fields.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


class Request:
    """One parsed HTTP request. `path` is the target's path as sent (still percent-encoded),
    `query` what follows the "?" (without it), both read as latin-1; `version` is "1.0" or "1.1";
    `keep_alive` says whether the connection stays open after the response."""

    # __weakref__: the server ties the budget of a large body to the request's life (weakref.finalize)
    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive", "version", "peer", "__weakref__")

    def __init__(self, method: str, path: str, query: str, headers: Headers, body: bytes,
                 keep_alive: bool = True, version: str = "1.1"):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.version = version
        self.peer: tuple | None = None      # (host, port) of the client, set by the server

    def __repr__(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"<Request {self.method} {self.path}{query} {len(self.body)} bytes>"


class Response:
    """What a fast handler returns. The server adds Content-Length, Date, Server and Connection;
    a handler's own values for those (and Transfer-Encoding) are dropped."""

    __slots__ = ("status", "body", "headers", "stream")

    def __init__(self, status: int, body: bytes = b"", headers: Sequence[tuple[str, str]] = (),
                 stream: AsyncIterator[bytes] | None = None):
        self.status = status
        self.body = body
        self.headers = headers
        # A body produced piece by piece (GET /fetch of a whole store): sent chunked (HTTP/1.1) or until
        # the connection closes (1.0), written as it comes, paced by the client's reading. An error
        # midway aborts the connection, so a client never takes a cut listing for a whole one.
        self.stream = stream

    @classmethod
    def json(cls, status: int, payload: object, headers: Sequence[tuple[str, str]] = ()) -> "Response":
        """A compact JSON body (kvs's separators) with Content-Type application/json."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        return cls(status, body, [("Content-Type", "application/json"), *headers])

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"


def error_response(status: int, error: str, method: str) -> Response:
    """kvs's error body: {"error": ..., "message": "Error in <METHOD>"}."""
    return Response.json(status, {"error": error, "message": f"Error in {method}"})


# -- request targets -----------------------------------------------------------------------------------------

def split_target(target: bytes) -> tuple[str, str]:
    """(path, query) of a request target, both as sent (still percent-encoded), read as latin-1.

    The fragment (which clients should not send) is dropped; an absolute-form target
    ("http://host:port/p?q", sent to proxies) keeps its path only, as waitress does."""
    if b"#" in target:
        target = target.partition(b"#")[0]
    path, _, query = target.partition(b"?")
    if path[:1] != b"/" and path != b"*":
        scheme, sep, rest = path.partition(b"://")
        if sep:
            slash = rest.find(b"/")
            path = rest[slash:] if slash >= 0 else b""
    return path.decode("latin-1"), query.decode("latin-1")


def wsgi_path(path: str) -> str:
    """PATH_INFO as waitress computes it from a raw path: percent-decoded to bytes, read as latin-1
    (so UTF-8 "é" sent as %C3%A9 becomes "Ã©", PEP 3333's "bytes in a str"), leading slashes
    collapsed to one."""
    if "%" in path:
        path = unquote_to_bytes(path.encode("latin-1")).decode("latin-1")
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path


# -- responses on the wire ---------------------------------------------------------------------------------------

_STATUS_LINES: dict[tuple[str, int], str] = {}
_DATE: tuple[int, str] = (0, "")


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def status_line(version: str, status: int) -> str:
    line = _STATUS_LINES.get((version, status))
    if line is None:
        line = _STATUS_LINES[(version, status)] = f"HTTP/{version} {status} {reason(status)}\r\n"
    return line


def http_date() -> str:
    """The Date header's value (RFC 9110 IMF-fixdate), recomputed once a second."""
    global _DATE
    now = int(time.time())
    cached = _DATE
    if cached[0] != now:
        year, month, day, hh, mm, ss, wd, _, _ = time.gmtime(now)
        text = "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
            ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[wd], day,
            ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")[month - 1],
            year, hh, mm, ss)
        cached = _DATE = (now, text)
    return cached[1]


def has_body(status: int) -> bool:
    return not (status < 200 or status in (204, 304))


def _head_parts(response: Response, version: str) -> list[str]:
    """The status line and the handler's own headers (those the server manages dropped)."""
    parts = [status_line(version, response.status)]
    for name, value in response.headers:
        if name.lower() in MANAGED_HEADERS:
            continue
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"CR or LF in response header {name!r}")
        parts.append(f"{name}: {value}\r\n")
    return parts


def encode_stream_head(response: Response, version: str, keep_alive: bool, ident: str) -> bytes:
    """Status line and headers of a streamed response: chunked on HTTP/1.1, else the connection closes."""
    parts = _head_parts(response, version)
    parts.append(f"Date: {http_date()}\r\nServer: {ident}\r\n")
    parts.append("Transfer-Encoding: chunked\r\n" if version == "1.1" else "")
    if not keep_alive or version != "1.1":
        parts.append("Connection: close\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


def encode_response(response: Response, version: str, keep_alive: bool, head_only: bool, ident: str) -> bytes:
    """Status line, headers (the handler's, then Content-Length, Date, Server, Connection), body.

    Every response but 1xx/204 carries Content-Length; HEAD gets the headers a GET would."""
    body = response.body
    parts = _head_parts(response, version)
    if has_body(response.status):
        parts.append(f"Content-Length: {len(body)}\r\n")
    else:
        body = b""
    parts.append(f"Date: {http_date()}\r\nServer: {ident}\r\n")
    if not keep_alive:
        parts.append("Connection: close\r\n")
    elif version == "1.0":
        parts.append("Connection: Keep-Alive\r\n")
    parts.append("\r\n")
    head = "".join(parts).encode("latin-1")
    return head if head_only else head + body
