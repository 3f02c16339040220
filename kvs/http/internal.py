"""The internal API: the server side of `kvs.reconfig.protocol` (a Flask blueprint).

Every request must carry a valid signature of the cluster secret (see
`kvs.routing.peers`); without a secret only the X-Kvs-Forwarded marker is
asked for (the cluster is unauthenticated anyway, and says so at start).
Bodies are checked into the protocol's typed records before anything runs;
a malformed one is a 400. A group command that its state machine refuses
(`Invalid`) is a 409 (`StepRefused`), never a success.

Exports answer one page each (`read_page`): the rows after the request's
cursor, up to its budget in encoded bytes, capped by this node's page size
(KVS_EXPORT_PAGE_BYTES, default 1 MiB, read once at start), so a reply never
grows with the shard.
"""

from __future__ import annotations

import json
import os
import time
from json.encoder import encode_basestring_ascii

from flask import Blueprint, Response, request

from kvs.errors import BadRequest, NotFound, Unauthorized
from kvs.fsm.base import Invalid
from kvs.fsm.commands import command_from_json, dedup_to_json
from kvs.http.common import json_response, parse_body, services
from kvs.reconfig.protocol import Epochs, Exported, ExportRequest, KnownEpochs, MetadataMembership
from kvs.reconfig.remote import STEP_SECONDS, StepRefused
from kvs.routing import peers

FRESH_READ_SECONDS = 2.0     # GET /internal/epochs?fresh=1: a ReadIndex round of the metadata group

internal = Blueprint("internal", __name__, url_prefix="/internal")


def _page_bytes(environ=os.environ) -> int:
    """KVS_EXPORT_PAGE_BYTES: the most an export page carries, in encoded bytes of its rows (a page still
    carries one row larger than that: a value may be 1 MiB)."""
    raw = environ.get("KVS_EXPORT_PAGE_BYTES", "").strip()
    if not raw:
        return 1 << 20
    if not raw.isdigit() or not 0 < int(raw) <= 1 << 30:
        raise ValueError(f"KVS_EXPORT_PAGE_BYTES must be a number of bytes from 1 to 2**30, not {raw!r}")
    return int(raw)


PAGE_BYTES = _page_bytes()


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
    return json_response(200, _group(shard_id).read(lambda state: read_page(state, r), _deadline()).to_json())


@internal.route("/groups/<shard_id>/changes", methods=["POST"])
def export_changes(shard_id: str) -> Response:
    r = _checked(ExportRequest.from_json, True)
    return json_response(200, _group(shard_id).read(lambda state: read_page(state, r), _deadline()).to_json())


def read_page(state, r: ExportRequest, page_bytes: int | None = None) -> Exported:
    """One page of an export, read from a shard's state after a read index: the rows after `r.after`
    (`ShardState.export_page_rows`) until the next one would take the encoded rows past the budget
    (the request's, at most `page_bytes`); at least one row. The scans of the shard's keys run in
    slices, each ending by yielding the GIL: pure Python over every key takes tens of milliseconds, and
    would otherwise make the request threads serving other keys wait a switch interval for each step
    of their work."""
    budget = min(r.budget or PAGE_BYTES, page_bytes or PAGE_BYTES)
    number, revision, rows = state.export_page_rows(r.source, r.old_ring, r.new_ring, r.destination, r.since,
                                                     r.after)
    page: dict[str, list] = {"item": [], "deleted": [], "dedup": []}
    used, cursor, more = 0, None, False
    for row in rows:
        if row is None:
            time.sleep(0)
            continue
        kind, value, position = row
        size = _encoded_size(kind, value)
        if cursor is not None and used + size > budget:
            more = True
            break
        page[kind].append(value)
        used += size
        cursor = position
    return Exported(page["item"], page["deleted"], page["dedup"], number, revision, more, cursor)


def _encoded_size(kind: str, value) -> int:
    """The bytes a row takes in the page's JSON (`Exported.to_json`, compact), with its comma."""
    if kind == "item":                      # [key, value, version]
        return 5 + _data_size(value[0]) + _data_size(value[1]) + len(str(value[2]))
    if kind == "deleted":
        return 1 + _data_size(value)
    encoded = dedup_to_json([value])        # nothing for a result type the wire does not carry
    return 1 + len(json.dumps(encoded[0], separators=(",", ":"))) if encoded else 0


def _data_size(x: str | bytes) -> int:
    """len(json.dumps(data_to_json(x))), without encoding bytes into base64 to count them."""
    return len(encode_basestring_ascii(x)) if isinstance(x, str) else 10 + 4 * ((len(x) + 2) // 3)
