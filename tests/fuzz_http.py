"""Hypothesis strategies and a wire-level HTTP client for tests/test_fuzz.py.

Every request is built as bytes and sent over a plain socket: the fuzzer, not a client library,
decides the framing (a Content-Length that lies, chunked bodies, bare LFs, raw bytes in the target)
and nothing is normalised on the way ("a/../b" stays as sent, as a hostile client would send it).
After sending, the client half-closes: the server must answer every complete request, then close.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import quote, unquote_to_bytes

from hypothesis import strategies as st

STANDARD_METHODS = ("GET", "PUT", "DELETE", "POST", "PATCH", "HEAD", "OPTIONS")
ADMIN_PATHS = ("/kvs/view-change", "/kvs/view-change/add-member", "/kvs/view-change/remove-member", "/kvs/reshard")
# The read-only routes, and near misses (the seeds' /kvs/add-member is /kvs/view-change/add-member here).
INFO_PATHS = ("/kvs/status", "/kvs/status?digest=1", "/kvs/shards", "/kvs/key-count", "/health", "/livez", "/readyz",
              "/kvs/view-change",
              "/kvs/keys", "/kvs/keys/", "//kvs/keys/x", "/kvs", "/", "*", "http://h/kvs/status", "/kvs/add-member",
              "/kvs/remove-member", "/kvs/view-change/", "//kvs/view-change", "/kvs/reshard/")
INTERNAL_PATHS = ("status", "epochs", "metadata", "groups/1/commands", "groups/2/export", "groups/1/changes",
                  "writes/1", "writes/2", "writes/", "groups//commands", "nope", "batches/1/set", "batches/2/read",
                  "batches/1/scan", "batches/1/nope", "batches//set", "batches/9/read")
# Seed 004's batches, and near misses.
BATCH_PATHS = ("/set", "/fetch", "/query", "/set/", "/fetch/", "//set", "/SET")


class NoAnswer(AssertionError):
    """The node did not finish its answer (or close) within the client's bound: a hang."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]         # names lowercased
    body: bytes


@dataclass
class FuzzRequest:
    method: str
    target: bytes
    headers: list[tuple[str, str]]
    body: bytes
    framing: str = "exact"          # "exact" is well-formed HTTP/1.1; anything else bends the framing
    extra: bytes = b""              # appended after the message (what a lying Content-Length leaves over)
    extra_methods: list[str] = field(default_factory=list)     # of the requests in `extra`, when known
    lines: list[bytes] = field(default_factory=list)
    # (path, query, headers) of a request to be signed as a node signs it, for the node it is sent to
    to_sign: tuple | None = None

    def __repr__(self) -> str:
        return f"FuzzRequest({self.framing}: {self.wire()[:400]!r}, {len(self.body)} body bytes)"

    @property
    def methods(self) -> list[str]:
        """The method of each request sent, as far as known (a HEAD answer has no body to frame)."""
        return [self.method, *self.extra_methods]

    @property
    def well_formed(self) -> bool:
        return self.framing == "exact"

    def wire(self) -> bytes:
        eol = b"\n" if self.framing == "bare-lf" else b"\r\n"
        version = {"http10": b" HTTP/1.0", "no-version": b"", "bad-version": b" HTTP/9.9"}.get(self.framing,
                                                                                             b" HTTP/1.1")
        head = [self.method.encode("latin-1") + b" " + self.target + version]
        # latin-1 where it can be (what clients send), else UTF-8: raw bytes over 0x7F in a field
        head += [_field(f"{name}: {value}") for name, value in self.headers]
        head += self.lines
        return eol.join(head) + eol + eol + self.body + self.extra


def _field(line: str) -> bytes:
    try:
        return line.encode("latin-1")
    except UnicodeEncodeError:
        return line.encode("utf-8")


def mentions(request: FuzzRequest, word: str) -> bool:
    """Whether `word` appears anywhere in the request, percent-decoded up to three times (case-blind)."""
    data = request.wire()
    for _ in range(3):
        data = unquote_to_bytes(data)
    return word.lower().encode() in data.lower()


# -- the wire ---------------------------------------------------------------------------------------------------

def exchange(address: str, data: bytes, timeout: float, methods: Sequence[str] = ()) -> list[Answer]:
    """Send `data`, half-close, read until the node closes; the answers in order. NoAnswer past `timeout`."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass                    # refused early and closed (a 413 before the body): its answer is still to be read
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer(f"no complete answer within {timeout}s; got {b''.join(chunks)[:300]!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return parse_answers(b"".join(chunks), methods)


def parse_answers(data: bytes, methods: Sequence[str]) -> list[Answer]:
    """The final responses in `data` (1xx skipped), to requests of `methods` (then of unknown ones: a
    HEAD among those would end the framing); AssertionError if one is cut or malformed."""
    answers: list[Answer] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:300]!r}"
        lines = head.split(b"\r\n")
        assert lines[0][:7] in (b"HTTP/1.", ), f"not a status line: {lines[0]!r}"
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        if 100 <= status < 200:
            data = rest
            continue
        length = 0 if status in (204, 304) else int(headers.get("content-length", "0"))
        if len(answers) < len(methods) and methods[len(answers)] == "HEAD" and \
                not (headers.get("connection") == "close" and len(rest) == length):
            # A HEAD answer has no body; but a refusal (the head could not be parsed, so its method is not
            # trusted) carries one whatever the method, and is the last answer before the node closes.
            length = 0
        assert len(rest) >= length, f"body cut short: {length} announced, {len(rest)} sent"
        answers.append(Answer(status, headers, rest[:length]))
        data = rest[length:]
    return answers


# -- strategies -------------------------------------------------------------------------------------------------

def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each drawn about `weight` times as often as a strategy of weight 1."""
    return st.one_of(*[strategy for weight, strategy in choices for _ in range(weight)])


def _text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size)


# Header values as latin-1 text without CR/LF: the bytes a client can put in a field.
_field_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)

junk_methods = st.one_of(
    st.sampled_from(["CONNECT", "TRACE", "PROPFIND", "PURGE", "M-SEARCH", "get", "Put", "", "GET\x00", "DELETE "]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=10),
)
methods = weighted((6, st.sampled_from(STANDARD_METHODS)), (1, junk_methods))
# Key requests are mostly the three the API has, so that most of them reach the router and the groups.
key_methods = weighted((4, st.sampled_from(["GET", "PUT", "DELETE"])), (1, st.sampled_from(STANDARD_METHODS)),
                       (1, junk_methods))

_key_text = weighted(
    (4, _text(60)),
    (1, st.sampled_from([".", "..", "", "...", "./x", "a/../b", "../../kvs/status", "é" * 26, "é" * 51, "😀" * 13,
                         "\x00", " ", "?", "#", "%", "\ud800", "%41", "x" * 50, "x" * 51])),
    (1, st.builds(lambda ch, n: ch * n, st.sampled_from("xé/."), st.integers(0, 70_000))),
)


def _encoded(key: str, how: str) -> bytes:
    if how == "raw":                # as text on the wire: the server must refuse raw non-ASCII (400)
        return key.encode("utf-8", "surrogatepass").replace(b" ", b"%20").replace(b"?", b"%3F").replace(b"#", b"%23")
    safe = {"none": "", "slash": "/", "sub-delims": "/:@!$&'()*+,;="}[how]
    return quote(key.encode("utf-8", "surrogatepass"), safe=safe).encode()


segments = weighted(
    (6, st.builds(_encoded, _key_text, st.just("none"))),
    (2, st.builds(_encoded, _key_text, st.sampled_from(["slash", "sub-delims", "raw"]))),
    (1, st.builds(lambda key, junk: _encoded(key, "none") + junk, _key_text,
                  st.sampled_from([b"%", b"%G1", b"%C3", b"%FF%FE", b"%ED%A0%80", b"%00", b"%2", b"%%"]))),
)

queries = weighted((6, st.just(b"")), (1, st.sampled_from([b"?digest=1", b"?", b"#frag", b"?a=1&a=2"])),
                   (1, st.builds(lambda t: b"?" + quote(t).encode(), _text(20))))

key_targets = st.builds(lambda seg, q: b"/kvs/keys/" + seg + q, segments, queries)

other_targets = weighted(
    (3, st.builds(lambda p, q: p.encode() + q, st.sampled_from(ADMIN_PATHS), queries)),
    (3, st.builds(lambda p, q: p.encode() + q, st.sampled_from(INFO_PATHS), queries)),
    (2, st.builds(lambda seg, q: b"/kvs/shards/" + seg + q,
                  st.one_of(st.sampled_from([b"1", b"2", b"0", b"-1", b"01", b"1%2F2"]), segments), queries)),
    (2, st.builds(lambda p: b"/internal/" + p.encode(), st.sampled_from(INTERNAL_PATHS))),
    (3, st.builds(lambda p, q: p.encode() + q, st.sampled_from(BATCH_PATHS), queries)),
    (1, st.builds(lambda seg: b"/internal/groups/" + seg + b"/commands", segments)),
    (1, st.builds(lambda seg, q: b"/" + seg + q, segments, queries)),
)


def _json(value: object, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([10 ** 400, -(10 ** 300)]),
                          st.floats(), _text(30))
json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(_text(10), inner, max_size=4), max_leaves=16)
contexts = weighted((3, st.dictionaries(_text(10), json_values, max_size=3)), (1, json_values))
_view_like = st.one_of(st.lists(st.sampled_from(["127.0.0.1:1", "h:13800", "10.0.0.1:13800", "", " ", "x"]),
                                max_size=5).map(",".join), _text(40))
# Bodies that look right: a value (a string mostly) and a causal context (an object mostly).
key_objects = st.fixed_dictionaries({"value": weighted((5, _text(60)), (1, json_values))},
                                    optional={"causal-context": contexts, "extra": json_values})
_objects = st.fixed_dictionaries({}, optional={
    "value": st.one_of(_text(40), json_values), "causal-context": contexts, "view": st.one_of(_view_like, json_values),
    "repl-factor": st.one_of(st.integers(-2, 5), json_values), "shard-count": st.one_of(st.integers(-2, 5), json_values),
    "address": st.one_of(_view_like, json_values), "shard-id": st.one_of(st.sampled_from(["1", "2", "9"]), json_values),
    "commands": json_values, "command": json_values,
})


# Seed 004's items: {"encoding", "data"} objects, mostly well formed, in lists of pairs or of keys.
_data_objects = st.fixed_dictionaries({
    "encoding": weighted((4, st.sampled_from(["string", "binary"])), (1, json_values)),
    "data": weighted((3, _text(30)), (3, st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())),
                     (1, json_values))})
_batch_items = st.lists(weighted((4, st.fixed_dictionaries({"key": _data_objects, "value": _data_objects})),
                                 (3, _data_objects), (1, json_values)), max_size=8)


def _nested(depth: int, opener: str) -> bytes:
    if opener == "[":
        return b"[" * depth + b"]" * depth
    return b'{"value":' * depth + b'"v"' + b"}" * depth


bodies = weighted(
    (1, st.just(b"")),
    (1, st.binary(max_size=300)),
    (1, st.builds(_json, json_values, st.booleans())),
    (3, st.builds(_json, _objects, st.booleans())),
    (1, st.builds(_nested, st.integers(1, 20_000), st.sampled_from("[{"))),
    (1, st.builds(lambda n: b'{"value": ' + b"9" * n + b"}", st.integers(1, 10_000))),
    (1, st.integers(0, 30).map(lambda n: b"x" * ((1 << 20) + 1) if n == 0 else b'{"value":"v"}')),   # 413, rarely
    (3, st.builds(_json, _batch_items, st.booleans())),
)
key_bodies = weighted((4, st.builds(_json, key_objects, st.booleans())), (1, st.just(b"")), (3, bodies))

_auth = st.one_of(st.builds(lambda t: "Bearer " + t, _field_text), _field_text,
                  st.sampled_from(["Bearer", "Bearer ", "Basic Zm9vOmJhcg==", "bearer wrong"]))
_deadline = st.one_of(st.integers(0, 10 ** 12).map(str), st.sampled_from(["-5", "1e9", "²", "", " 7", "9" * 5000]),
                      _field_text)
_signature = st.one_of(st.builds("t={},s={}".format, st.integers(0, 10 ** 12), st.text("0123456789abcdef", max_size=64)),
                       _field_text, st.just("t=" + "9" * 400 + ",s=0"))
_named = st.fixed_dictionaries({}, optional={
    "Content-Type": st.one_of(st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1",
                                               "multipart/form-data; boundary=x"]), _field_text),
    "X-Kvs-Forwarded": st.one_of(st.sampled_from(["1", "0", "", "yes"]), _field_text),
    "X-Kvs-Deadline-Ms": _deadline,
    "X-Kvs-Signature": _signature,
    "Idempotency-Key": _field_text,
    "Authorization": _auth,
    "Expect": st.sampled_from(["100-continue", "nothing"]),
    "Connection": st.sampled_from(["close", "keep-alive", "Upgrade"]),
    "Upgrade": st.sampled_from(["websocket", "h2c"]),
})
_token = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"), min_size=1,
                 max_size=12)
# Random extra fields, but none that frames the body: the framing is chosen apart (`malformed`).
_extra = st.tuples(_token, _field_text).filter(lambda h: h[0].lower() not in ("content-length", "transfer-encoding"))
headers = st.builds(lambda named, extra: list(named.items()) + extra, _named, st.lists(_extra, max_size=3))


def well_formed(target: st.SearchStrategy[bytes], method: st.SearchStrategy[str] = methods,
                body: st.SearchStrategy[bytes] = bodies) -> st.SearchStrategy[FuzzRequest]:
    """HTTP/1.1 requests framed correctly (Content-Length = the body), anything in them."""
    return st.builds(lambda m, t, h, b: FuzzRequest(m, t, [*h, ("Content-Length", str(len(b)))], b),
                     method, target, headers, body)


key_requests = well_formed(key_targets, key_methods, key_bodies)


@st.composite
def malformed(draw) -> FuzzRequest:
    """Requests whose framing lies or breaks the grammar; the node may refuse them (4xx) or close."""
    request = draw(st.one_of(key_requests, well_formed(other_targets)))
    request.headers = [h for h in request.headers if h[0].lower() != "content-length"]
    body = request.body
    framing = draw(st.sampled_from(["short", "long", "none", "chunked", "bad-chunked", "two-lengths", "junk-length",
                                    "te-and-cl", "bare-lf", "http10", "no-version", "bad-version", "raw-target",
                                    "folded", "nul-header", "huge-head", "many-headers", "trailers", "pipelined"]))
    request.framing = framing
    size = len(body)
    if framing == "short":
        request.headers.append(("Content-Length", str(draw(st.integers(0, max(0, size - 1))))))
        request.extra = draw(st.sampled_from([b"", b"GET /health HTTP/1.1\r\n\r\n", b"\r\n\r\n"]))
        # what the lie leaves over is parsed as requests of unknown methods: their answers are not framed

    elif framing == "long":
        request.headers.append(("Content-Length", str(size + draw(st.integers(1, 10_000)))))
    elif framing == "pipelined":            # well-formed, then more requests on the same connection
        request.headers.append(("Content-Length", str(size)))
        pipelined = draw(st.lists(key_requests, min_size=1, max_size=3))
        request.extra = b"".join(r.wire() for r in pipelined)
        request.extra_methods = [r.method for r in pipelined]
    elif framing == "trailers":
        request.headers.append(("Transfer-Encoding", "chunked"))
        request.body = b"%x;name=value\r\n" % size + body + b"\r\n0\r\nX-Trailer: t\r\nContent-Length: 5\r\n\r\n"
    elif framing in ("chunked", "bad-chunked", "te-and-cl"):
        request.headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "chunked", "gzip, chunked",
                                                                            "identity", "chunked, chunked"]))))
        if framing == "te-and-cl":
            request.headers.append(("Content-Length", str(size)))
        sizes = b"%x" % size if framing != "bad-chunked" else draw(st.sampled_from([b"zz", b"-1", b"ffffffffffffffffff",
                                                                                     b"1;ext=\x01", b""]))
        request.body = sizes + b"\r\n" + body + b"\r\n0\r\n\r\n" if framing != "bad-chunked" or size else sizes
    elif framing == "two-lengths":
        request.headers += [("Content-Length", str(size)), ("Content-Length", str(size + 1))]
    elif framing == "junk-length":
        request.headers.append(("Content-Length", draw(st.sampled_from(["-1", "+5", "0x10", "1e3", "", " 5", "5 5",
                                                                         "9" * 30, "١٢"]))))
    elif framing in ("bare-lf", "http10", "no-version", "bad-version"):
        request.headers.append(("Content-Length", str(size)))
    elif framing == "raw-target":
        request.target = request.target + draw(st.binary(min_size=1, max_size=20))
    elif framing == "folded":
        request.lines.append(b" continued-value")
    elif framing == "nul-header":
        request.lines.append(b"X-Junk: a\x00b\x7f\xff")
    elif framing == "many-headers":
        request.headers += [(f"X-H{i}", "v") for i in range(draw(st.sampled_from([99, 150])))]
    elif framing == "huge-head":
        request.headers.append(("X-Big", "h" * draw(st.sampled_from([70_000, 8_000]))))
    return request
