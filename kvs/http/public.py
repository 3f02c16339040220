"""The public REST API: the Flask application factory and every route but the key requests.

The HTTP layer validates input, authenticates forwarded requests, calls the
shard queries or the view-change coordinator, and turns kvs errors into JSON in one
place (`kvs.http.common.error_reply`). It holds no state of its own:
everything lives in the `Services` it is built around. The key requests
(`/kvs/keys/<key>`, the hot path) never reach Flask: the server answers them on
its event loop (`kvs.http.keys`); Flask serves the rest on worker threads.

A view change runs as a background job of the node (`ViewChange.submit`): the
request only starts it and waits for its outcome, so a client that hangs up
cannot stop a change half way.
"""

from __future__ import annotations

import hmac
import uuid

from flask import Blueprint, Flask, Response, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from kvs.errors import BadRequest, NotMember, PayloadTooLarge, Unauthorized
from kvs.http.common import Services, error_reply, json_response, parse_body, request_deadline, services
from kvs.http.internal import internal
from kvs.http.openapi import SPEC
from kvs.reconfig.planner import Plan
from kvs.logs import REQUEST_ID_HEADER
from kvs.metrics import CONTENT_TYPE, exposition
from kvs.routing import peers

INTERNAL_BODY_BYTES = 256 << 20   # node-to-node transfers: installs, batches (kvs.server)

shards = Blueprint("shards", __name__)
ops = Blueprint("ops", __name__)


def create_app(svc: Services) -> Flask:
    app = Flask(__name__)
    # The server refuses what is too large for its path before Flask reads it (the client limit for
    # the public API, a larger one for /internal/); Flask's own limit is that larger one.
    app.config["MAX_CONTENT_LENGTH"] = max(svc.node.settings.max_body_bytes, INTERNAL_BODY_BYTES)
    app.extensions["kvs"] = svc
    # Werkzeug answers "/kvs/shards//1" with a 308 HTML redirect to a URL built from the client's Host
    # header; every answer here is JSON, and a path no route has is a 404.
    app.url_map.merge_slashes = False
    app.register_blueprint(shards)
    app.register_blueprint(ops)
    app.register_blueprint(internal)
    app.register_error_handler(Exception, _flask_error)
    app.after_request(_echo_request_id)
    return app


def _request_id() -> str:
    """This request's id: the client's Idempotency-Key or X-Request-Id if it is a short printable one,
    else a new one; forwarded hops carry it, every answer names it (kvs.logs)."""
    if "request_id" not in g:
        given = request.headers.get(peers.REQUEST_ID) or request.headers.get(REQUEST_ID_HEADER) or ""
        g.request_id = given if 0 < len(given) <= 128 and given.isprintable() and given.isascii() \
            else uuid.uuid4().hex
    return g.request_id


def _echo_request_id(resp: Response) -> Response:
    resp.headers[REQUEST_ID_HEADER] = _request_id()
    return resp


def _deadline() -> float:
    return request_deadline(services().node.settings, request.headers)


def _admin() -> None:
    """With KVS_ADMIN_TOKEN set, a change of the cluster needs `Authorization: Bearer <token>` (401)."""
    token = services().node.settings.admin_token
    if token is None:
        return
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode("latin-1", "replace"), f"Bearer {token}".encode()):
        raise Unauthorized("this cluster's changes need 'Authorization: Bearer <KVS_ADMIN_TOKEN>'")


def _json_object() -> dict:
    body = parse_body(request.get_data(cache=True))
    if not body:
        raise BadRequest("Malformed JSON body")
    return body


# -- /kvs/key-count and /kvs/shards ---------------------------------------------------------------------

@shards.route("/kvs/key-count", methods=["GET"])
def key_count() -> Response:
    shard_id, count = services().shards.key_count(_deadline())
    return json_response(200, {"message": "Key count retrieved successfully", "key-count": count,
                               "shard-id": shard_id})


@shards.route("/kvs/shards", methods=["GET"])
def shard_list() -> Response:
    return json_response(200, {"message": "Shard membership retrieved successfully",
                               "shards": services().shards.shard_ids()})


@shards.route("/kvs/shards/<shard_id>", methods=["GET"])
def shard_info(shard_id: str) -> Response:
    forwarded = services().peer_auth.is_forwarded(request.headers, request.method, request.path,
                                                  request.query_string.decode("latin-1"),
                                                  request.get_data(cache=True), request.remote_addr)
    reply = services().shards.shard_info(shard_id, _request_id(),
                                         _deadline(), forwarded)
    return json_response(reply.status, reply.body, reply.headers)


@shards.route("/kvs/routing", methods=["GET"])
def routing() -> Response:
    """What a cluster-aware client routes by: the epoch, its ring, every shard's replicas, and the leader
    of each shard this node runs a replica of (null elsewhere: the client learns it from X-Kvs-Leader)."""
    node = services().node
    epoch = node.epoch
    if epoch is None:
        raise NotMember("this node does not know the cluster configuration")
    return json_response(200, {"epoch": epoch.number, "ring": epoch.ring.to_dict(),
                               "shards": {sid: {"replicas": list(epoch.replicas(sid)),
                                                "leader": node.leader_address(sid)} for sid in epoch.shard_ids()}})


@shards.route("/kvs/shards/<shard_id>/backup", methods=["GET"])
def shard_backup(shard_id: str) -> Response:
    """Every pair of the shard, with versions, as of one moment (`kvs snapshot save`); admin only."""
    forwarded = services().peer_auth.is_forwarded(request.headers, request.method, request.path,
                                                  request.query_string.decode("latin-1"),
                                                  request.get_data(cache=True), request.remote_addr)
    if not forwarded:
        _admin()
    reply = services().shards.backup(shard_id, _request_id(),
                                     _deadline(), forwarded)
    return json_response(reply.status, reply.body, reply.headers)


# -- operations ---------------------------------------------------------------------------------------------

def _change(job) -> list[dict]:
    """An admin change: the token checked, the body parsed, `job(view_change, body)` run as a job."""
    _admin()
    body = _json_object()
    vc = services().view_change
    return vc.submit(lambda: job(vc, body))


@shards.route("/kvs/view-change", methods=["PUT"])
def view_change() -> Response:
    return _view_changed(_change(lambda vc, body: vc.run(body.get("view"), body.get("repl-factor"))))


@shards.route("/kvs/view-change/add-member", methods=["PUT"])
def add_member() -> Response:
    return _view_changed(_change(lambda vc, body: vc.add_member(body.get("address"), body.get("shard-id"))))


@shards.route("/kvs/view-change/remove-member", methods=["PUT"])
def remove_member() -> Response:
    return _view_changed(_change(lambda vc, body: vc.remove_member(body.get("address"))))


@shards.route("/kvs/reshard", methods=["PUT"])
def reshard() -> Response:
    shard_list = _change(lambda vc, body: vc.reshard(body.get("shard-count")))
    return json_response(200, {"message": "Resharding done successfully", "shards": shard_list})


def _view_changed(shard_list: list[dict]) -> Response:
    return json_response(200, {"message": "View change successful", "shards": shard_list})


@shards.route("/kvs/view-change", methods=["GET"])
def view_change_status() -> Response:
    node = services().node
    change = node.change()
    epoch = node.epoch
    return json_response(200, {"epoch": epoch.number if epoch else None,
                               "phase": change["phase"] if change else None,
                               "plan": Plan.from_dict(change["plan"]).summary() if change else None,
                               "progress": services().view_change.progress.to_dict()})


@ops.route("/kvs/status", methods=["GET"])
def status() -> Response:
    return json_response(200, services().node.status(digest=request.args.get("digest") == "1"))


@ops.route("/health", methods=["GET"])
@ops.route("/readyz", methods=["GET"])
def health() -> Response:
    """Ready: the configuration is known and every hosted group has a leader (an idle node is not)."""
    ready, reason = services().node.health()
    if services().stopping.is_set():
        ready, reason = False, "stopping: handing leadership over, then exiting"
    return json_response(200 if ready else 503, {"status": "ok" if ready else "unavailable", "reason": reason})


@ops.route("/openapi.json", methods=["GET"])
def openapi() -> Response:
    """The OpenAPI 3.1 description of the public API (kvs.http.openapi)."""
    return json_response(200, SPEC)


@ops.route("/metrics", methods=["GET"])
def metrics() -> Response:
    """Prometheus' text format (kvs.metrics, kvs.node.metrics)."""
    return Response(exposition(), status=200, mimetype=None, content_type=CONTENT_TYPE)


@ops.route("/livez", methods=["GET"])
def livez() -> Response:
    """Live: the node serves and adopts configurations; not live means restart it."""
    live, reason = services().node.liveness()
    return json_response(200 if live else 503, {"status": "ok" if live else "unavailable", "reason": reason})


# -- errors of Flask routes -------------------------------------------------------------------------------

def _flask_error(exc: Exception) -> Response:
    if isinstance(exc, RequestEntityTooLarge):
        exc = PayloadTooLarge(f"Request body larger than {services().node.settings.max_body_bytes} bytes")
    reply = error_reply(exc, request.method, request.path)
    allowed = getattr(exc, "valid_methods", None)           # a 405 names what the route takes (RFC 9110)
    return json_response(reply.status, reply.body, {"Allow": ", ".join(allowed)} if allowed else None)
