"""Node-to-node endpoints that drive a view change (a Flask blueprint).

Every request must carry a valid signature of the cluster secret (see
`kvs.forwarding`); without a secret the cluster is unauthenticated anyway.

    POST /internal/epochs                 {"active": epoch, "pending": epoch|null}: learn epochs
    GET  /internal/epochs                 the epochs this node's metadata replica knows
    POST /internal/metadata               {"member": bool, "peers": [raft addresses]}: join or leave the
                                          metadata group (sent by its leader, kvs.membership)
    POST /internal/groups/<id>/commands   {"command": [...]}: a view-change command through the group's log
    POST /internal/groups/<id>/export     {"source", "old_ring", "new_ring", "destination"}: the moving keys,
                                          read after a barrier, with their slice of the deduplication table
                                          and the change number they were read at
    POST /internal/groups/<id>/changes    the same and {"since": n}: only the moving keys written (or
                                          deleted) after change number n, read after a barrier
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, request

from . import forwarding
from .errors import BadRequest, NotFound, Unauthorized
from .raft.shard_state import dedup_from_json, dedup_to_json

internal = Blueprint("internal", __name__, url_prefix="/internal")

_SLICE_ROWS = 2000

ADMIN_COMMANDS = {"track", "freeze", "thaw", "install", "own", "drop", "drop-keys"}


@internal.before_request
def _authenticate() -> None:
    node = current_app.extensions["kvs"][0]
    secret = node.settings.secret
    if secret:
        forwarding.verify(secret, request.headers.get(forwarding.SIGNATURE), request.method, request.path,
                          request.headers.get(forwarding.REQUEST_ID, ""), request.get_data(cache=True))
    elif request.headers.get(forwarding.FORWARDED) != "1":
        raise Unauthorized("internal endpoints are for nodes only")


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("a JSON object is required")
    return body


def _group(shard_id: str):
    group = current_app.extensions["kvs"][0].group(shard_id)
    if group is None:
        raise NotFound(f"this node runs no replica of shard {shard_id}")
    return group


def _deadline() -> float:
    given = request.headers.get(forwarding.DEADLINE, "")
    return time.monotonic() + (int(given) / 1000.0 if given.isdigit() else 30.0)


def _json(body: dict) -> Response:
    return current_app.response_class(current_app.json.dumps(body), mimetype="application/json")


@internal.route("/epochs", methods=["POST"])
def learn_epochs() -> Response:
    body = _body()
    node = current_app.extensions["kvs"][0]
    node.learn(body["active"], body.get("pending"))
    return _json({"epoch": body["active"]["number"]})


@internal.route("/metadata", methods=["POST"])
def metadata_membership() -> Response:
    body = _body()
    peers = body.get("peers")
    if not isinstance(body.get("member"), bool) or not isinstance(peers, list) \
            or not all(isinstance(p, str) for p in peers):
        raise BadRequest("member (bool) and peers (list of Raft addresses) are required")
    current_app.extensions["kvs"][0].set_metadata_membership(body["member"], peers)
    return _json({"member": body["member"]})


@internal.route("/epochs", methods=["GET"])
def known_epochs() -> Response:
    """The active epoch and any pending one, as this node's metadata replica knows them."""
    node = current_app.extensions["kvs"][0]
    epoch, change = node.epoch, node.change()
    pending = change["plan"]["epoch"] if change is not None and change["phase"] != "committed" else None
    return _json({"active": epoch.to_dict() if epoch is not None else None, "pending": pending,
                  "metadata-member": node.has_metadata_replica, "max-shard-id": node.shard_id_floor()})


@internal.route("/groups/<shard_id>/commands", methods=["POST"])
def group_command(shard_id: str) -> Response:
    command = _body().get("command")
    if not isinstance(command, list) or not command or command[0] not in ADMIN_COMMANDS:
        raise BadRequest(f"not a view-change command: {command!r}")
    if command[0] == "install":
        command[6] = dedup_from_json(command[6])
    result = _group(shard_id).execute(tuple(command), _deadline())
    return _json({"result": result if isinstance(result, (bool, int)) else repr(result)})


@internal.route("/groups/<shard_id>/export", methods=["POST"])
def export(shard_id: str) -> Response:
    b = _body()
    number, items, dedup, moving = _group(shard_id).read(
        lambda state: state.export_rows(b["source"], b["old_ring"], b["new_ring"], b["destination"]), _deadline())
    items = _sliced_filter(items, lambda row: moving(row[0]))
    dedup = _sliced_filter(dedup, lambda row: moving(row[1][1]))
    return _json({"items": items, "deleted": [], "dedup": dedup_to_json(dedup), "number": number})


def _sliced_filter(rows: list, keep) -> list:
    """The rows `keep` accepts, filtered in slices that each end by yielding the GIL: a scan of every
    key of a shard takes tens of milliseconds of pure Python, and would otherwise make the request
    threads serving other keys wait a switch interval for each step of their work."""
    kept: list = []
    for start in range(0, len(rows), _SLICE_ROWS):
        kept.extend(row for row in rows[start:start + _SLICE_ROWS] if keep(row))
        time.sleep(0)
    return kept


@internal.route("/groups/<shard_id>/changes", methods=["POST"])
def export_changes(shard_id: str) -> Response:
    b = _body()
    if not isinstance(b.get("since"), int):
        raise BadRequest("since must be an integer")
    items, deleted, dedup, number = _group(shard_id).read(
        lambda state: state.export_changes(b["source"], b["old_ring"], b["new_ring"], b["destination"],
                                           b["since"]), _deadline())
    return _json({"items": items, "deleted": deleted, "dedup": dedup_to_json(dedup), "number": number})
