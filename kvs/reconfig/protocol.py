"""The node-to-node protocol of view changes: its routes and its typed messages.

Both ends use these records: `kvs.reconfig.remote` (the client, which the
coordinator and the background watchers call) and `kvs.http.internal` (the
server). Every `from_json` checks its input and raises `ValueError` with the
reason; the server answers that with 400 and the client treats it as a broken
peer. Nothing positional travels: every message is a JSON object with named
fields. The group commands themselves are `kvs.fsm.commands`.

    GET  /internal/status                 NodeStatus: epoch, shard, hosted groups with leader and members
    POST /internal/epochs                 Epochs: learn an active (and pending) epoch
    GET  /internal/epochs                 KnownEpochs: what this node's metadata replica knows
    POST /internal/metadata               MetadataMembership: join or leave the metadata group
    POST /internal/groups/<id>/commands   {"command": AdminCommand} -> {"result": int | bool}
    POST /internal/groups/<id>/export     ExportRequest -> Exported: a page of the moving keys, after a read index
    POST /internal/groups/<id>/changes    ExportRequest with since -> Exported: a page of what changed since

Exports are paged (`kvs.fsm.handover`, "Export in pages"): a request names a
cursor, `after` (the position of the last row already received: {"key": K,
"request": null, or the request id of a deduplication row of K}; absent or null:
from the start) and a `budget` (bytes of encoded rows wanted; the source caps
it, KVS_EXPORT_PAGE_BYTES); the page holds the rows after the cursor in the
export order up to the budget (at least one), `more` (whether rows remain) and
`cursor` (the position of its last row: the next request's `after`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from kvs.config.epoch import ConfigEpoch, InvalidEpoch
from kvs.fsm.batch import key_order
from kvs.fsm.commands import (check_ring, check_text, data_from_json, data_to_json, dedup_from_json, dedup_to_json,
                               items_from_json, items_to_json)

STATUS = "/internal/status"
EPOCHS = "/internal/epochs"
METADATA = "/internal/metadata"


def group_route(shard_id: str, what: str) -> str:
    """/internal/groups/<id>/<what> for what in commands, export, changes."""
    return f"/internal/groups/{quote(shard_id, safe='')}/{what}"


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise ValueError("a JSON object is required")
    return body


def _epoch(value: object, what: str) -> dict:
    """An epoch dict that `ConfigEpoch.from_dict` accepts (checked here, so no bad one is ever stored)."""
    try:
        ConfigEpoch.from_dict(value)
    except InvalidEpoch as exc:
        raise ValueError(f"{what} is not a valid epoch: {exc}") from None
    except Exception:            # anything `from_dict`'s checks did not foresee: still no 500
        raise ValueError(f"{what} is not a valid epoch") from None
    return value


def _revision(value: object) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 63:
        raise ValueError("revision must be a non-negative integer")
    return value


@dataclass(frozen=True)
class Epochs:
    """What the metadata group has decided: the active epoch, the pending one, and the revision of that
    decision (`MetadataState.decisions`), by which a receiver tells newer news from older."""
    active: dict
    pending: dict | None
    revision: int = 0

    def to_json(self) -> dict:
        return {"active": self.active, "pending": self.pending, "revision": self.revision}

    @classmethod
    def from_json(cls, body: object) -> "Epochs":
        b = _object(body)
        active = _epoch(b.get("active"), "active")
        pending = b.get("pending")
        if pending is not None:
            _epoch(pending, "pending")
            if pending["number"] <= active["number"]:
                raise ValueError("pending must be newer than active")
        return cls(active, pending, _revision(b.get("revision")))


@dataclass(frozen=True)
class KnownEpochs:
    active: dict | None
    pending: dict | None
    metadata_member: bool
    max_shard_id: int
    revision: int = 0

    def to_json(self) -> dict:
        return {"active": self.active, "pending": self.pending, "metadata-member": self.metadata_member,
                "max-shard-id": self.max_shard_id, "revision": self.revision}

    @classmethod
    def from_json(cls, body: object) -> "KnownEpochs":
        b = _object(body)
        active = b.get("active")
        pending = b.get("pending")
        return cls(_epoch(active, "active") if active is not None else None,
                   _epoch(pending, "pending") if pending is not None else None,
                   bool(b.get("metadata-member")), int(b.get("max-shard-id") or 0), _revision(b.get("revision")))


@dataclass(frozen=True)
class MetadataMembership:
    member: bool
    peers: list[str]           # Raft addresses of the metadata group's members

    def to_json(self) -> dict:
        return {"member": self.member, "peers": list(self.peers)}

    @classmethod
    def from_json(cls, body: object) -> "MetadataMembership":
        b = _object(body)
        peers = b.get("peers")
        if not isinstance(b.get("member"), bool) or not isinstance(peers, list) \
                or not all(isinstance(p, str) and p for p in peers):
            raise ValueError("member (bool) and peers (list of Raft addresses) are required")
        return cls(b["member"], peers)


@dataclass(frozen=True)
class GroupStatus:
    leader: str | None         # Raft address of the leader this replica sees, if any
    members: list[str]         # Raft addresses of the group's members
    role: str = ""             # "leader", "follower", "candidate", "failed"
    commit_index: int = 0
    last_applied: int = 0

    @classmethod
    def from_json(cls, g: dict) -> "GroupStatus":
        number = lambda v: v if isinstance(v, int) and not isinstance(v, bool) else 0     # noqa: E731
        return cls(g.get("leader") if isinstance(g.get("leader"), str) else None, list(g.get("members") or []),
                   g.get("role") if isinstance(g.get("role"), str) else "", number(g.get("commit-index")),
                   number(g.get("last-applied")))


@dataclass(frozen=True)
class NodeStatus:
    epoch: int | None
    shard_id: str | None
    groups: dict[str, GroupStatus]     # "meta", "shard-<id>"

    def hosted_shards(self) -> set[str]:
        hosted = {name[len("shard-"):] for name in self.groups if name.startswith("shard-")}
        return hosted | ({self.shard_id} if self.shard_id else set())

    @classmethod
    def from_json(cls, body: object) -> "NodeStatus":
        b = _object(body)
        groups = b.get("groups") or {}
        if not isinstance(groups, dict):
            raise ValueError("groups must be an object")
        return cls(b.get("epoch") if isinstance(b.get("epoch"), int) else None,
                   str(b["shard-id"]) if b.get("shard-id") else None,
                   {str(name): GroupStatus.from_json(g) for name, g in groups.items() if isinstance(g, dict)})


MAX_BUDGET = 2 ** 62


def cursor_to_json(cursor: tuple | None) -> dict | None:
    return None if cursor is None else {"key": data_to_json(cursor[0]), "request": cursor[1]}


def cursor_from_json(value: object, what: str) -> tuple | None:
    """A cursor, (key, request id | None), or None; ValueError for anything else."""
    if value is None:
        return None
    if not isinstance(value, dict) or "key" not in value or not set(value) <= {"key", "request"}:
        raise ValueError(f"{what} must be null or {{\"key\": key, \"request\": null or a request id}}")
    rid = value.get("request")
    if rid is not None and not isinstance(rid, str):
        raise ValueError(f"{what}: request must be null or a string")
    try:
        return data_from_json(value["key"]), rid
    except ValueError:
        raise ValueError(f"{what}: key must be a string or {{\"b64\": base64}}") from None


def cursor_order(cursor: tuple) -> tuple:
    """Where a cursor is in the export order: a key's own row, then its dedup rows by request id."""
    key, rid = cursor
    return key_order(key), rid is not None, rid or ""


@dataclass(frozen=True)
class ExportRequest:
    """A page of the keys of shard `source` that `old_ring` gives it and `new_ring` gives `destination`."""
    source: str
    old_ring: dict
    new_ring: dict
    destination: str
    since: int | None = None   # only those written after this change number (None: all of them)
    after: tuple | None = None     # cursor: the position of the last row already received (None: the start)
    budget: int | None = None      # bytes of encoded rows wanted (None: the source's page size, its maximum)

    def to_json(self) -> dict:
        body = {"source": self.source, "old_ring": self.old_ring, "new_ring": self.new_ring,
                "destination": self.destination, "after": cursor_to_json(self.after)}
        if self.since is not None:
            body["since"] = self.since
        if self.budget is not None:
            body["budget"] = self.budget
        return body

    @classmethod
    def from_json(cls, body: object, with_since: bool) -> "ExportRequest":
        b = _object(body)
        since = b.get("since")
        if with_since and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
            raise ValueError("since must be a non-negative integer")
        budget = b.get("budget")
        if budget is not None and (type(budget) is not int or not 0 < budget <= MAX_BUDGET):
            raise ValueError("budget must be a positive integer")
        return cls(check_text(b.get("source"), "source"), check_ring(b.get("old_ring"), "old_ring"),
                   check_ring(b.get("new_ring"), "new_ring"), check_text(b.get("destination"), "destination"),
                   since if with_since else None, cursor_from_json(b.get("after"), "after"), budget)


@dataclass(frozen=True)
class Exported:
    """One page of an export."""
    items: list                # [(key, value, version)]
    deleted: list              # keys deleted since the previous copy
    dedup: list                # deduplication rows of these keys
    number: int                # the change number this page was read at
    revision: int = 0          # the source's revision counter (the destination's versions go past it)
    more: bool = False         # rows remain after this page
    cursor: tuple | None = None    # the position of this page's last row (None: the page is empty)

    def to_json(self) -> dict:
        return {"items": items_to_json(self.items), "deleted": [data_to_json(k) for k in self.deleted],
                "dedup": dedup_to_json(self.dedup), "number": self.number, "revision": self.revision,
                "more": self.more, "cursor": cursor_to_json(self.cursor)}

    @classmethod
    def from_json(cls, body: object) -> "Exported":
        b = _object(body)
        items, deleted, number = b.get("items"), b.get("deleted"), b.get("number")
        if not isinstance(items, list) or not isinstance(deleted, list) or type(number) is not int or number < 0:
            raise ValueError("an export has items, deleted and number")
        revision = b.get("revision", 0)
        if type(revision) is not int or revision < 0:
            raise ValueError("an export's revision is a non-negative integer")
        more = b.get("more", False)         # absent: a source that sends the whole range at once
        if not isinstance(more, bool):
            raise ValueError("an export's more is true or false")
        cursor = cursor_from_json(b.get("cursor"), "cursor")
        if more and cursor is None:
            raise ValueError("an export with more rows names its cursor")
        return cls(items_from_json(items), [data_from_json(k) for k in deleted], dedup_from_json(b.get("dedup")),
                   number, revision, more, cursor)
