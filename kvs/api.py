"""The REST API: a Flask application factory over a Node and its Router.

The HTTP layer validates input, authenticates forwarded requests, calls the
router, and turns kvs errors into JSON in one error handler. It holds no state
of its own: everything lives in the Node and Router it is built around.

Limits: keys longer than 50 characters are refused on PUT (the seeds' rule);
request bodies larger than `NodeSettings.max_body_bytes` (1 MiB by default,
KVS_MAX_BODY_BYTES) get 413.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import forwarding
from .errors import BadRequest, KvsError, NotMember, PayloadTooLarge, Unavailable
from .messages import ERROR_IN, Reply
from .node import Node
from .shard.router import Router

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 50

keys = Blueprint("keys", __name__)
shards = Blueprint("shards", __name__)
ops = Blueprint("ops", __name__)


def create_app(node: Node, router: Router) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = node.settings.max_body_bytes
    app.extensions["kvs"] = (node, router)
    app.register_blueprint(keys)
    app.register_blueprint(shards)
    app.register_blueprint(ops)
    app.register_error_handler(Exception, _error_response)
    return app


def _node() -> Node:
    return current_app.extensions["kvs"][0]


def _router() -> Router:
    return current_app.extensions["kvs"][1]


def _json(status: int, body: dict, headers: dict | None = None) -> Response:
    resp = Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def _reply(reply: Reply) -> Response:
    return _json(reply.status, reply.body, reply.headers)


# -- request context: body, deadline, request id, forwarding ---------------------------------------

def _request_body() -> dict:
    """The JSON object in the body ({} when empty); BadRequest/PayloadTooLarge otherwise."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("Malformed JSON body") from None
    if not isinstance(body, dict):
        raise BadRequest("The JSON body must be an object")
    return body


def _deadline() -> float:
    timeout = _node().settings.request_timeout
    given = request.headers.get(forwarding.DEADLINE)
    if given and given.isdigit():
        timeout = min(timeout, int(given) / 1000.0)
    return time.monotonic() + timeout


def _request_id() -> str:
    return request.headers.get(forwarding.REQUEST_ID) or uuid.uuid4().hex


def _is_forwarded() -> bool:
    """True for an authenticated node-to-node request (refused if its signature is bad)."""
    if request.headers.get(forwarding.FORWARDED) != "1":
        return False
    secret = _node().settings.secret
    if secret:
        forwarding.verify(secret, request.headers.get(forwarding.SIGNATURE), request.method, request.path,
                          request.headers.get(forwarding.REQUEST_ID, ""), request.get_data(cache=True))
    return True


# -- /kvs/keys -------------------------------------------------------------------------------------------

@keys.route("/kvs/keys/<path:key>", methods=["GET", "PUT", "DELETE"])
def key_request(key: str) -> Response:
    g.data_request = True
    forwarded = _is_forwarded()
    body = _request_body()
    context = body.get("causal-context", {})
    g.causal_context = context if isinstance(context, dict) else {}
    if not isinstance(context, dict):
        raise BadRequest("causal-context must be a JSON object")
    value = None
    if request.method == "PUT":
        if len(key) > MAX_KEY_LENGTH:
            raise BadRequest("Key is too long")
        value = body.get("value")
        if value is None:
            raise BadRequest("Value is missing")
        if not isinstance(value, str):
            raise BadRequest("Value must be a string")
    reply = _router().key_request(request.method, key, value, _request_id(), _deadline(), forwarded)
    reply.body.setdefault("causal-context", g.causal_context)
    return _reply(reply)


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
    forwarded = _is_forwarded()
    return _reply(_router().shard_info(shard_id, _request_id(), _deadline(), forwarded))


# -- operations ---------------------------------------------------------------------------------------------

@ops.route("/kvs/status", methods=["GET"])
def status() -> Response:
    return _json(200, _node().status())


@ops.route("/health", methods=["GET"])
def health() -> Response:
    ready, reason = _node().health()
    return _json(200 if ready else 503, {"status": "ok" if ready else "unavailable", "reason": reason})


# -- the one error handler ----------------------------------------------------------------------------------

def _error_response(exc: Exception) -> Response:
    if isinstance(exc, RequestEntityTooLarge):
        exc = PayloadTooLarge(f"Request body larger than {_node().settings.max_body_bytes} bytes")
    if isinstance(exc, KvsError):
        status, error = exc.status, exc.message
        if isinstance(exc, Unavailable) and not isinstance(exc, NotMember):
            error = "Unable to satisfy request"     # the seeds' wording; the cause goes to the log
            log.info("%s %s: %s", request.method, request.path, exc.message)
    elif isinstance(exc, HTTPException):
        status, error = exc.code or 500, exc.description or exc.name
    else:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        status, error = 500, "Internal error"
    body = {"error": error, "message": ERROR_IN.get(request.method, f"Error in {request.method}")}
    if getattr(g, "data_request", False):
        body["causal-context"] = getattr(g, "causal_context", {})
    return _json(status, body)
