"""The REST API: a Flask application factory over a Node and its Router.

The HTTP layer validates input, authenticates forwarded requests, calls the
router, and turns kvs errors into JSON in one place (`error_reply`). It holds
no state of its own: everything lives in the Node and Router it is built around.

Data requests (`/kvs/keys/<key>`) are the hot path and are served by
`KeyRequests`, a plain WSGI middleware the factory installs in front of Flask
(`app.wsgi_app`): measured on this project's 2-core machine, Flask's
per-request machinery alone costs ~165 us, half of what waitress needs for a
whole small request. Everything else is a Flask blueprint.

Limits: keys longer than 50 characters are refused on PUT (the seeds' rule);
request bodies larger than `NodeSettings.max_body_bytes` (1 MiB by default,
KVS_MAX_BODY_BYTES) get 413.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import forwarding
from .errors import BadRequest, KvsError, NotMember, PayloadTooLarge, Unavailable, WrongGroup
from .messages import Reply
from .node import Node
from .settings import NodeSettings
from .internal import internal
from .shard.reconfig import ViewChange
from .shard.router import Router

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 50
KEYS_PREFIX = "/kvs/keys/"
KEY_METHODS = ("GET", "PUT", "DELETE")
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 400: "400 Bad Request", 401: "401 Unauthorized",
                404: "404 Not Found", 405: "405 Method Not Allowed", 413: "413 Payload Too Large",
                421: "421 Misdirected Request", 500: "500 Internal Server Error", 503: "503 Service Unavailable"}

shards = Blueprint("shards", __name__)
ops = Blueprint("ops", __name__)


def create_app(node: Node, router: Router, view_change: ViewChange) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = node.settings.max_body_bytes
    app.extensions["kvs"] = (node, router, view_change)
    app.register_blueprint(shards)
    app.register_blueprint(ops)
    app.register_blueprint(internal)
    app.register_error_handler(Exception, _flask_error)
    app.wsgi_app = KeyRequests(app.wsgi_app, node.settings, router)
    return app


# -- what every route shares -------------------------------------------------------------------------------

def parse_body(raw: bytes) -> dict:
    """The JSON object in the body ({} when empty); BadRequest otherwise."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("Malformed JSON body") from None
    if not isinstance(body, dict):
        raise BadRequest("The JSON body must be an object")
    return body


def deadline(settings: NodeSettings, headers: Mapping[str, str]) -> float:
    """Now + the request timeout, shortened to what a forwarding node has left."""
    timeout = settings.request_timeout
    given = headers.get(forwarding.DEADLINE)
    if given and given.isdigit():
        timeout = min(timeout, int(given) / 1000.0)
    return time.monotonic() + timeout


def is_forwarded(settings: NodeSettings, headers: Mapping[str, str], method: str, path: str, raw: bytes) -> bool:
    """True for an authenticated node-to-node request (Unauthorized if its signature is bad)."""
    if headers.get(forwarding.FORWARDED) != "1":
        return False
    if settings.secret:
        forwarding.verify(settings.secret, headers.get(forwarding.SIGNATURE), method, path,
                          headers.get(forwarding.REQUEST_ID, ""), raw)
    return True


def error_reply(exc: Exception, method: str, path: str, causal_context: dict | None = None) -> Reply:
    """The one mapping from an exception to a status and a JSON body."""
    if isinstance(exc, KvsError):
        status, error = exc.status, exc.message
        if isinstance(exc, Unavailable) and not isinstance(exc, NotMember):
            error = "Unable to satisfy request"     # the seeds' wording; the cause goes to the log
            log.info("%s %s: %s", method, path, exc.message)
    elif isinstance(exc, HTTPException):
        status, error = exc.code or 500, exc.description or exc.name
    else:
        log.error("unexpected error serving %s %s", method, path, exc_info=exc)
        status, error = 500, "Internal error"
    body: dict[str, Any] = {"error": error, "message": f"Error in {method}"}
    if causal_context is None and isinstance(exc, Unavailable) and error != exc.message:
        # Beyond the key requests (whose bodies are the seeds', exactly), say what an operator can act on.
        body["cause"] = exc.message
    if isinstance(exc, WrongGroup):
        body["epoch"] = exc.epoch           # only forwarded requests see 421: the sender routes again
    if causal_context is not None:
        body["causal-context"] = causal_context
    return Reply(status, body)


# -- /kvs/keys: the hot path, as plain WSGI -------------------------------------------------------------

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
                                                 headers.get(forwarding.REQUEST_ID) or self._new_id(),
                                                 deadline(self._settings, headers), forwarded)
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


# -- Flask routes -----------------------------------------------------------------------------------------

def _node() -> Node:
    return current_app.extensions["kvs"][0]


def _router() -> Router:
    return current_app.extensions["kvs"][1]


def _view_change() -> ViewChange:
    return current_app.extensions["kvs"][2]


def _json(status: int, body: dict, headers: dict | None = None) -> Response:
    resp = Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def _deadline() -> float:
    return deadline(_node().settings, request.headers)


def _json_object() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("Malformed JSON body")
    return body


# -- /kvs/key-count and /kvs/shards ---------------------------------------------------------------------

@shards.route("/kvs/key-count", methods=["GET"])
def key_count() -> Response:
    shard_id, count = _router().key_count(_deadline())
    return _json(200, {"message": "Key count retrieved successfully", "key-count": count, "shard-id": shard_id})


@shards.route("/kvs/shards", methods=["GET"])
def shard_list() -> Response:
    return _json(200, {"message": "Shard membership retrieved successfully", "shards": _router().shard_ids()})


@shards.route("/kvs/shards/<shard_id>", methods=["GET"])
def shard_info(shard_id: str) -> Response:
    forwarded = is_forwarded(_node().settings, request.headers, request.method, request.path,
                             request.get_data(cache=True))
    reply = _router().shard_info(shard_id, request.headers.get(forwarding.REQUEST_ID) or uuid.uuid4().hex,
                                 _deadline(), forwarded)
    return _json(reply.status, reply.body, reply.headers)


# -- operations ---------------------------------------------------------------------------------------------

@shards.route("/kvs/view-change", methods=["PUT"])
def view_change() -> Response:
    body = _json_object()
    return _view_changed(_view_change().run(body.get("view"), body.get("repl-factor")))


@shards.route("/kvs/view-change/add-member", methods=["PUT"])
def add_member() -> Response:
    body = _json_object()
    return _view_changed(_view_change().add_member(body.get("address"), body.get("shard-id")))


@shards.route("/kvs/view-change/remove-member", methods=["PUT"])
def remove_member() -> Response:
    return _view_changed(_view_change().remove_member(_json_object().get("address")))


@shards.route("/kvs/reshard", methods=["PUT"])
def reshard() -> Response:
    shard_list = _view_change().reshard(_json_object().get("shard-count"))
    return _json(200, {"message": "Resharding done successfully", "shards": shard_list})


def _view_changed(shard_list: list[dict]) -> Response:
    return _json(200, {"message": "View change successful", "shards": shard_list})


@shards.route("/kvs/view-change", methods=["GET"])
def view_change_status() -> Response:
    node = _node()
    change = node.change()
    epoch = node.epoch
    return _json(200, {"epoch": epoch.number if epoch else None,
                       "phase": change["phase"] if change else None,
                       "progress": _view_change().progress.to_dict()})


@ops.route("/kvs/status", methods=["GET"])
def status() -> Response:
    return _json(200, _node().status(digest=request.args.get("digest") == "1"))


@ops.route("/health", methods=["GET"])
def health() -> Response:
    ready, reason = _node().health()
    return _json(200 if ready else 503, {"status": "ok" if ready else "unavailable", "reason": reason})


# -- errors of Flask routes -------------------------------------------------------------------------------

def _flask_error(exc: Exception) -> Response:
    if isinstance(exc, RequestEntityTooLarge):
        exc = PayloadTooLarge(f"Request body larger than {_node().settings.max_body_bytes} bytes")
    reply = error_reply(exc, request.method, request.path)
    return _json(reply.status, reply.body)
