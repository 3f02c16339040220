"""The internal API: the server side of `kvs.reconfig.protocol` (a Flask blueprint).

Every request must carry a valid signature of the cluster secret (see
`kvs.routing.peers`); without a secret only the X-Kvs-Forwarded marker is
asked for (the cluster is unauthenticated anyway, and says so at start).
Bodies are checked into the protocol's typed records before anything runs;
a malformed one is a 400. A group command that its state machine refuses
(`Invalid`) is a 409 (`StepRefused`), never a success.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, request

from kvs.errors import BadRequest, NotFound, Unauthorized
from kvs.fsm.base import Invalid
from kvs.fsm.commands import command_from_json
from kvs.http.common import json_response, parse_body, services
from kvs.reconfig.protocol import Epochs, Exported, ExportRequest, KnownEpochs, MetadataMembership
from kvs.reconfig.remote import STEP_SECONDS, StepRefused
from kvs.routing import peers

FRESH_READ_SECONDS = 2.0     # GET /internal/epochs?fresh=1: a ReadIndex round of the metadata group

internal = Blueprint("internal", __name__, url_prefix="/internal")

_SLICE_ROWS = 2000


@internal.before_request
def _authenticate() -> None:
    if not services().peer_auth.is_forwarded(request.headers, request.method, request.path,
                                             request.query_string.decode("latin-1"), request.get_data(cache=True),
                                             request.remote_addr):
        raise Unauthorized("internal endpoints are for nodes only")


def _checked(parse, *args):
    """`parse(body, *args)`, its ValueError (and any shape error) a 400."""
    try:
        return parse(parse_body(request.get_data(cache=True)), *args)
    except (ValueError, TypeError, KeyError) as exc:
        raise BadRequest(f"malformed {request.path}: {exc}") from None


def _group(shard_id: str):
    group = services().node.group(shard_id)
    if group is None:
        raise NotFound(f"this node runs no replica of shard {shard_id}")
    return group


def _deadline() -> float:
    return peers.deadline_from(request.headers, STEP_SECONDS)


@internal.route("/status", methods=["GET"])
def node_status() -> Response:
    return json_response(200, services().node.status())


@internal.route("/epochs", methods=["POST"])
def learn_epochs() -> Response:
    epochs = _checked(Epochs.from_json)
    services().node.learn(epochs.active, epochs.pending, epochs.revision)
    return json_response(200, {"epoch": epochs.active["number"]})


@internal.route("/epochs", methods=["GET"])
def known_epochs() -> Response:
    """The active epoch and any pending one, as this node's metadata replica knows them (with the
    revision of that knowledge); a node outside the metadata group says what it was told."""
    node = services().node
    decisions = node.decisions()
    meta = node.metadata_group
    if meta is not None and request.args.get("fresh") == "1":
        # linearizable: what the metadata group has decided by now, not what this replica has applied
        decisions = meta.read(lambda state: state.decisions(), time.monotonic() + FRESH_READ_SECONDS)
    if decisions is not None:
        revision, active, pending = decisions
        known = KnownEpochs(active, pending, True, node.shard_id_floor(), revision)
    else:
        epoch = node.epoch
        known = KnownEpochs(epoch.to_dict() if epoch is not None else None, node.pushed_pending, False, 0,
                            node.pushed_revision)
    return json_response(200, known.to_json())


@internal.route("/metadata", methods=["POST"])
def metadata_membership() -> Response:
    message = _checked(MetadataMembership.from_json)
    services().node.set_metadata_membership(message.member, message.peers)
    return json_response(200, {"member": message.member})


@internal.route("/groups/<shard_id>/commands", methods=["POST"])
def group_command(shard_id: str) -> Response:
    command = _checked(lambda body: command_from_json(body.get("command")))
    result = _group(shard_id).execute(command.as_entry(), _deadline())
    if isinstance(result, Invalid):
        raise StepRefused(f"{command.op}: {result.reason}")
    return json_response(200, {"result": result})


@internal.route("/groups/<shard_id>/export", methods=["POST"])
def export(shard_id: str) -> Response:
    r = _checked(ExportRequest.from_json, False)
    (number, items, versions, dedup, moving), revision = _group(shard_id).read(
        lambda state: (state.export_rows(r.source, r.old_ring, r.new_ring, r.destination), state.revision),
        _deadline())
    items = [(key, value, versions.get(key, 0)) for key, value in _sliced_filter(items, lambda row: moving(row[0]))]
    dedup = _sliced_filter(dedup, lambda row: moving(row[1][1]))
    return json_response(200, Exported(items, [], dedup, number, revision).to_json())


@internal.route("/groups/<shard_id>/changes", methods=["POST"])
def export_changes(shard_id: str) -> Response:
    r = _checked(ExportRequest.from_json, True)
    (items, deleted, dedup, number), revision = _group(shard_id).read(
        lambda state: (state.export_changes(r.source, r.old_ring, r.new_ring, r.destination, r.since),
                       state.revision), _deadline())
    return json_response(200, Exported(items, deleted, dedup, number, revision).to_json())


def _sliced_filter(rows: list, keep) -> list:
    """The rows `keep` accepts, filtered in slices that each end by yielding the GIL: a scan of every
    key of a shard takes tens of milliseconds of pure Python, and would otherwise make the request
    threads serving other keys wait a switch interval for each step of their work."""
    kept: list = []
    for start in range(0, len(rows), _SLICE_ROWS):
        kept.extend(row for row in rows[start:start + _SLICE_ROWS] if keep(row))
        time.sleep(0)
    return kept
