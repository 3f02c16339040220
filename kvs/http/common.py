"""What every HTTP route shares: the services it is built around, body parsing, deadlines,
authentication of node-to-node requests, and the one mapping from an exception to a reply.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from flask import Response, current_app
from werkzeug.exceptions import HTTPException

from kvs.errors import BadRequest, KvsError, NotMember, Unauthorized, Unavailable, WrongGroup
from kvs.node import Node
from kvs.reconfig.coordinator import ViewChange
from kvs.routing import peers
from kvs.routing.nonces import NonceCache
from kvs.routing.replies import Reply
from kvs.routing.shards import ShardQueries
from kvs.settings import NodeSettings

log = logging.getLogger(__name__)


class PeerAuth:
    """Tells a node-to-node request from a client's, and refuses one that only pretends.

    One per node, built by `kvs.server` and shared by the key path (on the event loop) and the Flask
    apps (on worker threads): with a secret it owns the node's memory of accepted nonces
    (`kvs.routing.nonces`), which must be one for a replay to be refused whichever path it takes."""

    def __init__(self, secret: str | None, address: str, trusted: Callable[[str], bool] | None = None):
        self._secret = secret
        self._address = address             # this node's, as the view names it: what signatures are made for
        self._trusted = trusted
        self.nonces = NonceCache(peers.SIGNATURE_WINDOW, since=int(time.time())) if secret else None

    def is_forwarded(self, headers: Mapping[str, str], method: str, path: str, query: str, raw: bytes,
                     sender: str | None = None) -> bool:
        """True for an authenticated node-to-node request; Unauthorized if it claims to be one and is not.
        `path` is percent-decoded, `query` as received (without the "?").

        With a secret, the signature decides (`kvs.routing.peers.verify`). Without one, the cluster is
        unauthenticated (and says so at start), but a node still answers node-to-node requests only
        from the hosts of its view (`trusted(sender host)`), so that a header alone opens nothing from
        elsewhere."""
        if headers.get(peers.FORWARDED) != "1":
            return False
        if self.nonces is not None:
            peers.verify(self._secret, headers, method, path, query, raw, self.nonces, receiver=self._address)
        elif self._trusted is not None and (sender is None or not self._trusted(sender)):
            raise Unauthorized("node-to-node requests of an unsecured cluster come only from its nodes' hosts")
        return True

    def may_be_peer(self, headers: Mapping[str, str], peer: tuple | None) -> bool:
        """Before its body is read: whether a request may be a node's (so may carry a node-to-node
        transfer's large body). With a secret: marked forwarded, with a well-formed signature of the
        window (it is verified, body included, once read); without: marked, from a host of the view."""
        if headers.get(peers.FORWARDED) != "1":
            return False
        if self.nonces is not None:
            return peers.plausible_signature(headers.get(peers.SIGNATURE))
        return self._trusted is None or (peer is not None and self._trusted(str(peer[0])))


@dataclass(frozen=True)
class Services:
    """What the HTTP layer calls: built once by `kvs.server`, kept in `app.extensions["kvs"]`."""
    node: Node
    shards: ShardQueries
    view_change: ViewChange
    peer_auth: PeerAuth
    # set when the node starts stopping (SIGTERM): /readyz then answers 503, so balancers send no more
    stopping: threading.Event = field(default_factory=threading.Event)


def services() -> Services:
    return current_app.extensions["kvs"]


def parse_body(raw: bytes) -> dict:
    """The JSON object in the body ({} when empty); BadRequest otherwise."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("Malformed JSON body") from None
    if not isinstance(body, dict):
        raise BadRequest("The JSON body must be an object")
    return body


def request_deadline(settings: NodeSettings, headers: Mapping[str, str]) -> float:
    """The deadline of a client or forwarded request: the request timeout, or less if the sender has less."""
    return peers.deadline_from(headers, settings.request_timeout)


def error_reply(exc: Exception, method: str, path: str, causal_context: dict | None = None) -> Reply:
    """The one mapping from an exception to a status and a JSON body."""
    if isinstance(exc, KvsError):
        status, error = exc.status, exc.message
        if isinstance(exc, Unavailable) and not isinstance(exc, NotMember):
            error = "Unable to satisfy request"     # the API's wording; the cause goes to the log
            log.info("%s %s: %s", method, path, exc.message)
    elif isinstance(exc, HTTPException):
        status, error = exc.code or 500, exc.description or exc.name
    else:
        log.error("unexpected error serving %s %s", method, path, exc_info=exc)
        status, error = 500, "Internal error"
    body: dict[str, Any] = {"error": error, "message": f"Error in {method}"}
    if causal_context is None and isinstance(exc, Unavailable) and error != exc.message:
        # Beyond the key requests (whose bodies are fixed, exactly), say what an operator can act on.
        body["cause"] = exc.message
    if isinstance(exc, WrongGroup):
        body["epoch"] = exc.epoch           # only forwarded requests see 421: the sender routes again
    if causal_context is not None:
        body["causal-context"] = causal_context
    return Reply(status, body)


def json_response(status: int, body: dict, headers: dict | None = None) -> Response:
    resp = Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp
