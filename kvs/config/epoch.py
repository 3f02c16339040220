"""ConfigEpoch: one numbered cluster configuration, the shared vocabulary of kvs.

An epoch says which nodes are in the view, the replication factor, which
replicas (HTTP addresses) form each shard group, in which Raft slot each
replica of a group runs on its node (so Raft ports are known to everyone, see
`kvs.settings`), the hash ring that maps keys to shard ids, and the members of
the metadata group. Epochs are committed only through the metadata group
(`kvs.fsm.meta`) and stored there as plain dicts, so that what goes into
the Raft log is plain data, not pickled classes.

The initial layout is a pure function of VIEW and REPL_FACTOR, so every node
computes the same one: VIEW order is kept and cut into consecutive blocks of
REPL_FACTOR nodes, shard "1" first. Later epochs may have groups of unequal
sizes (a node added to or removed from one shard, `kvs.reconfig.planner`):
`repl_factor` is then the size of the smallest group, the replication every
key is guaranteed, and `view` lists the groups' replicas group after group.

Every node of the initial view is a member of the metadata group: a Raft group
of all N nodes survives the loss of any minority of the nodes, which no smaller
subset does for every N.

Epochs arrive from peers (POST /internal/epochs) and from the node's own files,
so `from_dict` accepts only a dict that this code could have made (the rules are
`_check_epoch`'s, each one something `initial` and `kvs.reconfig.planner` always
guarantee) and raises `InvalidEpoch` otherwise, before it builds anything: a
number given as "99" was once stored and then failed every supervisor round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvs.errors import BadRequest
from kvs.settings import MAX_VIEW_NODES, normalize_address
from kvs.config.ring import DEFAULT_VNODES, HashRing

FIRST_SHARD_SLOT = 1
# What a valid epoch may hold (`_check_epoch`):
MAX_NUMBER = 2**63                  # epoch numbers, origin numbers, max_shard_id and shard ids stay below it
# The code makes rings of at most DEFAULT_VNODES (1024) per group (`ring_vnodes` only lowers it); 4096 leaves
# room and is the cap `kvs.fsm.commands.check_ring` puts on rings in commands. Checked before a ring is
# built: a ring of 2,000,000 vnodes took 22 s of CPU.
MAX_VNODES = 4096
# groups * vnodes of one ring: the largest the code builds is an initial view of MAX_VIEW_NODES one-replica
# shards at DEFAULT_VNODES (about 10 s to build; the planner keeps later rings near ring.TOKEN_BUDGET).
MAX_RING_TOKENS = MAX_VIEW_NODES * DEFAULT_VNODES
# A replica in slot k listens on http_port + offset * (k + 1) (`kvs.settings`): no larger slot has a port.
MAX_SLOT = 65535
# "active": `initial` and committed epochs; "pending": a plan (`kvs.reconfig.planner`); "unwinding": a plan
# being rolled back (`kvs.fsm.meta`).
STATUSES = ("active", "pending", "unwinding")
# Shard ids are the decimal numbers 1, 2, ... (`initial`, the planner); they also name the directories
# DATA_DIR/shard-<id>, which nodes delete when a group retires: nothing else may pass for one.
_SHARD_ID = re.compile(r"[1-9][0-9]{0,18}")
_REQUIRED = ("number", "view", "repl_factor", "shards", "slots", "ring", "metadata_members")


class InvalidEpoch(ValueError):
    """A dict that is not an epoch this code could have made; the message says why."""


@dataclass(frozen=True)
class ConfigEpoch:
    number: int
    view: tuple[str, ...]
    repl_factor: int                            # replicas of the smallest shard
    shards: dict[str, tuple[str, ...]]          # shard id -> replica HTTP addresses
    slots: dict[str, dict[str, int]]            # shard id -> {replica address: Raft slot}
    ring: HashRing
    metadata_members: tuple[str, ...]
    status: str = "active"
    # The largest shard id any epoch so far has used. New groups are numbered after it, never after the
    # largest current id only: a retired group's id, and with it the Raft journal its nodes keep in
    # DATA_DIR/shard-<id>, must never come back as a new group. 0 (older epochs): the largest current id.
    max_shard_id: int = 0
    # shard id -> (number, ring dict) of the epoch that created the group. Every replica starts its state
    # machine with that ownership, whenever it is created or re-created, so that replaying the group's
    # log gives the same state on every replica (the log's "own" entries move it on from there).
    # Missing (older epochs): this epoch's own number and ring.
    origins: dict[str, tuple[int, dict]] = field(default_factory=dict)
    _shard_by_node: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for shard_id, replicas in self.shards.items():
            for address in replicas:
                self._shard_by_node.setdefault(address, shard_id)

    # -- construction --------------------------------------------------------

    @classmethod
    def initial(cls, view: tuple[str, ...], repl_factor: int, vnodes: int = DEFAULT_VNODES) -> "ConfigEpoch":
        if not view:
            raise BadRequest("the view is empty")
        if repl_factor < 1 or len(view) % repl_factor:
            raise BadRequest(f"{len(view)} nodes is not a multiple of repl-factor {repl_factor}")
        count = len(view) // repl_factor
        shards = {str(i + 1): tuple(view[i * repl_factor:(i + 1) * repl_factor]) for i in range(count)}
        slots = {sid: {address: FIRST_SHARD_SLOT for address in replicas} for sid, replicas in shards.items()}
        ring = HashRing(shards.keys(), vnodes)      # once, not once more per shard (quadratic in shards)
        return cls(
            number=1,
            view=tuple(view),
            repl_factor=repl_factor,
            shards=shards,
            slots=slots,
            ring=ring,
            metadata_members=tuple(view),
            max_shard_id=count,
            origins={sid: (1, ring.to_dict()) for sid in shards},
        )

    def to_dict(self) -> dict:
        return {
            "number": self.number,
            "view": list(self.view),
            "repl_factor": self.repl_factor,
            "shards": {sid: list(replicas) for sid, replicas in self.shards.items()},
            "slots": {sid: dict(s) for sid, s in self.slots.items()},
            "ring": self.ring.to_dict(),
            "metadata_members": list(self.metadata_members),
            "status": self.status,
            "max_shard_id": self.max_shard_id,
            "origins": {sid: [number, ring] for sid, (number, ring) in self.origins.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ConfigEpoch":
        """The epoch `to_dict` gave `d` (older epochs: without max_shard_id and origins); InvalidEpoch (a
        ValueError) with the reason unless `d` passes every rule of `_check_epoch`, checked before the
        ring is built."""
        _check_epoch(d)
        return cls(
            number=d["number"],
            view=tuple(d["view"]),
            repl_factor=d["repl_factor"],
            shards={sid: tuple(replicas) for sid, replicas in d["shards"].items()},
            slots={sid: dict(s) for sid, s in d["slots"].items()},
            ring=HashRing.from_dict(d["ring"]),
            metadata_members=tuple(d["metadata_members"]),
            status=d.get("status", "active"),
            max_shard_id=d.get("max_shard_id", 0),
            origins={sid: (number, ring) for sid, (number, ring) in d.get("origins", {}).items()},
        )

    # -- queries -------------------------------------------------------------

    def origin(self, shard_id: str) -> tuple[int, dict]:
        """(epoch number, ring dict) the group of `shard_id` was created with."""
        return self.origins.get(shard_id) or (self.number, self.ring.to_dict())

    def shard_ids(self) -> list[str]:
        return sorted(self.shards, key=lambda s: (len(s), s))

    def shard_for_key(self, key: str) -> str:
        return self.ring.group_for(key)

    def shard_of_node(self, address: str) -> str | None:
        return self._shard_by_node.get(address)

    def replicas(self, shard_id: str) -> tuple[str, ...]:
        return self.shards[shard_id]

    def slot(self, shard_id: str, address: str) -> int:
        return self.slots[shard_id][address]


# -- validation of epochs from peers and files ------------------------------------------------------


def _check_epoch(d: object) -> None:
    """Raise InvalidEpoch unless `d` is an epoch dict that `initial` or the planner could have made:

    - number: an int, 1 <= number < 2**63 (initial: 1; a plan: the current one + 1).
    - view: 1 to MAX_VIEW_NODES distinct addresses, each in its normalised form (`parse_view` and the
      planner normalise every address and refuse longer views); metadata_members likewise (it is the view).
    - shards: 1 or more ids (`_SHARD_ID`) of non-empty replica lists; every node of the view is a replica
      of exactly one shard and every replica is in the view (the view is the groups one after another).
    - repl_factor: the size of the smallest shard (initial: every shard's; the planner: the minimum).
    - slots: exactly the shards' ids, each mapping exactly its replicas to 1 <= slot <= MAX_SLOT.
    - ring: {"groups": the shard ids, "vnodes": 1..MAX_VNODES}, groups * vnodes <= MAX_RING_TOKENS.
    - status: one of STATUSES (default "active").
    - max_shard_id: an int >= 0, and unless 0 (older epochs) >= every shard id (new ids follow it).
    - origins: shard ids of this epoch -> [number, ring]: 1 <= number <= this epoch's number (the epoch
      that created the group: this one or an older one), a ring as above that has the shard.
    """
    _check(isinstance(d, dict), f"an epoch must be a JSON object, not {_show(d)}")
    missing = [key for key in _REQUIRED if key not in d]
    _check(not missing, f"an epoch needs {', '.join(missing)}")
    number = _int(d["number"], "number", 1, MAX_NUMBER)
    view = _addresses(d["view"], "view")
    shards = _shards(d["shards"], view)
    smallest = min(len(replicas) for replicas in shards.values())
    repl_factor = _int(d["repl_factor"], "repl_factor", 1, MAX_NUMBER)
    _check(repl_factor == smallest, f"repl_factor must be {smallest} (the smallest shard's size), not {repl_factor}")
    _slots(d["slots"], shards)
    _check(set(_ring(d["ring"], "ring")) == shards.keys(), "the ring's groups must be the shard ids")
    _addresses(d["metadata_members"], "metadata_members")
    _check(d.get("status", "active") in STATUSES,
           f"status must be one of {', '.join(STATUSES)}, not {_show(d.get('status'))}")
    max_shard_id = _int(d.get("max_shard_id", 0), "max_shard_id", 0, MAX_NUMBER)
    largest = max(int(sid) for sid in shards)
    _check(max_shard_id == 0 or max_shard_id >= largest, f"max_shard_id {max_shard_id} is below shard id {largest}")
    origins = d.get("origins", {})
    _check(isinstance(origins, dict) and all(sid in shards for sid in origins),
           "origins must be an object whose keys are shard ids of this epoch")
    checked = None                      # the last origin ring checked: shards created together share one
    for sid, origin in origins.items():
        what = f"the origin of shard {sid}"
        _check(isinstance(origin, (list, tuple)) and len(origin) == 2, f"{what} must be [number, ring]")
        _int(origin[0], f"{what}'s number", 1, number + 1)
        if origin[1] != checked:
            _ring(origin[1], f"{what}'s ring")
            checked = origin[1]
        _check(sid in origin[1]["groups"], f"{what}'s ring must have the shard")


def _shards(shards: object, view: tuple[str, ...]) -> dict:
    _check(isinstance(shards, dict) and 0 < len(shards) <= len(view),
           f"shards must be an object of 1 to {len(view)} shards (the view's size), not {_show(shards)}")
    placed = 0
    for sid, replicas in shards.items():
        _shard_id(sid, "shards")
        _check(isinstance(replicas, (list, tuple)) and replicas and all(isinstance(a, str) for a in replicas),
               f"shard {sid} must have a non-empty list of replica addresses, not {_show(replicas)}")
        placed += len(replicas)
        _check(placed <= len(view), "the shards have more replicas than the view has nodes")
    _check(placed == len(view) and {a for replicas in shards.values() for a in replicas} == set(view),
           "every node of the view must be a replica of exactly one shard, and every replica in the view")
    return shards


def _slots(slots: object, shards: dict) -> None:
    _check(isinstance(slots, dict) and slots.keys() == shards.keys(), "slots must have exactly the shards' ids")
    for sid, by_address in slots.items():
        _check(isinstance(by_address, dict) and by_address.keys() == set(shards[sid]),
               f"the slots of shard {sid} must name exactly its replicas")
        for address, slot in by_address.items():
            if not (type(slot) is int and FIRST_SHARD_SLOT <= slot <= MAX_SLOT):
                _int(slot, f"the slot of {address} in shard {sid}", FIRST_SHARD_SLOT, MAX_SLOT + 1)


def _ring(ring: object, what: str) -> list:
    """The groups of a ring dict, once it is one `HashRing.from_dict` can build in bounded time."""
    _check(isinstance(ring, dict) and ring.keys() == {"groups", "vnodes"},
           f'{what} must be {{"groups": [shard ids], "vnodes": n}}, not {_show(ring)}')
    groups = ring["groups"]
    _check(isinstance(groups, (list, tuple)) and 0 < len(groups) <= MAX_VIEW_NODES,
           f"{what}'s groups must be a list of 1 to {MAX_VIEW_NODES} shard ids, not {_show(groups)}")
    for sid in groups:
        _shard_id(sid, f"{what}'s groups")
    _check(len(set(groups)) == len(groups), f"{what} has a group twice")
    vnodes = _int(ring["vnodes"], f"{what}'s vnodes", 1, MAX_VNODES + 1)
    _check(len(groups) * vnodes <= MAX_RING_TOKENS,
           f"{what} has {len(groups)} groups of {vnodes} vnodes: more than {MAX_RING_TOKENS} tokens")
    return list(groups)


def _addresses(value: object, what: str) -> tuple[str, ...]:
    _check(isinstance(value, (list, tuple)) and 0 < len(value) <= MAX_VIEW_NODES,
           f"{what} must be a list of 1 to {MAX_VIEW_NODES} addresses, not {_show(value)}")
    for address in value:
        if not _normalised(address):
            raise InvalidEpoch(f"{what}: {_show(address)} is not an address in the form host:port")
    _check(len(set(value)) == len(value), f"{what} names a node twice")
    return tuple(value)


def _normalised(address: object) -> bool:
    try:
        return isinstance(address, str) and normalize_address(address) == address
    except BadRequest:
        return False


def _shard_id(sid: object, what: str) -> None:
    if not (isinstance(sid, str) and _SHARD_ID.fullmatch(sid) is not None and int(sid) < MAX_NUMBER):
        raise InvalidEpoch(f"{what}: {_show(sid)} is not a shard id (a decimal number from 1)")


def _int(value: object, what: str, low: int, high: int) -> int:
    """`value` if it is an int (not a bool) with low <= value < high."""
    if not (type(value) is int and low <= value < high):
        raise InvalidEpoch(f"{what} must be an integer from {low} to {high - 1}, not {_show(value)}")
    return value


def _check(ok: bool, message: str) -> None:
    """Raise InvalidEpoch(message) unless ok (loops test first and format their message only on failure)."""
    if not ok:
        raise InvalidEpoch(message)


def _show(value: object) -> str:
    """A short description of `value` for a message, cheap whatever its size."""
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)}"
    if type(value) is int and not -2**64 < value < 2**64:
        return "a huge integer"
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    return repr(value) if isinstance(value, (int, float, bool, type(None))) else type(value).__name__
