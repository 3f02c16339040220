"""GET/PUT/DELETE /kvs/keys/<key>: the hot path, served as plain WSGI in front of Flask.

Measured on this project's 2-core machine, Flask's per-request machinery alone
costs ~165 us, half of what waitress needs for a whole small request, so the
key requests skip it: `KeyRequests` is a WSGI middleware that the app factory
(`kvs.http.public.create_app`) installs as `app.wsgi_app`; every other path
goes on to Flask.

Limits: keys longer than 50 characters are refused on PUT; request bodies
larger than `NodeSettings.max_body_bytes` (1 MiB by default,
KVS_MAX_BODY_BYTES) get 413.
"""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Callable, Iterable

from werkzeug.datastructures import EnvironHeaders

from kvs.errors import BadRequest, PayloadTooLarge
from kvs.http.common import error_reply, is_forwarded, parse_body, request_deadline
from kvs.routing import peers
from kvs.routing.replies import Reply
from kvs.routing.router import Router
from kvs.settings import NodeSettings

MAX_KEY_LENGTH = 50
KEYS_PREFIX = "/kvs/keys/"
KEY_METHODS = ("GET", "PUT", "DELETE")
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 400: "400 Bad Request", 401: "401 Unauthorized",
                404: "404 Not Found", 405: "405 Method Not Allowed", 413: "413 Payload Too Large",
                421: "421 Misdirected Request", 500: "500 Internal Server Error", 503: "503 Service Unavailable"}


class KeyRequests:
    """WSGI middleware that serves GET/PUT/DELETE /kvs/keys/<key> and passes everything else on."""

    def __init__(self, next_app: Callable, settings: NodeSettings, router: Router):
        self._next = next_app
        self._settings = settings
        self._router = router
        # Request ids: unique per node incarnation, cheaper than a uuid4 per request.
        self._id_prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(KEYS_PREFIX) or len(path) == len(KEYS_PREFIX):
            return self._next(environ, start_response)
        method = environ["REQUEST_METHOD"]
        context: dict = {}
        try:
            if method not in KEY_METHODS:
                reply = Reply(405, {"error": f"Method {method} is not allowed here",
                                    "message": f"Error in {method}"})
            else:
                headers = EnvironHeaders(environ)
                raw = self._read_body(environ)
                body = parse_body(raw)
                given = body.get("causal-context", {})
                if not isinstance(given, dict):
                    raise BadRequest("causal-context must be a JSON object")
                context = given
                forwarded = is_forwarded(self._settings, headers, method, path, raw)
                key = path[len(KEYS_PREFIX):]
                reply = self._router.key_request(method, key, self._value(method, key, body),
                                                 headers.get(peers.REQUEST_ID) or self._new_id(),
                                                 request_deadline(self._settings, headers), forwarded)
                reply.body.setdefault("causal-context", context)
        except Exception as exc:
            reply = error_reply(exc, method, path, context)
        return _wsgi_response(reply, start_response)

    def _read_body(self, environ: dict) -> bytes:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise BadRequest("Malformed Content-Length") from None
        limit = self._settings.max_body_bytes
        if length > limit:
            raise PayloadTooLarge(f"Request body larger than {limit} bytes")
        return environ["wsgi.input"].read(length) if length > 0 else b""

    @staticmethod
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
        return value

    def _new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"


def _wsgi_response(reply: Reply, start_response: Callable) -> list[bytes]:
    payload = json.dumps(reply.body, separators=(",", ":")).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    headers.extend(reply.headers.items())
    start_response(_STATUS_TEXT.get(reply.status, f"{reply.status} Status"), headers)
    return [payload]
