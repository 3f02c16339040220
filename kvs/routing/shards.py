"""ShardQueries: the shard list, a shard's key count and replicas, served here or by a replica.

A node that runs a replica of the shard answers from it, after a ReadIndex
round (`kvs.raft.read_index`: a follower's answer is as current as the
leader's). Any other node asks the shard's replicas in turn until one answers
or the deadline passes; a replica that receives such a forwarded request and
no longer serves the shard answers 421 naming its epoch.
"""

from __future__ import annotations

from urllib.parse import quote

from kvs.errors import NotFound, NotMember, Unavailable, WrongGroup
from kvs.fsm.commands import items_to_json
from kvs.fsm.shard import ShardState
from kvs.node import Node
from kvs.routing.peers import Forwarder, TryNext, until_one_answers
from kvs.routing.replies import Reply

FORWARD_MARGIN = 0.25     # seconds kept back so a remote 503 can still be relayed in time


class ShardQueries:
    def __init__(self, node: Node, forwarder: Forwarder):
        self._node = node
        self._forwarder = forwarder

    def shard_ids(self) -> list[str]:
        return self._epoch().shard_ids()

    def key_count(self, deadline: float) -> tuple[str, int]:
        """(shard id, key count) of this node's own shard."""
        shard_id = self._node.own_shard()
        group = self._node.group(shard_id) if shard_id is not None else None
        if group is None and shard_id is not None:
            raise Unavailable(f"this node's replica of shard {shard_id} is not running (see /health)")
        if group is None:
            raise NotMember("this node is not a replica of any shard")
        return shard_id, group.read(ShardState.key_count, deadline)

    def shard_info(self, shard_id: str, request_id: str, deadline: float, forwarded: bool) -> Reply:
        def local(group, epoch) -> Reply:
            count = group.read(ShardState.key_count, deadline)
            return Reply(200, {"message": "Shard information retrieved successfully", "shard-id": shard_id,
                               "key-count": count, "replicas": list(epoch.replicas(shard_id))})
        return self._served(shard_id, "", local, request_id, deadline, forwarded)

    def backup(self, shard_id: str, request_id: str, deadline: float, forwarded: bool) -> Reply:
        """Every pair of the shard with its version, as of one moment after a read index (`kvs snapshot save`)."""
        def local(group, epoch) -> Reply:
            rows = group.read(lambda state: state.consistent_rows(), deadline)
            if rows is None:
                raise Unavailable(f"shard {shard_id} is written too fast for a consistent copy; try again")
            return Reply(200, {"shard-id": shard_id, "epoch": epoch.number, "items": items_to_json(rows)})
        return self._served(shard_id, "/backup", local, request_id, deadline, forwarded)

    def _served(self, shard_id: str, suffix: str, local, request_id: str, deadline: float, forwarded: bool) -> Reply:
        """`local(group, epoch)` on this node's replica of the shard, or GET /kvs/shards/<id><suffix> of
        a replica that has one."""
        epoch = self._epoch()
        if shard_id not in epoch.shards:
            raise NotFound(f"shard {shard_id} does not exist")
        group = self._node.group(shard_id)
        if group is not None:
            return local(group, epoch)
        others = [a for a in epoch.replicas(shard_id) if a != self._node.settings.address]
        if forwarded and len(others) < len(epoch.replicas(shard_id)):
            raise Unavailable(f"this node's replica of shard {shard_id} is not running")   # down: try the next
        if forwarded:
            raise WrongGroup(f"shard {shard_id} is not served by this node", epoch.number)
        path = f"/kvs/shards/{quote(shard_id, safe='')}{suffix}"

        def attempt(address: str, attempt_deadline: float) -> Reply:
            resp = self._forwarder.send(address, "GET", path, None, request_id, attempt_deadline)
            if resp.status not in (200, 404):
                raise TryNext(str(resp.status))
            return Reply(resp.status, resp.body)

        try:
            return until_one_answers(others, attempt, deadline - FORWARD_MARGIN, what=f"shard {shard_id}")
        except Unavailable:
            raise Unavailable(f"no replica of shard {shard_id} answered in time") from None

    def _epoch(self):
        epoch = self._node.epoch
        if epoch is None:
            raise NotMember("this node does not know the cluster configuration")
        return epoch
