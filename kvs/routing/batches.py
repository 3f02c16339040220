"""BatchRouter: seed 004's batches on the event loop, split by shard.

A batch's pairs (or keys) are grouped by the shard the current epoch maps
them to; every shard's part is served at once, each by this node's replica of
the shard when it has one that can serve, else forwarded to the shard's
replicas (`POST /internal/batches/<shard>/<op>`, signed, never forwarded
again: a node that does not serve the shard answers 421). A write part is one
"set-batch" command (`kvs.fsm.batch`): all of its pairs or none. A part
refused because its keys moved (a view change) is grouped again by the newer
epoch, until the deadline; a part that fails otherwise fails only its own
pairs, with the reason. The batch as a whole is not atomic across shards.

`scan` pages one shard's pairs for `GET /fetch` (`kvs.routing.listing`).
Reads of many keys stop at a byte budget (FETCH_BYTES for a whole request,
shared by its parts): keys past it are answered "not read", so no reply, and
no forwarded part, grows without bound.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kvs.errors import BadRequest, KvsError, NotMember, Unavailable, WrongGroup
from kvs.fsm.base import Invalid
from kvs.fsm.batch import SKIPPED, Skipped, is_data
from kvs.fsm.commands import data_from_json, data_to_json
from kvs.fsm.shard import NotOwned, Written
from kvs.node import Node
from kvs.routing.keys import KeyRouter
from kvs.routing.listing import Listings

ROUTE = "/internal/batches/"     # + <shard id>/set | read | scan
OPS = ("set", "read", "query", "scan")
FETCH_BYTES = 16 << 20           # values one batched read answers with, all parts together
EPOCH_WAIT = 0.2
NOT_READ = "not read: the answer would exceed 16 MiB; ask for fewer keys at once"


class BatchRouter:
    def __init__(self, node: Node, keys: KeyRouter):
        self._node = node
        self._keys = keys
        self._listings = Listings()

    @property
    def epoch(self):
        return self._node.epoch

    # -- the entry node: group by shard, serve the parts, route moved parts again ----------------------

    async def set_pairs(self, pairs: list[tuple[int, Any, Any]], request_id: str, deadline: float) -> dict:
        """{pair index: Written, or the reason it was not written}."""
        return await self._by_shard(pairs, lambda sid, part: self._part(sid, "set", part, request_id, deadline),
                                    deadline)

    async def read_keys(self, keys: list[tuple[int, Any]], exists_only: bool, request_id: str,
                        deadline: float) -> dict:
        """{key index: (value, version) or None (missing), or True / False if `exists_only`; or the reason
        it could not be read}."""
        op = "query" if exists_only else "read"
        shards = len(self.epoch.shards) if self.epoch is not None else 1
        budget = FETCH_BYTES // max(1, min(shards, len(keys)))
        return await self._by_shard(keys, lambda sid, part: self._part(sid, op, part, request_id, deadline, budget),
                                    deadline)

    async def _by_shard(self, rows: list[tuple], serve, deadline: float) -> dict:
        outcomes: dict[int, Any] = {}
        pending = list(rows)
        while pending:
            epoch = self._node.epoch
            if epoch is None:
                raise NotMember("this node does not know the cluster configuration")
            parts: dict[str, list] = {}
            for row in pending:
                parts.setdefault(epoch.shard_for_key(row[1]), []).append(row)
            results = await asyncio.gather(*(serve(sid, part) for sid, part in parts.items()), return_exceptions=True)
            pending, wanted = [], epoch.number + 1
            for part, result in zip(parts.values(), results):
                if isinstance(result, WrongGroup) and time.monotonic() < deadline:
                    pending.extend(part)
                    wanted = max(wanted, result.epoch)
                elif isinstance(result, BaseException):
                    reason = _reason(result)
                    outcomes.update((row[0], reason) for row in part)
                else:
                    moved = [row for row, r in zip(part, result) if isinstance(r, NotOwned)]
                    outcomes.update((row[0], NOT_READ if isinstance(r, Skipped) else r)
                                    for row, r in zip(part, result) if not isinstance(r, NotOwned))
                    pending.extend(moved)
            if pending:
                await self._keys.wait_for_epoch(wanted, min(deadline, time.monotonic() + EPOCH_WAIT))
        return outcomes

    async def _part(self, shard_id: str, op: str, part: list[tuple], request_id: str, deadline: float,
                    budget: int = FETCH_BYTES) -> list:
        replica = self._keys.local_replica(shard_id)
        if replica is not None:
            return await self._serve(replica, op, part, request_id, deadline, budget)
        payload = {"rows": [[row[0], *map(data_to_json, row[1:])] for row in part], "budget": budget}
        reply = await self._keys.forward(shard_id, "POST", f"{ROUTE}{shard_id}/{op}", payload, request_id, deadline)
        if reply.status != 200:
            raise Unavailable(str(reply.body.get("cause") or reply.body.get("error") or reply.status))
        try:
            return results_from_json(op, reply.body["results"], len(part))
        except (KeyError, TypeError, ValueError) as exc:
            raise Unavailable(f"shard {shard_id} answered a malformed batch reply: {exc}") from None

    async def _serve(self, replica, op: str, part: list[tuple], request_id: str, deadline: float,
                     budget: int = FETCH_BYTES) -> list:
        if op == "set":
            result = await replica.execute(("set-batch", request_id, tuple(part)), deadline)
            if isinstance(result, NotOwned):
                raise WrongGroup("the part's keys moved", result.epoch)
            if isinstance(result, Invalid):
                raise BadRequest(result.reason)
            return list(result)
        keys = [row[1] for row in part]
        if op == "query":
            return await replica.read(lambda state: state.exist_many(keys), deadline)
        return await replica.read(lambda state: state.read_many(keys, budget), deadline)

    # -- a forwarded part, served here or refused ------------------------------------------------------

    async def serve_forwarded(self, shard_id: str, op: str, body: dict, request_id: str, deadline: float) -> dict:
        replica = self._keys.local_replica(shard_id)
        if replica is None:
            epoch = self._node.epoch
            if epoch is not None and self._node.settings.address in epoch.shards.get(shard_id, ()):
                raise Unavailable(f"this node's replica of shard {shard_id} is not running")
            raise WrongGroup(f"shard {shard_id} is not served by this node", epoch.number if epoch else 0)
        if op == "scan":
            after, listing = body.get("after"), body.get("listing")
            if not isinstance(listing, str) or not listing:
                raise BadRequest("a page request names its listing")
            try:
                after = None if after is None else data_from_json(after)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            rows, last, epoch = await self._listings.page(replica, shard_id, listing, after, deadline)
            return {"rows": [[data_to_json(k), data_to_json(v)] for k, v in rows],
                    "next": None if last is None else data_to_json(last), "epoch": epoch}
        part = rows_from_json(op, body.get("rows"))
        budget = body.get("budget", FETCH_BYTES)
        if type(budget) is not int or budget < 1:
            raise BadRequest("budget must be a positive integer")
        results = await self._serve(replica, op, part, request_id, deadline, min(budget, FETCH_BYTES))
        return {"results": results_to_json(results)}

    # -- listing a shard --------------------------------------------------------------------------------

    async def scan(self, shard_id: str, listing: str, after: Any, request_id: str,
                   deadline: float) -> tuple[list, Any, int]:
        """One page of the shard's pairs after key `after` (None: from the start), the key to continue
        after (None: the shard is done), and the group's ownership epoch (`kvs.routing.listing`)."""
        replica = self._keys.local_replica(shard_id)
        if replica is not None:
            return await self._listings.page(replica, shard_id, listing, after, deadline)
        payload = {"after": None if after is None else data_to_json(after), "listing": listing}
        reply = await self._keys.forward(shard_id, "POST", f"{ROUTE}{shard_id}/scan", payload, request_id, deadline)
        if reply.status != 200:
            raise Unavailable(str(reply.body.get("cause") or reply.body.get("error") or reply.status))
        try:
            rows = [(data_from_json(k), data_from_json(v)) for k, v in reply.body["rows"]]
            last, epoch = reply.body["next"], reply.body["epoch"]
            if type(epoch) is not int:
                raise ValueError("a page names its epoch")
            return rows, None if last is None else data_from_json(last), epoch
        except (KeyError, TypeError, ValueError) as exc:
            raise Unavailable(f"shard {shard_id} answered a malformed page: {exc}") from None


# -- wire forms of forwarded parts ------------------------------------------------------------------------

def rows_from_json(op: str, rows: object) -> list[tuple]:
    """A forwarded part's rows: [index, key, value] for "set", [index, key] for "read"."""
    width = 3 if op == "set" else 2             # "read" and "query": [index, key]
    if not isinstance(rows, list) or not rows:
        raise BadRequest("a batch part has rows")
    parsed = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == width and type(row[0]) is int and row[0] >= 0):
            raise BadRequest("a batch row is [index, key] or [index, key, value]")
        try:
            parsed.append((row[0], *map(data_from_json, row[1:])))
        except ValueError as exc:
            raise BadRequest(f"malformed batch row: {exc}") from None
        if not all(map(is_data, parsed[-1][1:])):
            raise BadRequest("a batch row's key or value is not valid Unicode")
    return parsed


def results_to_json(results: list) -> list:
    out = []
    for r in results:
        if isinstance(r, Written):
            out.append({"written": [r.replaced, r.version]})
        elif isinstance(r, NotOwned):
            out.append({"moved": r.epoch})
        elif r is None or isinstance(r, bool):
            out.append(r)
        elif isinstance(r, Skipped):
            out.append({"skipped": True})
        else:                                   # (value, version) of a read
            out.append({"found": [data_to_json(r[0]), r[1]]})
    return out


def results_from_json(op: str, rows: object, count: int) -> list:
    if not isinstance(rows, list) or len(rows) != count:
        raise ValueError("one result per row")
    results = []
    for row in rows:
        if row is None and op == "read" or isinstance(row, bool) and op == "query":
            results.append(row)
        elif isinstance(row, dict) and op == "set" and "written" in row:
            replaced, version = row["written"]
            if not isinstance(replaced, bool) or type(version) is not int:
                raise ValueError("malformed written result")
            results.append(Written(replaced, version))
        elif isinstance(row, dict) and op == "read" and row.get("skipped") is True:
            results.append(SKIPPED)
        elif isinstance(row, dict) and "moved" in row and type(row["moved"]) is int:
            results.append(NotOwned(row["moved"]))
        elif isinstance(row, dict) and op == "read" and "found" in row:
            value, version = row["found"]
            results.append((data_from_json(value), int(version)))
        else:
            raise ValueError("unknown result")
    return results


def _reason(exc: BaseException) -> str:
    if isinstance(exc, WrongGroup):
        return "unavailable: the key's shard is moving (a view change); retry"
    if isinstance(exc, Unavailable):
        return f"unavailable: {exc.message} (the outcome is unknown; retrying with the same Idempotency-Key is safe)"
    if isinstance(exc, KvsError):
        return exc.message
    return f"internal error: {type(exc).__name__}"
