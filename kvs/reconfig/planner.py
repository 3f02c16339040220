"""The view-change planner: from the current epoch and a requested layout to the next epoch.

A view change has two phases. "Prepare": plan (this module), start the new
groups, copy the keys that change owner; then "commit" the pending epoch
through the metadata group. Planning is the first step. Every function here is
pure (no I/O, no clock, no randomness), so every node that plans from the same
inputs gets the same plan, and the plan can be stored as plain data.

`plan_layout` plans an explicit layout: a list of replica groups, possibly of
unequal sizes. The requests are thin callers that only build that list:

- `plan_view_change` (PUT /kvs/view-change): the view keeps its order and is
  cut into consecutive blocks of repl_factor nodes, exactly as
  `ConfigEpoch.initial` does.
- `plan_add_member` (PUT /kvs/view-change/add-member): the current groups, one node
  added to one of them.
- `plan_remove_member`: the current groups, one node taken out (a group left
  empty is dropped).

Rules of `plan_layout`, and why:

- A group whose set of replicas equals that of a shard of the current epoch
  keeps the shard's id and the slots of its replicas. Its Raft group keeps
  running untouched, and since the ring is a function of the shard ids, the
  keys it keeps owning do not move.
- Every other group is a new Raft group, numbered with consecutive integers
  after the largest id ever used (`ConfigEpoch.max_shard_id`), in layout
  order. Ids are never reused: nodes keep a group's Raft journal under its id,
  and a retired group's journal must not become a new group's.
- A replica of a new group takes the lowest slot >= 1 that its node does not
  use in the current epoch. Slots fix Raft ports (`kvs.settings`), so old and
  new groups can run side by side on one node while keys are copied.
- Shards of the current epoch that no group keeps are retired; all their
  ranges move. The moves are exactly `moved_ranges(old ring, new ring)`,
  grouped by (old owner, new owner): a key moves iff it is in one of them.
- The view is the groups' addresses in layout order. repl_factor is the size
  of the smallest group: the replication every key is guaranteed. With equal
  groups that is the requested repl_factor; it is also what a later view change
  with repl-factor omitted keeps.
- metadata_members become the new view: once the epoch is active, the
  metadata group's membership follows it one node at a time
  (`kvs.reconfig.membership`). The new epoch is number + 1, status "pending".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from kvs.errors import BadRequest
from kvs.settings import MAX_VIEW_NODES, normalize_address
from kvs.config.epoch import FIRST_SHARD_SLOT, ConfigEpoch
from kvs.config.ring import HashRange, HashRing, moved_ranges, ring_vnodes

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
    addresses = _addresses(view, "the view")
    if len(addresses) % repl_factor:
        raise BadRequest(f"{len(addresses)} nodes is not a multiple of repl-factor {repl_factor}")
    return addresses


def _validate_layout(groups: Sequence[Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    """The groups with normalised addresses; BadRequest unless every group is a non-empty list of
    addresses and no node is in two groups."""
    if isinstance(groups, str) or not isinstance(groups, (list, tuple)):
        raise BadRequest("the layout must be a list of replica groups")
    if not groups:
        raise BadRequest("the layout is empty: at least one group is needed")
    normalised = []
    for i, group in enumerate(groups):
        if isinstance(group, str) or not isinstance(group, (list, tuple)):
            raise BadRequest(f"group {i + 1} of the layout must be a list of addresses, not {group!r}")
        if not group:
            raise BadRequest(f"group {i + 1} of the layout is empty")
        normalised.append(tuple(_normalised(entry) for entry in group))
    _addresses([a for group in normalised for a in group], "the layout")   # a node is in one group only
    return tuple(normalised)


def _addresses(entries: Sequence[str], where: str) -> tuple[str, ...]:
    if len(entries) > MAX_VIEW_NODES:
        raise BadRequest(f"{where} has {len(entries)} nodes; at most {MAX_VIEW_NODES}")
    addresses = tuple(_normalised(entry) for entry in entries)
    duplicates = sorted(a for a, n in Counter(addresses).items() if n > 1)
    if duplicates:
        raise BadRequest(f"duplicate addresses in {where}: {', '.join(duplicates)}")
    return addresses


def _normalised(entry: object) -> str:
    if not isinstance(entry, str):
        raise BadRequest(f"malformed address {entry!r}: expected a 'host:port' string")
    return normalize_address(entry)


def _shard_number(shard_id: str) -> int:
    try:
        return int(shard_id)
    except ValueError:
        raise BadRequest(f"shard id {shard_id!r} is not an integer; cannot number new groups") from None


def plan_view_change(current: ConfigEpoch, view: Sequence[str], repl_factor: int | None = None) -> Plan:
    """Plan the change from `current` to `view` cut into blocks of `repl_factor` (default: the current one)."""
    repl_factor = current.repl_factor if repl_factor is None else repl_factor
    view = _validate(view, repl_factor)
    return plan_layout(current, [view[i:i + repl_factor] for i in range(0, len(view), repl_factor)])


def plan_add_member(current: ConfigEpoch, address: str, shard_id: str) -> Plan:
    """Plan adding one node, not in the view, to shard `shard_id`.

    The thin form: the shard's replica set changes, so under the rules of `plan_layout` it becomes a
    new Raft group with a new id. The ring is keyed by shard ids, so all of the old shard's keys move
    (to the new group and to the others) and the new group takes its share from the others too:
    about 2/n of the keys for n shards, where a Raft membership change inside the group would move
    none. Acceptable for a rare administrative step, and it reuses the view change unchanged.
    """
    address = _normalised(address)
    if shard_id not in current.shards:
        raise BadRequest(f"shard {shard_id} does not exist (shards: {', '.join(current.shard_ids())})")
    if address in current.view:
        raise BadRequest(f"{address} is already in the view, in shard {current.shard_of_node(address)}")
    groups = [replicas + (address,) if sid == shard_id else replicas
              for sid, replicas in _groups_in_view_order(current)]
    return plan_layout(current, groups)


def plan_remove_member(current: ConfigEpoch, address: str) -> Plan:
    """Plan taking one node out of the view.

    Its shard shrinks by one (a new group, as in `plan_add_member`), or, if the node was its only
    replica, the shard is retired and its keys move to the other shards.
    """
    address = _normalised(address)
    if address not in current.view:
        raise BadRequest(f"{address} is not in the view")
    if len(current.view) == 1:
        raise BadRequest(f"{address} is the last node of the view; it cannot be removed")
    groups = [tuple(a for a in replicas if a != address) for _, replicas in _groups_in_view_order(current)]
    return plan_layout(current, [g for g in groups if g])


def _groups_in_view_order(current: ConfigEpoch) -> list[tuple[str, tuple[str, ...]]]:
    """(shard id, replicas) in the order the shards first appear in the view, so that the next view keeps
    the current order whatever the order of the `shards` dict."""
    order = {sid: None for sid in map(current.shard_of_node, current.view) if sid is not None}
    return [(sid, current.shards[sid]) for sid in order]


def plan_layout(current: ConfigEpoch, groups: Sequence[Sequence[str]]) -> Plan:
    """Plan the change from `current` to the explicit layout `groups` (see the module docstring)."""
    groups = _validate_layout(groups)
    existing = {frozenset(replicas): sid for sid, replicas in current.shards.items()}
    used_slots: dict[str, set[int]] = {}
    for slots in current.slots.values():
        for address, slot in slots.items():
            used_slots.setdefault(address, set()).add(slot)
    next_number = max([current.max_shard_id] + [_shard_number(sid) for sid in current.shards]) + 1

    shards: dict[str, tuple[str, ...]] = {}
    slots: dict[str, dict[str, int]] = {}
    new_groups: list[str] = []
    for group in groups:
        sid = existing.get(frozenset(group))
        if sid is not None:
            slots[sid] = {a: current.slots[sid][a] for a in group}
        else:
            sid = str(next_number)
            next_number += 1
            new_groups.append(sid)
            slots[sid] = {a: _lowest_free_slot(used_slots.get(a, set())) for a in group}
        shards[sid] = group

    ring = HashRing(shards, ring_vnodes(len(shards), current.ring.vnodes))
    view = tuple(a for group in groups for a in group)
    epoch = ConfigEpoch(
        number=current.number + 1,
        view=view,
        repl_factor=min(len(group) for group in groups),
        shards=shards,
        slots=slots,
        ring=ring,
        metadata_members=view,
        status=PENDING,
        max_shard_id=next_number - 1,
        origins={sid: (current.origin(sid) if sid in current.shards else (current.number + 1, ring.to_dict()))
                 for sid in shards},
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
