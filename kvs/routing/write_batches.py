"""Followers' writes to their leader, in batches: one node-to-node request per loop iteration.

A follower that receives a write does not propose it through PySyncObj (whose
command hand-over costs the follower more than the write itself) and does not
send one HTTP request per write either: `LeaderChannel` collects the writes of
each shard that arrive during one iteration of the event loop and sends them
to the shard's leader in one signed request, `POST /internal/writes/<shard>`
(served on the leader's loop by `kvs.http.keys.WriteBatches`). The leader
proposes them together, so they also share one Raft entry, and answers with
one result per write. A write the leader could not take (unreachable, not
leading any more, the batch failed) comes back as None: the follower then
proposes it itself, as before.

On the wire a command is `[op, request id, key]` or `["put", request id, key,
value]`, and a result is `{"written": replaced}`, `{"deleted": existed}`,
`{"not-owned": epoch}`, `{"invalid": reason}` or `{"unavailable": reason}`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from urllib.parse import quote

from kvs.fsm.base import Invalid
from kvs.fsm.shard import Deleted, NotOwned, Written
from kvs.routing.aio_peers import AsyncForwarder
from kvs.routing.peers import PeerUnreachable

MAX_BATCH = 512
ROUTE = "/internal/writes/"


def route(shard_id: str) -> str:
    return ROUTE + quote(shard_id, safe="")


def command_to_json(command: tuple) -> list:
    return list(command)


def command_from_json(row: object) -> tuple:
    """A write command from its JSON form; ValueError if it is not one."""
    if (isinstance(row, list) and len(row) == 4 and row[0] == "put" and all(isinstance(x, str) for x in row)) or \
            (isinstance(row, list) and len(row) == 3 and row[0] == "delete" and all(isinstance(x, str) for x in row)):
        return tuple(row)
    raise ValueError("a write is [\"put\", request id, key, value] or [\"delete\", request id, key]")


def result_to_json(result: object) -> dict:
    if isinstance(result, Written):
        return {"written": result.replaced}
    if isinstance(result, Deleted):
        return {"deleted": result.existed}
    if isinstance(result, NotOwned):
        return {"not-owned": result.epoch}
    if isinstance(result, Invalid):
        return {"invalid": result.reason}
    return {"unavailable": str(result)}


def result_from_json(row: object) -> object | None:
    """The state machine's result from its JSON form; None for "unavailable" or anything else."""
    if not isinstance(row, dict) or len(row) != 1:
        return None
    (kind, value), = row.items()
    if kind == "written" and isinstance(value, bool):
        return Written(value)
    if kind == "deleted" and isinstance(value, bool):
        return Deleted(value)
    if kind == "not-owned" and isinstance(value, int):
        return NotOwned(value)
    if kind == "invalid" and isinstance(value, str):
        return Invalid(value)
    return None


class LeaderChannel:
    """Batches of one follower's writes to the leaders of its shards."""

    def __init__(self, forwarder: AsyncForwarder, loop: asyncio.AbstractEventLoop):
        self._forwarder = forwarder
        self._loop = loop
        self._pending: dict[tuple[str, str], list[tuple[tuple, asyncio.Future]]] = {}
        self._flush_scheduled = False

    async def write(self, leader: str, shard_id: str, command: tuple, deadline: float) -> object | None:
        """The leader's result for `command`, or None if the leader did not take it."""
        future = self._loop.create_future()
        self._pending.setdefault((leader, shard_id), []).append((command, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush, deadline)
        return await future

    def _flush(self, deadline: float) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for (leader, shard_id), writes in pending.items():
            for start in range(0, len(writes), MAX_BATCH):
                self._loop.create_task(self._send(leader, shard_id, writes[start:start + MAX_BATCH], deadline))

    async def _send(self, leader: str, shard_id: str, writes: list, deadline: float) -> None:
        results: list = [None] * len(writes)
        try:
            body = json.dumps({"commands": [command_to_json(c) for c, _ in writes]}).encode()
            resp = await self._forwarder.send(leader, "POST", route(shard_id), None, uuid.uuid4().hex,
                                              max(deadline, time.monotonic() + 0.5), body=body)
            rows = resp.body.get("results") if resp.status == 200 else None
            if isinstance(rows, list) and len(rows) == len(writes):
                results = [result_from_json(row) for row in rows]
        except PeerUnreachable:
            pass
        finally:
            for (_, future), result in zip(writes, results):
                if not future.done():
                    future.set_result(result)
