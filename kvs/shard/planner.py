"""The view-change planner: from the current epoch and a requested view to the next epoch.

A view change has two phases. "Prepare": plan (this module), start the new
groups, copy the keys that change owner; then "commit" the pending epoch
through the metadata group. `plan_view_change` is the first step. It is a pure
function (no I/O, no clock, no randomness), so every node that plans from the
same inputs gets the same plan, and the plan can be stored as plain data.

Rules, and why:

- The view keeps its order and is cut into consecutive blocks of repl_factor
  nodes, exactly as `ConfigEpoch.initial` does.
- A block whose set of replicas equals that of a shard of the current epoch
  keeps the shard's id and the slots of its replicas. Its Raft group keeps
  running untouched, and since the ring is a function of the shard ids, the
  keys it keeps owning do not move.
- Every other block is a new group, numbered with consecutive integers after
  the largest id ever used (`ConfigEpoch.max_shard_id`), in block order. Ids
  are never reused: nodes keep a group's Raft journal under its id, and a
  retired group's journal must not become a new group's.
- A replica of a new group takes the lowest slot >= 1 that its node does not
  use in the current epoch. Slots fix Raft ports (`kvs.settings`), so old and
  new groups can run side by side on one node while keys are copied.
- Shards of the current epoch that no block keeps are retired; all their
  ranges move. The moves are exactly `moved_ranges(old ring, new ring)`,
  grouped by (old owner, new owner): a key moves iff it is in one of them.
- metadata_members stay as they are: metadata membership changes after the
  commit, one node at a time. The new epoch is number + 1, status "pending".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import BadRequest
from ..settings import normalize_address
from .layout import FIRST_SHARD_SLOT, ConfigEpoch
from .ring import HashRange, HashRing, moved_ranges

PENDING = "pending"


@dataclass(frozen=True)
class Move:
    source: str                      # shard id that owns the ranges in the current epoch
    destination: str                 # shard id that owns them in the new epoch
    ranges: tuple[HashRange, ...]    # arcs of the ring, in ring order, as from moved_ranges

    def to_dict(self) -> dict:
        return {"source": self.source, "destination": self.destination,
                "ranges": [[r.start, r.end, r.group] for r in self.ranges]}

    @classmethod
    def from_dict(cls, d: dict) -> "Move":
        return cls(source=str(d["source"]), destination=str(d["destination"]),
                   ranges=tuple(HashRange(int(s), int(e), str(g)) for s, e, g in d["ranges"]))


@dataclass(frozen=True)
class Plan:
    epoch: ConfigEpoch               # number = current.number + 1, status = "pending"
    moves: tuple[Move, ...]          # sorted by (source, destination)
    new_groups: tuple[str, ...]      # shard ids that do not exist in the current epoch
    retired_groups: tuple[str, ...]  # shard ids of the current epoch that the new one drops

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch.to_dict(),
            "moves": [m.to_dict() for m in self.moves],
            "new_groups": list(self.new_groups),
            "retired_groups": list(self.retired_groups),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(
            epoch=ConfigEpoch.from_dict(d["epoch"]),
            moves=tuple(Move.from_dict(m) for m in d["moves"]),
            new_groups=tuple(d["new_groups"]),
            retired_groups=tuple(d["retired_groups"]),
        )


def _validate(view: Sequence[str], repl_factor: int) -> tuple[str, ...]:
    if isinstance(view, str):
        raise BadRequest("the view must be a list of addresses, not a single string")
    if isinstance(repl_factor, bool) or not isinstance(repl_factor, int):
        raise BadRequest(f"repl-factor must be an integer, not {repl_factor!r}")
    if repl_factor < 1:
        raise BadRequest(f"repl-factor must be at least 1, not {repl_factor}")
    if not view:
        raise BadRequest("the view is empty")
    addresses = []
    for entry in view:
        if not isinstance(entry, str):
            raise BadRequest(f"malformed address {entry!r}: expected a 'host:port' string")
        addresses.append(normalize_address(entry))
    duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
    if duplicates:
        raise BadRequest(f"duplicate addresses in the view: {', '.join(duplicates)}")
    if len(addresses) % repl_factor:
        raise BadRequest(f"{len(addresses)} nodes is not a multiple of repl-factor {repl_factor}")
    return tuple(addresses)


def _shard_number(shard_id: str) -> int:
    try:
        return int(shard_id)
    except ValueError:
        raise BadRequest(f"shard id {shard_id!r} is not an integer; cannot number new groups") from None


def plan_view_change(current: ConfigEpoch, view: Sequence[str], repl_factor: int | None = None) -> Plan:
    """Plan the change from `current` to `view` (see the module docstring)."""
    repl_factor = current.repl_factor if repl_factor is None else repl_factor
    view = _validate(view, repl_factor)
    blocks = [view[i:i + repl_factor] for i in range(0, len(view), repl_factor)]

    existing = {frozenset(replicas): sid for sid, replicas in current.shards.items()}
    used_slots: dict[str, set[int]] = {}
    for slots in current.slots.values():
        for address, slot in slots.items():
            used_slots.setdefault(address, set()).add(slot)
    next_number = max([current.max_shard_id] + [_shard_number(sid) for sid in current.shards]) + 1

    shards: dict[str, tuple[str, ...]] = {}
    slots: dict[str, dict[str, int]] = {}
    new_groups: list[str] = []
    for block in blocks:
        sid = existing.get(frozenset(block))
        if sid is not None:
            slots[sid] = {a: current.slots[sid][a] for a in block}
        else:
            sid = str(next_number)
            next_number += 1
            new_groups.append(sid)
            slots[sid] = {a: _lowest_free_slot(used_slots.get(a, set())) for a in block}
        shards[sid] = block

    ring = HashRing(shards, current.ring.vnodes)
    epoch = ConfigEpoch(
        number=current.number + 1,
        view=view,
        repl_factor=repl_factor,
        shards=shards,
        slots=slots,
        ring=ring,
        metadata_members=tuple(current.metadata_members),
        status=PENDING,
        max_shard_id=next_number - 1,
    )

    grouped: dict[tuple[str, str], list[HashRange]] = {}
    for arc, source, destination in moved_ranges(current.ring, ring):
        grouped.setdefault((source, destination), []).append(arc)
    moves = tuple(Move(s, d, tuple(arcs)) for (s, d), arcs in sorted(grouped.items()))
    retired = tuple(sid for sid in current.shard_ids() if sid not in shards)
    return Plan(epoch=epoch, moves=moves, new_groups=tuple(new_groups), retired_groups=retired)


def _lowest_free_slot(used: set[int]) -> int:
    slot = FIRST_SHARD_SLOT
    while slot in used:
        slot += 1
    return slot
