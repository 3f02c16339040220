"""Router: key -> shard group (by the newest epoch this node knows) -> a node that serves it.

If this node is a replica of the key's shard, the request runs on its own
replica (a follower hands the command to its leader inside Raft). Otherwise
the request is forwarded to the shard's replicas, the last known leader first,
until one answers or the 5 s deadline passes; the reply then names the replica
that served it in "address". Every retry and hop carries the same request id,
so a write is applied at most once however often it is retried.

Fencing: a group refuses a key it does not own (or that is moving away during
a view change) with NotOwned(epoch). A forwarded request is never forwarded
again: its receiver answers 421 naming that epoch. The node that took the
client's request then waits until it knows that epoch and routes again, until
the deadline.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import quote

from kvs.errors import BadRequest, NotFound, NotMember, Unavailable, WrongGroup
from kvs.fsm.base import Invalid
from kvs.fsm.shard import NotOwned, ShardState
from kvs.node import Node
from kvs.routing import replies
from kvs.routing.peers import LEADER_HINT, Forwarder, PeerUnreachable, TryNext, until_one_answers
from kvs.routing.replies import Reply

_FORWARD_MARGIN = 0.25     # seconds kept back so a remote 503 can still be relayed in time
_ATTEMPT_SECONDS = 2.0     # one replica may take this long before the next is tried (a paused peer)
_ROUND_PAUSE = 0.05        # pause after every replica of a shard failed once
_EPOCH_WAIT = 0.2          # wait this long for a newer epoch before routing a refused key again


class Router:
    def __init__(self, node: Node, forwarder: Forwarder):
        self._node = node
        self._forwarder = forwarder
        self._hint_lock = threading.Lock()
        self._leader_hints: dict[str, str] = {}     # shard id -> HTTP address that answered last

    # -- data requests ------------------------------------------------------------------

    def key_request(self, method: str, key: str, value: str | None, request_id: str, deadline: float,
                    forwarded: bool) -> Reply:
        while True:
            try:
                return self._route(method, key, value, request_id, deadline, forwarded)
            except WrongGroup as exc:
                if forwarded:
                    raise
                known = self._node.epoch.number if self._node.epoch is not None else 0
                wanted = exc.epoch if exc.epoch > known else known + 1
                self._node.wait_for_epoch(wanted, min(deadline, time.monotonic() + _EPOCH_WAIT))
                if time.monotonic() >= deadline:
                    raise Unavailable(f"key {key!r} is moving and epoch {wanted} did not arrive in time")

    def _route(self, method: str, key: str, value: str | None, request_id: str, deadline: float,
               forwarded: bool) -> Reply:
        epoch = self._node.epoch
        if epoch is None:
            raise NotMember("this node does not know the cluster configuration")
        shard_id = epoch.shard_for_key(key)
        group = self._node.group(shard_id)
        if group is not None:
            reply = self._execute_locally(group, method, key, value, request_id, deadline)
            if forwarded:
                leader = self._node.leader_address(shard_id)
                if leader:
                    reply.headers[LEADER_HINT] = leader
            return reply
        if forwarded:
            raise WrongGroup(f"shard {shard_id} is not served by this node", epoch.number)
        payload = None if value is None else {"value": value}
        return self._forward(shard_id, list(epoch.replicas(shard_id)), method,
                             f"/kvs/keys/{quote(key, safe='')}", payload, request_id, deadline)

    def _execute_locally(self, group, method: str, key: str, value: str | None, request_id: str,
                         deadline: float) -> Reply:
        if method == "GET":
            return replies.get_reply(_checked(group.read(lambda state: state.read(key), deadline)))
        if method == "PUT":
            return replies.put_reply(_checked(group.execute(("put", request_id, key, value), deadline)))
        if method == "DELETE":
            return replies.delete_reply(_checked(group.execute(("delete", request_id, key), deadline)))
        raise BadRequest(f"method {method} is not supported")

    def _forward(self, shard_id: str, replicas: list[str], method: str, path: str, payload: dict | None,
                 request_id: str, deadline: float) -> Reply:
        with self._hint_lock:
            hint = self._leader_hints.get(shard_id)
        if hint in replicas:
            replicas.remove(hint)
            replicas.insert(0, hint)
        unavailable: list[Reply] = []

        def attempt(address: str, attempt_deadline: float) -> Reply:
            try:
                resp = self._forwarder.send(address, method, path, payload, request_id, attempt_deadline)
            except PeerUnreachable:
                with self._hint_lock:
                    if self._leader_hints.get(shard_id) == address:
                        del self._leader_hints[shard_id]
                raise
            if resp.leader_hint in replicas:
                with self._hint_lock:
                    self._leader_hints[shard_id] = resp.leader_hint
            if resp.status == 421:
                raise WrongGroup(f"{address} does not serve shard {shard_id}", _epoch_of(resp.body))
            if resp.status == 503:
                unavailable.append(Reply(resp.status, resp.body))
                raise TryNext("503")
            resp.body["address"] = address
            return Reply(resp.status, resp.body)

        try:
            return until_one_answers(replicas, attempt, deadline - _FORWARD_MARGIN, what=f"shard {shard_id}",
                                     attempt_seconds=_ATTEMPT_SECONDS, pause=_ROUND_PAUSE)
        except Unavailable:
            if unavailable:
                return unavailable[-1]      # the replicas' own 503, with its body
            raise Unavailable(f"no replica of shard {shard_id} answered in time") from None

    # -- shard administration ---------------------------------------------------------------

    def key_count(self, deadline: float) -> tuple[str, int]:
        shard_id = self._node.own_shard()
        group = self._node.group(shard_id) if shard_id is not None else None
        if group is None:
            raise NotMember("this node is not a replica of any shard")
        return shard_id, group.read(ShardState.key_count, deadline)

    def shard_ids(self) -> list[str]:
        epoch = self._node.epoch
        if epoch is None:
            raise NotMember("this node does not know the cluster configuration")
        return epoch.shard_ids()

    def shard_info(self, shard_id: str, request_id: str, deadline: float, forwarded: bool) -> Reply:
        epoch = self._node.epoch
        if epoch is None:
            raise NotMember("this node does not know the cluster configuration")
        if shard_id not in epoch.shards:
            raise NotFound(f"shard {shard_id} does not exist")
        group = self._node.group(shard_id)
        if group is not None:
            count = group.read(ShardState.key_count, deadline)
            return Reply(200, {"message": "Shard information retrieved successfully", "shard-id": shard_id,
                               "key-count": count, "replicas": list(epoch.replicas(shard_id))})
        if forwarded:
            raise WrongGroup(f"shard {shard_id} is not served by this node", epoch.number)
        reply = self._forward(shard_id, list(epoch.replicas(shard_id)), "GET", f"/kvs/shards/{quote(shard_id)}",
                              None, request_id, deadline)
        reply.body.pop("address", None)
        return reply



def _epoch_of(body: dict) -> int:
    epoch = body.get("epoch")
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0


def _checked(result: object) -> object:
    """The state machine's result, or the kvs error it stands for."""
    if isinstance(result, NotOwned):
        raise WrongGroup("this group does not serve the key at its epoch", result.epoch)
    if isinstance(result, Invalid):
        raise BadRequest(result.reason)
    return result
