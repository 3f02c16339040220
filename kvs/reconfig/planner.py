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

- Groups are matched to the current shards by the replicas they share, most
  shared first (ties in layout order, then shard order); the groups left over
  are matched to the shards left over in order, up to the smaller count. A
  matched group keeps the shard's id, its Raft group and the slots of the
  replicas that stay: its replica set changes in place, by Raft membership
  changes inside the group (`kvs.reconfig.shard_membership`), one node at a
  time, new members catching up from the leader's snapshot and log. The ring
  is a function of the shard ids, so when the shard count does not change no
  key moves at all: adding, removing or replacing replicas, raising or
  lowering repl-factor on the same shard count. `Plan.members` lists these
  changes.
- Only when the number of shards changes do keys move: groups left without a
  shard are new Raft groups, numbered with consecutive integers after the
  largest id ever used (`ConfigEpoch.max_shard_id`), in layout order; shards
  left without a group are retired. Ids are never reused: nodes keep a group's
  Raft journal under its id, and a retired group's journal must not become a
  new group's. The moves are exactly `moved_ranges(old ring, new ring)`,
  grouped by (old owner, new owner): a key moves iff it is in one of them.
- A replica that joins a group (new or kept) takes the lowest slot >= 1 that
  its node does not use in the current epoch. Slots fix Raft ports
  (`kvs.settings`), so a node can leave one group and join another in the same
  change, and old and new groups run side by side while keys are copied.
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
class MemberChange:
    """A kept shard whose replica set changes in place (Raft membership changes, no key moves)."""
    shard: str
    added: tuple[str, ...]           # HTTP addresses, in the new epoch's order
    removed: tuple[str, ...]         # HTTP addresses, in the current epoch's order

    def to_dict(self) -> dict:
        return {"shard": self.shard, "added": list(self.added), "removed": list(self.removed)}

    @classmethod
    def from_dict(cls, d: dict) -> "MemberChange":
        return cls(shard=str(d["shard"]), added=tuple(d["added"]), removed=tuple(d["removed"]))


@dataclass(frozen=True)
class Plan:
    epoch: ConfigEpoch               # number = current.number + 1, status = "pending"
    moves: tuple[Move, ...]          # sorted by (source, destination)
    new_groups: tuple[str, ...]      # shard ids that do not exist in the current epoch
    retired_groups: tuple[str, ...]  # shard ids of the current epoch that the new one drops
    members: tuple[MemberChange, ...] = ()   # kept shards whose replicas change, by shard id

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch.to_dict(),
            "moves": [m.to_dict() for m in self.moves],
            "new_groups": list(self.new_groups),
            "retired_groups": list(self.retired_groups),
            "members": [m.to_dict() for m in self.members],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(
            epoch=ConfigEpoch.from_dict(d["epoch"]),
            moves=tuple(Move.from_dict(m) for m in d["moves"]),
            new_groups=tuple(d["new_groups"]),
            retired_groups=tuple(d["retired_groups"]),
            members=tuple(MemberChange.from_dict(m) for m in d.get("members", ())),
        )

    def summary(self) -> dict:
        """What the plan does, for GET /kvs/view-change: in place (membership) or moving keys."""
        return {"epoch": self.epoch.number, "moves-keys": bool(self.moves), "moves": len(self.moves),
                "new-groups": list(self.new_groups), "retired-groups": list(self.retired_groups),
                "member-changes": [{"shard-id": m.shard, "add": list(m.added), "remove": list(m.removed)}
                                   for m in self.members]}


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
    """Plan adding one node, not in the view, to shard `shard_id`: a Raft membership change of the
    shard's group (it keeps its id, its ring place and its keys; the node catches up from the leader)."""
    address = _normalised(address)
    if shard_id not in current.shards:
        raise BadRequest(f"shard {shard_id} does not exist (shards: {', '.join(current.shard_ids())})")
    if address in current.view:
        raise BadRequest(f"{address} is already in the view, in shard {current.shard_of_node(address)}")
    groups = [replicas + (address,) if sid == shard_id else replicas
              for sid, replicas in _groups_in_view_order(current)]
    return plan_layout(current, groups)


def plan_remove_member(current: ConfigEpoch, address: str) -> Plan:
    """Plan taking one node, alive or dead, out of the view.

    Its shard's group shrinks by one in place (a membership change, no key moves), or, if the node
    was its only replica, the shard is retired and its keys move to the other shards.
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
    used_slots: dict[str, set[int]] = {}
    for slots in current.slots.values():
        for address, slot in slots.items():
            used_slots.setdefault(address, set()).add(slot)
    next_number = max([current.max_shard_id] + [_shard_number(sid) for sid in current.shards]) + 1
    kept = _match(current, groups)

    shards: dict[str, tuple[str, ...]] = {}
    slots: dict[str, dict[str, int]] = {}
    new_groups: list[str] = []
    members: list[MemberChange] = []
    for i, group in enumerate(groups):
        sid = kept.get(i)
        if sid is None:
            sid = str(next_number)
            next_number += 1
            new_groups.append(sid)
            slots[sid] = {a: _lowest_free_slot(used_slots.get(a, set())) for a in group}
        else:
            old = current.slots[sid]
            slots[sid] = {a: old[a] if a in old else _lowest_free_slot(used_slots.get(a, set())) for a in group}
            added = tuple(a for a in group if a not in old)
            removed = tuple(a for a in current.shards[sid] if a not in group)
            if added or removed:
                members.append(MemberChange(sid, added, removed))
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
    return Plan(epoch=epoch, moves=moves, new_groups=tuple(new_groups), retired_groups=retired,
                members=tuple(sorted(members, key=lambda m: (len(m.shard), m.shard))))


def _match(current: ConfigEpoch, groups: tuple[tuple[str, ...], ...]) -> dict[int, str]:
    """{index of a group in the layout: the current shard id it keeps}. Most shared replicas first
    (ties: layout order, then shard order), then the rest in order: each shard to one group at most."""
    order = current.shard_ids()
    replicas = {sid: set(current.shards[sid]) for sid in order}
    pairs = sorted(((len(replicas[sid].intersection(group)), i, rank)
                    for i, group in enumerate(groups) for rank, sid in enumerate(order)),
                   key=lambda p: (-p[0], p[1], p[2]))
    kept: dict[int, str] = {}
    taken: set[str] = set()
    for shared, i, rank in pairs:
        if shared and i not in kept and order[rank] not in taken:
            kept[i] = order[rank]
            taken.add(order[rank])
    rest = (sid for sid in order if sid not in taken)
    for i in range(len(groups)):
        if i not in kept:
            sid = next(rest, None)
            if sid is None:
                break
            kept[i] = sid
    return kept


def _lowest_free_slot(used: set[int]) -> int:
    slot = FIRST_SHARD_SLOT
    while slot in used:
        slot += 1
    return slot
