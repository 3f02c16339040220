"""Typed records of the shard group's view-change commands, and their JSON form between nodes.

A view-change coordinator sends these to a shard group through the internal
HTTP API (`POST /internal/groups/<id>/commands`, see `kvs.http.internal`); the
receiving node checks the JSON into one of these records, which turns itself
into the tuple the Raft log carries (`as_entry`, the format `ShardState.apply`
dispatches on). The log keeps plain tuples of plain data so that its format
does not depend on Python class paths; the records exist so that nobody
builds or reads those tuples by position.

`command_from_json` refuses anything malformed with `ValueError`, which the
HTTP layer answers with 400: a bad request never reaches the log.

The deduplication table travels with the keys it belongs to (`Install.dedup`):
rows of (request id, (fingerprint, key, result)); `dedup_to_json` and
`dedup_from_json` are their wire form.

Keys and values are str or bytes (seed 004's binary data); in JSON a str is a
string and bytes are {"b64": "<base64>"} (`data_to_json`, `data_from_json`),
so binary data crosses nodes as bytes, never as text that happens to hold base64.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from kvs.fsm.shard import Deleted, Mismatch, Written

_RESULT_TYPES = {"Written": Written, "Deleted": Deleted, "Mismatch": Mismatch}


@dataclass(frozen=True)
class Track:
    """Number every later write of a key that moves away under `new_ring` (delta catch-up)."""
    op: ClassVar[str] = "track"
    epoch: int
    new_ring: dict

    def as_entry(self) -> tuple:
        return ("track", self.epoch, self.new_ring)


@dataclass(frozen=True)
class Freeze:
    """Stop serving the keys that move away under `new_ring`."""
    op: ClassVar[str] = "freeze"
    epoch: int
    new_ring: dict

    def as_entry(self) -> tuple:
        return ("freeze", self.epoch, self.new_ring)


@dataclass(frozen=True)
class Thaw:
    """Undo a freeze and the tracking of `epoch` (its change was rolled back)."""
    op: ClassVar[str] = "thaw"
    epoch: int

    def as_entry(self) -> tuple:
        return ("thaw", self.epoch)


@dataclass(frozen=True)
class Install:
    """Keys moving here from `source` (with their dedup rows); `clear` first empties that set."""
    op: ClassVar[str] = "install"
    epoch: int
    source: str
    old_ring: dict
    new_ring: dict
    items: list            # [(key, value, version)]
    dedup: list            # [(request id, (fingerprint, key, result))]
    clear: bool
    deleted: list = field(default_factory=list)     # keys deleted at the source since the last copy
    revision: int = 0      # the source's revision counter: versions given here later go past it

    def as_entry(self) -> tuple:
        return ("install", self.epoch, self.source, self.old_ring, self.new_ring,
                [tuple(kv) for kv in self.items], self.dedup, self.clear, list(self.deleted), self.revision)

    def to_json(self) -> dict:
        return {"op": self.op, "epoch": self.epoch, "source": self.source, "old_ring": self.old_ring,
                "new_ring": self.new_ring, "items": items_to_json(self.items),
                "dedup": dedup_to_json(self.dedup), "clear": self.clear,
                "deleted": [data_to_json(k) for k in self.deleted], "revision": self.revision}


@dataclass(frozen=True)
class Own:
    """Take the ownership of `epoch`: shard `shard_id` of `ring`."""
    op: ClassVar[str] = "own"
    epoch: int
    shard_id: str
    ring: dict

    def as_entry(self) -> tuple:
        return ("own", self.epoch, self.shard_id, self.ring)


@dataclass(frozen=True)
class Drop:
    """Forget every key (and dedup row) no longer owned at `epoch` (scans the shard)."""
    op: ClassVar[str] = "drop"
    epoch: int

    def as_entry(self) -> tuple:
        return ("drop", self.epoch)


@dataclass(frozen=True)
class DropKeys:
    """Forget those of `keys` no longer owned at `epoch`: a drop in slices the caller knows."""
    op: ClassVar[str] = "drop-keys"
    epoch: int
    keys: list

    def as_entry(self) -> tuple:
        return ("drop-keys", self.epoch, list(self.keys))

    def to_json(self) -> dict:
        return {"op": self.op, "epoch": self.epoch, "keys": [data_to_json(k) for k in self.keys]}


AdminCommand = Track | Freeze | Thaw | Install | Own | Drop | DropKeys
_BY_OP: dict[str, Any] = {cls.op: cls for cls in (Track, Freeze, Thaw, Install, Own, Drop, DropKeys)}


def command_to_json(command: AdminCommand) -> dict:
    if isinstance(command, (Install, DropKeys)):
        return command.to_json()
    return {"op": command.op, **asdict(command)}


def command_from_json(body: object) -> AdminCommand:
    """The command a JSON object describes; ValueError (with the reason) if it is not one."""
    if not isinstance(body, dict):
        raise ValueError("a command must be a JSON object")
    cls = _BY_OP.get(body.get("op"))
    if cls is None:
        raise ValueError(f"not a view-change command: {str(body.get('op'))[:40]!r}")
    values = {}
    for f in fields(cls):
        if f.name not in body:
            if f.name in ("deleted", "revision"):
                continue
            raise ValueError(f"{cls.op}: {f.name} is missing")
        values[f.name] = _CHECKS[f.name](body[f.name], f"{cls.op}: {f.name}")
    return cls(**values)


# -- field checks -------------------------------------------------------------------------------------

def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return value


def check_text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false")
    return value


def check_ring(value: object, what: str) -> dict:
    if not (isinstance(value, dict) and set(value) == {"groups", "vnodes"}
            and isinstance(value["groups"], list) and value["groups"]
            and all(isinstance(g, str) and g for g in value["groups"])
            and isinstance(value["vnodes"], int) and not isinstance(value["vnodes"], bool)
            and 0 < value["vnodes"] <= 4096):
        raise ValueError(f"{what} must be a ring: {{\"groups\": [shard ids], \"vnodes\": n}}")
    return {"groups": list(value["groups"]), "vnodes": value["vnodes"]}


def data_to_json(x: str | bytes) -> object:
    """A key or value in JSON: a str as it is, bytes as {"b64": ...}."""
    return {"b64": base64.b64encode(x).decode("ascii")} if isinstance(x, bytes) else x


def data_from_json(x: object) -> str | bytes:
    """Inverse of data_to_json; ValueError for anything else."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict) and len(x) == 1 and isinstance(x.get("b64"), str):
        try:
            return base64.b64decode(x["b64"], validate=True)
        except (binascii.Error, ValueError):
            pass
    raise ValueError("a key or value is a string or {\"b64\": base64}")


def items_to_json(items: list) -> list:
    return [[data_to_json(k), data_to_json(v), *rest] for k, v, *rest in items]


def items_from_json(value: object) -> list:
    """[key, value, version] rows ([key, value] from nodes older than versions: version 0); ValueError if
    malformed."""
    if not isinstance(value, list) or not all(isinstance(row, list) and len(row) in (2, 3) for row in value):
        raise ValueError("items must be a list of [key, value, version] rows")
    rows = [(data_from_json(row[0]), data_from_json(row[1]), row[2] if len(row) == 3 else 0) for row in value]
    if not all(type(version) is int and version >= 0 for _, _, version in rows):
        raise ValueError("an item's version is a non-negative integer")
    return rows


def _keys(value: object, what: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of keys")
    try:
        return [data_from_json(k) for k in value]
    except ValueError:
        raise ValueError(f"{what} must be a list of keys") from None


def _strings(value: object, what: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return value


def _items(value: object, what: str) -> list:
    try:
        return items_from_json(value)
    except ValueError:
        raise ValueError(f"{what} must be a list of [key, value, version] rows") from None


def _dedup(value: object, what: str) -> list:
    try:
        return dedup_from_json(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be deduplication rows") from None


_CHECKS = {"epoch": _int, "new_ring": check_ring, "old_ring": check_ring, "ring": check_ring, "source": check_text,
           "shard_id": check_text, "items": _items, "dedup": _dedup, "clear": _bool, "deleted": _keys,
           "keys": _keys, "revision": _int}


# -- the deduplication table on the wire --------------------------------------------------------------

def dedup_to_json(entries: list) -> list:
    return [[rid, list(fingerprint), data_to_json(key), [type(result).__name__, *result]]
            for rid, (fingerprint, key, result) in entries if type(result).__name__ in _RESULT_TYPES]


def _version(v: object) -> bool:
    return type(v) is int and v >= 0


_RESULT_SHAPES = {      # the values of each result type (Written: replaced[, version])
    "Written": lambda v: len(v) in (1, 2) and isinstance(v[0], bool) and all(map(_version, v[1:])),
    "Deleted": lambda v: len(v) == 1 and isinstance(v[0], bool),
    "Mismatch": lambda v: len(v) in (1, 2) and _version(v[0]) and all(isinstance(x, bool) for x in v[1:]),
}


def dedup_from_json(rows: object) -> list:
    """Inverse of dedup_to_json; rows of unknown result types are dropped, malformed ones refused."""
    if not isinstance(rows, list):
        raise ValueError("deduplication rows must be a list")
    entries = []
    for row in rows:
        rid, fingerprint, key, (kind, *values) = row
        key = data_from_json(key)
        if not (isinstance(rid, str) and isinstance(fingerprint, list)
                and all(isinstance(v, (str, int, bool)) for v in fingerprint)):
            raise ValueError("malformed deduplication row")
        if kind in _RESULT_TYPES:
            if not _RESULT_SHAPES[kind](values):
                raise ValueError("malformed deduplication result")
            entries.append((rid, (tuple(fingerprint), key, _RESULT_TYPES[kind](*values))))
    return entries
