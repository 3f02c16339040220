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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvs.errors import BadRequest
from kvs.config.ring import DEFAULT_VNODES, HashRing

FIRST_SHARD_SLOT = 1


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
        return cls(
            number=1,
            view=tuple(view),
            repl_factor=repl_factor,
            shards=shards,
            slots=slots,
            ring=HashRing(shards.keys(), vnodes),
            metadata_members=tuple(view),
            max_shard_id=count,
            origins={sid: (1, HashRing(shards.keys(), vnodes).to_dict()) for sid in shards},
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
        return cls(
            number=int(d["number"]),
            view=tuple(d["view"]),
            repl_factor=int(d["repl_factor"]),
            shards={sid: tuple(replicas) for sid, replicas in d["shards"].items()},
            slots={sid: dict(s) for sid, s in d["slots"].items()},
            ring=HashRing.from_dict(d["ring"]),
            metadata_members=tuple(d["metadata_members"]),
            status=d.get("status", "active"),
            max_shard_id=int(d.get("max_shard_id", 0)),
            origins={sid: (int(number), ring) for sid, (number, ring) in d.get("origins", {}).items()},
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
