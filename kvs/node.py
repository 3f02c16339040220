"""Node: the groups this process hosts and the configuration it routes by.

A node that is in its VIEW joins the metadata group (Raft slot 0, every node of
the initial view is a member), proposes the initial configuration until an
epoch is committed, and then runs a replica of each shard group the newest
epoch gives it. A node whose ADDRESS is not in its VIEW stays idle: it creates
no group, contacts nobody, and answers only status requests until a view
change names it.

One supervisor thread creates and closes every replica. PySyncObj stops a
replica's tick thread when the thread that created it ends, so replicas are
never created from request threads. The supervisor wakes when the metadata
state machine applies an entry (or every `_SUPERVISE_PERIOD` to retry a
proposal) and adopts the newest epoch. Its thread is started and stopped by
the process's owner, `kvs.server.NodeServer`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from kvs.errors import NotMember
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.fsm.meta import MetadataState
from kvs.fsm.shard import ShardState
from kvs.settings import METADATA_SLOT, NodeSettings
from kvs.config.epoch import ConfigEpoch

log = logging.getLogger(__name__)

_SUPERVISE_PERIOD = 0.5


def _valid_epoch(epoch: object) -> bool:
    try:
        ConfigEpoch.from_dict(epoch)
        return True
    except Exception:           # any shape error of a damaged file
        return False


def _valid_pushed(record: object) -> bool:
    revision = record.get("revision", 0) if isinstance(record, dict) else None
    return (isinstance(record, dict) and (not record or _valid_epoch(record.get("active")))
            and (record.get("pending") is None or _valid_epoch(record["pending"]))
            and isinstance(revision, int) and not isinstance(revision, bool) and revision >= 0)


def _valid_metadata(record: object) -> bool:
    return isinstance(record, dict) and isinstance(record.get("member", True), bool) and \
        isinstance(record.get("peers", []), list) and all(isinstance(p, str) for p in record.get("peers", []))
_PUSHED_FILE = "epochs.json"
_METADATA_FILE = "metadata.json"


class Node:
    def __init__(self, settings: NodeSettings, timing: RaftTiming | None = None):
        self.settings = settings
        self._timing = timing or RaftTiming(compaction_entries=settings.compaction_entries, fsync=settings.fsync)
        self._lock = threading.Lock()
        self._groups: dict[str, RaftGroup] = {}      # shard id -> this node's replica
        self._meta: RaftGroup | None = None
        self._epoch: ConfigEpoch | None = None
        self._meta_changed = threading.Event()
        self._epoch_changed = threading.Condition()
        self._pushed: dict = self._load_json(_PUSHED_FILE, _valid_pushed)       # {"active", "pending"}
        self._metadata: dict = self._load_json(_METADATA_FILE, _valid_metadata)  # {"member", "peers"}
        # Nodes of the initial view propose the initial configuration (only the first "init" takes
        # effect, so a proposal after an epoch exists changes nothing); a node that joined the
        # metadata group later, or left it, proposes nothing.
        self._initial: dict | None = None
        if settings.is_member and self._metadata.get("member", True):
            self._initial = ConfigEpoch.initial(settings.view, settings.repl_factor).to_dict()
        self._proposal_pending = False
        self._supervisor_running = False
        self._supervisor_error: str | None = None

    # -- life cycle (threads are started and stopped by kvs.server) --------------------------------

    def supervise(self, stopping: threading.Event) -> None:
        """The supervisor thread's body: adopt epochs and run their groups until `stopping` is set.

        It wakes when the metadata state machine applies an entry, when told (`wake`), or every
        `_SUPERVISE_PERIOD` to retry. An exception in one round is logged and the next round tries
        again; /health says so meanwhile, and says when the supervisor is not running at all."""
        if not self.settings.is_member:
            log.warning("%s is not in VIEW: idle until a view change adds it", self.settings.address)
        self._supervisor_running = True
        try:
            while not stopping.is_set():
                try:
                    self._supervise_once()
                    self._supervisor_error = None
                except Exception as exc:
                    log.exception("supervisor round failed; retrying")
                    self._supervisor_error = f"{type(exc).__name__}: {exc}"
                self._meta_changed.wait(_SUPERVISE_PERIOD)
                self._meta_changed.clear()
        finally:
            # Here, not by whoever stops the node: a replica's tick thread ends, without closing its
            # files and sockets, as soon as the thread that created it (this one) has ended.
            for group in self._all_groups():
                group.close()
            self._supervisor_running = False

    def wake(self) -> None:
        """Make the supervisor run a round now (at stop, or when something changed)."""
        self._meta_changed.set()

    def _supervise_once(self) -> None:
        self._follow_metadata_membership()
        active, pending = self._pushed.get("active"), self._pushed.get("pending")
        if self._meta is not None:
            state: MetadataState = self._meta.state
            if self._initial is not None and state.active_number == 0 and not self._proposal_pending:
                self._proposal_pending = True

                def proposed(result: object, error: int) -> None:
                    self._proposal_pending = False
                    self._meta_changed.set()

                self._meta.propose(("init", self._initial), proposed)
            if state.active_epoch() and (not active or state.active_number >= active["number"]):
                active = state.active_epoch()
            change = state.change()
            if change is not None and change["phase"] != "committed":
                pending = change["plan"]["epoch"]
            elif change is None and pending and active and pending["number"] <= active["number"]:
                pending = None
        self._reconcile(active, pending)

    def _follow_metadata_membership(self) -> None:
        """Open or close this node's metadata replica as it was told; remember the members it sees."""
        s = self.settings
        member = self._metadata.get("member", s.is_member)
        if member and self._meta is None:
            peers = self._metadata.get("peers") or [s.raft_address(a, METADATA_SLOT) for a in s.view]
            self._meta = RaftGroup("meta", s.raft_address(s.address, METADATA_SLOT), peers, MetadataState(),
                                   os.path.join(s.data_dir, "meta"), s.secret, self._timing,
                                   on_applied=self._meta_changed.set, bind_host=s.bind_host)
        elif not member and self._meta is not None:
            log.info("%s leaves the metadata group", s.address)
            meta, self._meta = self._meta, None
            meta.close()
        if self._meta is not None:
            peers = self._meta.members()
            if self._metadata.get("peers") != peers:
                self._save_metadata({"member": True, "peers": peers})

    def set_metadata_membership(self, member: bool, peers: list[str]) -> None:
        """Told by the metadata leader: join (with these members, Raft addresses) or leave."""
        if member and self._meta is not None:
            return                              # already in: its own replica tracks the members
        self._save_metadata({"member": member, "peers": list(peers)})
        self._meta_changed.set()

    def _save_metadata(self, record: dict) -> None:
        with self._lock:
            self._metadata = record
            self._write_json(_METADATA_FILE, record)

    def _reconcile(self, active: dict | None, pending: dict | None) -> None:
        """Run the groups of the active and pending epochs, and only those.

        Groups of neither are closed first, before any new group starts: a plan that was rolled back
        (or one this node only heard of from a lagging member) may have put a group on the Raft slot
        that the next plan gives to another group, and two groups must never share a port."""
        adopt = None
        if active is not None and (self._epoch is None or active["number"] > self._epoch.number):
            adopt = ConfigEpoch.from_dict(active)
        upcoming = ConfigEpoch.from_dict(pending) if pending is not None else None
        wanted = [e for e in (adopt or self._epoch, upcoming) if e is not None]
        if wanted:
            keep = {sid for e in wanted for sid, replicas in e.shards.items() if self.settings.address in replicas}
            with self._lock:
                retired = {sid: g for sid, g in self._groups.items() if sid not in keep}
                for sid in retired:
                    del self._groups[sid]
            for sid, group in retired.items():
                log.info("%s retires its replica of shard %s", self.settings.address, sid)
                group.close()
        if adopt is not None:
            self._start_groups(adopt)
            with self._epoch_changed:
                self._epoch = adopt
                self._epoch_changed.notify_all()
            log.info("%s adopted epoch %d", self.settings.address, adopt.number)
        if upcoming is not None:
            self._start_groups(upcoming)

    def _start_groups(self, epoch: ConfigEpoch) -> None:
        s = self.settings
        for shard_id, replicas in epoch.shards.items():
            if s.address not in replicas or self.group(shard_id) is not None:
                continue
            slot = epoch.slot(shard_id, s.address)
            peers = [s.raft_address(a, epoch.slot(shard_id, a)) for a in replicas]
            # The group's starting ownership is its creation epoch's, not the one this node happens to know
            # now: a replica re-created later replays the same log from the same state as its peers.
            origin_number, origin_ring = epoch.origin(shard_id)
            ownership = (origin_number, shard_id, origin_ring)
            group = RaftGroup(f"shard-{shard_id}", s.raft_address(s.address, slot), peers, ShardState(ownership),
                              os.path.join(s.data_dir, f"shard-{shard_id}"), s.secret, self._timing,
                              bind_host=s.bind_host)
            with self._lock:
                self._groups[shard_id] = group

    # -- epochs pushed by a view change coordinator ---------------------------------------

    def learn(self, active: dict, pending: dict | None, revision: int = 0) -> None:
        """Take epochs from a coordinator or a metadata member (for nodes outside the metadata group);
        kept on disk. Older news than this node has (a lower revision) is ignored."""
        with self._lock:
            known = self._pushed.get("active")
            if known is not None and active["number"] < known["number"]:
                return
            if revision < self._pushed.get("revision", 0):
                return
            self._pushed = {"active": active, "pending": pending, "revision": revision}
            self._write_json(_PUSHED_FILE, self._pushed)
        self._meta_changed.set()

    def _write_json(self, name: str, record: dict) -> None:
        os.makedirs(self.settings.data_dir, exist_ok=True)
        path = os.path.join(self.settings.data_dir, name)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    def _load_json(self, name: str, valid) -> dict:
        """A record this node wrote before; a damaged one is set aside (logged), never a crash loop."""
        path = os.path.join(self.settings.data_dir, name)
        try:
            with open(path) as f:
                record = json.load(f)
            if valid(record):
                return record
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError):
            pass
        log.error("%s is damaged; it is set aside as %s.bad and ignored (the node learns again from its "
                  "peers)", path, name)
        os.replace(path, path + ".bad")
        return {}

    @property
    def pushed_pending(self) -> dict | None:
        return self._pushed.get("pending")

    @property
    def pushed_revision(self) -> int:
        return self._pushed.get("revision", 0)

    def decisions(self) -> tuple[int, dict | None, dict | None] | None:
        """(revision, active, pending) as this node's metadata replica knows them; None on non-members."""
        meta = self._meta
        return meta.state.decisions() if meta is not None else None

    @property
    def has_metadata_replica(self) -> bool:
        return self._meta is not None

    @property
    def metadata_group(self) -> RaftGroup | None:
        return self._meta

    def change(self) -> dict | None:
        """The view change in progress as the metadata group records it (members only)."""
        meta = self._meta
        return meta.state.change() if meta is not None else None

    def meta_epoch(self, number: int) -> ConfigEpoch | None:
        meta = self._meta
        epoch = meta.state.epoch(number) if meta is not None else None
        return ConfigEpoch.from_dict(epoch) if epoch is not None else None

    def shard_id_floor(self) -> int:
        """The largest shard id the metadata group has seen in any plan (0 on non-members)."""
        meta = self._meta
        return meta.state.max_shard_id if meta is not None else 0

    def propose_meta(self, command: tuple, deadline: float) -> object:
        meta = self._meta
        if meta is None:
            raise NotMember("this node is not a member of the metadata group")
        return meta.execute(command, deadline)

    # -- what routing reads --------------------------------------------------------------

    @property
    def epoch(self) -> ConfigEpoch | None:
        return self._epoch

    def wait_for_epoch(self, number: int, deadline: float) -> bool:
        """Block until this node knows epoch `number` (or newer); False at the deadline."""
        with self._epoch_changed:
            return self._epoch_changed.wait_for(
                lambda: self._epoch is not None and self._epoch.number >= number,
                timeout=max(0.0, deadline - time.monotonic()))

    def group(self, shard_id: str) -> RaftGroup | None:
        with self._lock:
            return self._groups.get(shard_id)

    def own_shard(self) -> str | None:
        epoch = self._epoch
        return epoch.shard_of_node(self.settings.address) if epoch is not None else None

    def leader_address(self, shard_id: str) -> str | None:
        """HTTP address of the shard's leader as this node's replica sees it (a hint)."""
        group, epoch = self.group(shard_id), self._epoch
        if group is None or epoch is None:
            return None
        leader = group.leader()
        for address in epoch.replicas(shard_id):
            if self.settings.raft_address(address, epoch.slot(shard_id, address)) == leader:
                return address
        return None

    def trusts_host(self, host: str) -> bool:
        """Whether `host` is the host of a node this node knows: its VIEW, the active and pending
        epochs' views, the metadata members (node-to-node requests of an unsecured cluster)."""
        known = set(self.settings.view) | {self.settings.address}
        epoch = self._epoch
        if epoch is not None:
            known.update(epoch.view)
            known.update(epoch.metadata_members)
        pending = self._pushed.get("pending") or {}
        known.update(pending.get("view") or ())
        return host in {address.rsplit(":", 1)[0] for address in known}

    def hosted_groups(self) -> list[RaftGroup]:
        """This node's shard replicas (not the metadata replica)."""
        with self._lock:
            return list(self._groups.values())

    def _all_groups(self) -> list[RaftGroup]:
        with self._lock:
            groups = list(self._groups.values())
        return groups + ([self._meta] if self._meta is not None else [])

    # -- status and health -----------------------------------------------------------------

    def status(self, digest: bool = False) -> dict:
        """This node's view; with `digest`, each shard replica's key count and data digest (costly)."""
        epoch = self._epoch
        groups = {}
        meta = self._meta
        if meta is not None:
            groups["meta"] = meta.status()
        with self._lock:
            shard_groups = dict(self._groups)
        for shard_id, group in sorted(shard_groups.items()):
            groups[f"shard-{shard_id}"] = group.status()
            if digest:
                groups[f"shard-{shard_id}"].update({"key-count": group.state.key_count(),
                                                    "digest": group.state.digest()})
        return {
            "address": self.settings.address,
            "member": self.settings.is_member or (epoch is not None and self.settings.address in epoch.view),
            "epoch": epoch.number if epoch is not None else None,
            "shard-id": self.own_shard(),
            "secured": self.settings.secured,
            "groups": groups,
        }

    def health(self) -> tuple[bool, str]:
        """(ready, reason): ready once the configuration is known and every hosted group has a leader,
        and while the supervisor runs and its last round succeeded."""
        if not self._supervisor_running:
            return False, "the supervisor is not running: this node adopts no new configuration"
        if self._supervisor_error is not None:
            return False, f"the supervisor is failing: {self._supervisor_error}"
        if self._epoch is None:
            if not self.settings.is_member and self._meta is None:
                return False, "idle: this node is not in any configuration"
            return False, "the cluster configuration is not known yet"
        for group in self._all_groups():
            if group.leader() is None:
                return False, f"group {group.name} has no leader"
        own = self.own_shard()
        if own is not None and self.group(own) is None:
            return False, f"the replica of shard {own} is not running yet"
        return True, "ok"
