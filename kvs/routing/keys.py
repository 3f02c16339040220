"""KeyRouter: the key requests on the event loop, key -> shard -> the replica that serves it.

* This node is a replica of the key's shard:
  - a read runs here, after a ReadIndex round (`kvs.raft.read_index`): the
    leader confirms it still leads; a follower asks the leader for the index
    and reads its own state once it has applied it. Every replica serves reads.
  - a write is proposed here if this replica leads (batched with the writes
    around it, `kvs.raft.loop`). A follower has its leader propose it, with
    the other writes of the same loop iteration, in one message on the Raft
    connection (`kvs.raft.forwarding`); if the leader does not take it, the
    follower proposes it itself (PySyncObj then hands it to whoever leads).
    The client sees the same reply either way.
* Otherwise the request is forwarded to the shard's replicas, the last known
  leader first, until one answers or the deadline passes; the reply then
  names the replica that served it in "address". So is a request for a shard
  whose replica on this node is down (`kvs.raft.recovery`), to its others.

Every retry and hop carries the same request id, so a write is applied at most
once however often it is retried. Fencing: a group refuses a key it does not
own (or that is moving away) with NotOwned(epoch); a forwarded request is never
forwarded again to another shard (its receiver answers 421 naming that
epoch), and the node that took the client's request waits until it knows that
epoch and routes again, until the deadline.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

from kvs.errors import BadRequest, NotMember, ReplicaHalted, Unavailable, WrongGroup
from kvs.fsm.base import Invalid
from kvs.fsm.shard import Mismatch, NotOwned
from kvs.metrics import FORWARD_FALLBACKS, FORWARDED, REROUTED, TO_LEADER
from kvs.node import Node
from kvs.raft.group import RaftGroup
from kvs.raft.loop import LoopGroup
from kvs.routing import replies
from kvs.routing.aio_peers import AsyncForwarder, until_one_answers
from kvs.routing.peers import LEADER_HINT, PeerUnreachable, TryNext
from kvs.routing.replies import Reply

FORWARD_MARGIN = 0.25     # seconds kept back so a remote 503 can still be relayed in time
ATTEMPT_SECONDS = 2.0     # one replica may take this long before the next is tried (a paused peer)
ROUND_PAUSE = 0.05        # pause after every replica of a shard failed once
EPOCH_WAIT = 0.2          # wait this long for a newer epoch before routing a refused key again
EPOCH_POLL = 0.01


class KeyRouter:
    def __init__(self, node: Node, forwarder: AsyncForwarder, loop: asyncio.AbstractEventLoop):
        self._node = node
        self._forwarder = forwarder
        self._loop = loop
        self._groups: dict[int, LoopGroup] = {}      # id(RaftGroup) -> its LoopGroup
        self._leader_hints: dict[str, str] = {}      # shard id -> HTTP address that answered last

    async def key_request(self, method: str, key: str, value: str | None, request_id: str, deadline: float,
                          forwarded: bool, condition: tuple | None = None) -> Reply:
        """A key request; `condition` makes a PUT or DELETE a compare-and-set (`kvs.fsm.shard`)."""
        while True:
            try:
                return await self._route(method, key, value, request_id, deadline, forwarded, condition)
            except ReplicaHalted:
                if forwarded or time.monotonic() >= deadline:
                    raise           # 503: the sender tries the next replica
                continue            # this node's replica halted under the request: route again, to the others
            except WrongGroup as exc:
                if forwarded:
                    raise
                known = self._node.epoch.number if self._node.epoch is not None else 0
                wanted = exc.epoch if exc.epoch > known else known + 1
                REROUTED.inc()
                await self._epoch(wanted, min(deadline, time.monotonic() + EPOCH_WAIT))
                if time.monotonic() >= deadline:
                    raise Unavailable(f"key {key!r} is moving and epoch {wanted} did not arrive in time")

    @property
    def node(self) -> Node:
        return self._node

    def local_replica(self, shard_id: str) -> LoopGroup | None:
        """This node's replica of the shard, if it can serve (not failed, not being taken out)."""
        group = self._node.group(shard_id)
        if group is None or group.failure is not None or self._node.leaving(shard_id):
            return None
        return self._loop_group(group)

    async def forward(self, shard_id: str, method: str, path: str, payload: dict | None, request_id: str,
                      deadline: float) -> Reply:
        """Send a request to the shard's other replicas (last known leader first) until one answers:
        its reply (a 421 as WrongGroup)."""
        epoch = self._node.epoch
        if epoch is None:
            raise NotMember("this node does not know the cluster configuration")
        if shard_id not in epoch.shards:            # the epoch changed since the caller grouped its keys
            raise WrongGroup(f"shard {shard_id} is not in epoch {epoch.number}", epoch.number + 1)
        others = [a for a in epoch.replicas(shard_id) if a != self._node.settings.address]
        return await self._forward(shard_id, others, method, path, payload, request_id, deadline)

    async def wait_for_epoch(self, number: int, until: float) -> None:
        await self._epoch(number, until)

    async def _epoch(self, number: int, until: float) -> None:
        """Until this node knows epoch `number` (polled: epochs change a few times a day)."""
        while time.monotonic() < until:
            epoch = self._node.epoch
            if epoch is not None and epoch.number >= number:
                return
            await asyncio.sleep(EPOCH_POLL)

    async def _route(self, method: str, key: str, value: str | None, request_id: str, deadline: float,
                     forwarded: bool, condition: tuple | None) -> Reply:
        epoch = self._node.epoch
        if epoch is None:
            raise NotMember("this node does not know the cluster configuration")
        shard_id = epoch.shard_for_key(key)
        group = self._node.group(shard_id)
        # A replica that the change in progress takes out of its group may be removed at any moment
        # (then it can neither read nor write): the group's other replicas serve instead.
        if group is not None and group.failure is None and not self._node.leaving(shard_id):
            reply = await self._serve(group, method, key, value, request_id, deadline, condition)
            # the shard's leader as this replica knows it: forwarding nodes and cluster-aware clients
            # (kvs.client.Client) send the next request of this shard straight there
            leader = self._node.leader_address(shard_id)
            if leader:
                reply.headers[LEADER_HINT] = leader
            return reply
        # This node runs no replica of the shard, or its replica is down (its journal failed: a full disk,
        # kvs.raft.recovery) or leaving: the other replicas serve the request; a forwarded one gets 503, so that its
        # sender tries the next replica, rather than 421 (this node does belong to the shard).
        others = [address for address in epoch.replicas(shard_id) if address != self._node.settings.address]
        if forwarded and len(others) < len(epoch.replicas(shard_id)):
            raise Unavailable(f"this node's replica of shard {shard_id} is not running")
        if forwarded:
            raise WrongGroup(f"shard {shard_id} is not served by this node", epoch.number)
        path = f"/kvs/keys/{quote(key, safe='')}"
        payload = None if value is None else {"value": value}
        if condition is not None:           # in the signed body: a hop carries it as the client's headers did
            payload = dict(payload or {}, condition=list(condition))
        return await self._forward(shard_id, others, method, path, payload, request_id, deadline)

    async def _serve(self, group: RaftGroup, method: str, key: str, value: str | None, request_id: str,
                     deadline: float, condition: tuple | None) -> Reply:
        replica = self._loop_group(group)
        if method == "GET":
            return replies.get_reply(_checked(await replica.read(lambda state: state.read_versioned(key), deadline)))
        if method not in ("PUT", "DELETE"):
            raise BadRequest(f"method {method} is not supported")
        # The condition slot is always there (None: unconditional): it also says "give a version" (kvs.fsm.shard).
        command = ("put", request_id, key, value, condition) if method == "PUT" else \
            ("delete", request_id, key, condition)
        # A follower has its leader propose the write (kvs.raft.forwarding); if the leader does not take it,
        # or this replica leads, it proposes the write itself.
        result = None
        if not group.is_leader():
            TO_LEADER.inc()
            result = await replica.forward(command, deadline - FORWARD_MARGIN)
            if result is None:
                FORWARD_FALLBACKS.inc()
        if result is None:
            result = await replica.execute(command, deadline)
        result = _checked(result)
        if isinstance(result, Mismatch):
            return replies.mismatch_reply(result, method)
        return replies.put_reply(result) if method == "PUT" else replies.delete_reply(result)

    async def _forward(self, shard_id: str, replicas: list[str], method: str, path: str, payload: dict | None,
                       request_id: str, deadline: float) -> Reply:
        FORWARDED.inc()
        hint = self._leader_hints.get(shard_id)
        if hint in replicas:
            replicas.remove(hint)
            replicas.insert(0, hint)
        unavailable: list[Reply] = []

        async def attempt(address: str, attempt_deadline: float) -> Reply:
            try:
                resp = await self._forwarder.send(address, method, path, payload, request_id, attempt_deadline)
            except PeerUnreachable:
                if self._leader_hints.get(shard_id) == address:
                    del self._leader_hints[shard_id]
                raise
            if resp.leader_hint in replicas:
                self._leader_hints[shard_id] = resp.leader_hint
            if resp.status == 421:
                raise WrongGroup(f"{address} does not serve shard {shard_id}", _epoch_of(resp.body))
            if resp.status == 503:
                unavailable.append(Reply(resp.status, resp.body))
                raise TryNext("503")
            resp.body["address"] = address
            return Reply(resp.status, resp.body)

        try:
            return await until_one_answers(replicas, attempt, deadline - FORWARD_MARGIN, what=f"shard {shard_id}",
                                           attempt_seconds=ATTEMPT_SECONDS, pause=ROUND_PAUSE)
        except Unavailable:
            if unavailable:
                return unavailable[-1]      # the replicas' own 503, with its body
            raise Unavailable(f"no replica of shard {shard_id} answered in time") from None

    def _loop_group(self, group: RaftGroup) -> LoopGroup:
        replica = self._groups.get(id(group))
        if replica is None or replica.group is not group:
            replica = self._groups[id(group)] = LoopGroup(group, self._loop)
            live = {id(g) for g in self._node.hosted_groups()}
            for stale in [k for k in self._groups if k not in live]:
                self._groups.pop(stale).close()
        return replica

    def close(self) -> None:
        for replica in self._groups.values():
            replica.close()
        self._groups.clear()


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
