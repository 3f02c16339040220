"""Node: the groups this process hosts and the configuration it routes by.

A node that is in its VIEW joins the metadata group (Raft slot 0, every node of the initial view is a
member), proposes the initial configuration until an epoch is committed, and then runs a replica of
each shard group the newest epoch gives it. A node whose ADDRESS is not in its VIEW stays idle: it
creates no group, contacts nobody, and answers only status requests until a view change names it.

One supervisor thread creates and closes every replica. PySyncObj stops a replica's tick thread when
the thread that created it ends, so replicas are never created from request threads. The supervisor
wakes when the metadata state machine applies an entry (or every `_SUPERVISE_PERIOD` to retry a
proposal) and adopts the newest epoch. Its thread is started and stopped by the process's owner,
`kvs.server.NodeServer`. It also closes a group whose journal failed (a full disk) and reopens it
from disk once the disk takes writes again (`kvs.raft.recovery`); the node's other groups run on.
"""

from __future__ import annotations

import logging
import threading
import time

from kvs.errors import NotMember
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.hosting import METADATA_GROUP, GroupFactory
from kvs.raft.recovery import GroupRecovery
from kvs.fsm.meta import MetadataState
from kvs.settings import NodeSettings
from kvs.config.epoch import ConfigEpoch
from kvs.config.records import METADATA_FILE, EpochNews, load_record, valid_metadata, write_record
from kvs.node.metrics import LeaderWatch
from kvs.node.status import describe, liveness, readiness
from kvs.node.trust import HostTrust

log = logging.getLogger(__name__)

_SUPERVISE_PERIOD = 0.5
_META = METADATA_GROUP      # the metadata group's key in the recovery (shard ids are numbers)


class Node:
    def __init__(self, settings: NodeSettings, timing: RaftTiming | None = None, loop: object = None):
        self.settings = settings
        self._timing = timing or RaftTiming(compaction_entries=settings.compaction_entries, fsync=settings.fsync)
        self._lock = threading.Lock()
        self._groups: dict[str, RaftGroup] = {}      # shard id -> this node's replica
        self._meta: RaftGroup | None = None
        self._epoch: ConfigEpoch | None = None
        self._pending: ConfigEpoch | None = None        # the plan of a change in progress, if any
        self._directories = threading.Lock()     # a replica is started, or its directory deleted, under it
        self._meta_changed = threading.Event()
        self._epoch_changed = threading.Condition()
        self._news = EpochNews(settings.data_dir)          # epochs pushed to this node
        self._metadata: dict = load_record(settings.data_dir, METADATA_FILE, valid_metadata)  # {"member", "peers"}
        # Nodes of the initial view propose the initial configuration (only the first "init" takes effect,
        # so a proposal after an epoch exists changes nothing); one that joined or left later proposes nothing.
        self._initial: dict | None = None
        if settings.is_member and self._metadata.get("member", True):
            self._initial = ConfigEpoch.initial(settings.view, settings.repl_factor).to_dict()
        self._proposal_pending = False
        self._leaders = LeaderWatch()                   # leader changes, sampled every round (metrics)
        self._supervisor_running = False
        self._supervisor_error: str | None = None
        self._build = GroupFactory(settings, self._timing, on_metadata_applied=self._meta_changed.set, loop=loop)
        self._recovery = GroupRecovery()     # groups whose journal failed, closed until their disk heals
        self._trust = HostTrust(self._known_addresses())

    # -- life cycle (threads are started and stopped by kvs.server) --------------------------------

    def supervise(self, stopping: threading.Event) -> None:
        """The supervisor thread's body: adopt epochs and run their groups until `stopping` is set.

        It wakes when the metadata state machine applies an entry, when told (`wake`), or every
        `_SUPERVISE_PERIOD` to retry. An exception in one round is logged and the next round tries again;
        /health says so meanwhile, and says when the supervisor is not running at all."""
        if not self.settings.is_member:
            log.warning("%s is not in VIEW: idle until a view change adds it", self.settings.address)
        self._supervisor_running = True
        try:
            while not stopping.is_set():
                try:
                    self._supervise_once()
                    self._trust.refresh(self._known_addresses())
                    self._leaders.sample(self.all_groups())
                    self._supervisor_error = None
                except Exception as exc:
                    log.exception("supervisor round failed; retrying")
                    self._supervisor_error = f"{type(exc).__name__}: {exc}"
                self._meta_changed.wait(_SUPERVISE_PERIOD)
                self._meta_changed.clear()
        finally:
            # Here, not by whoever stops the node: a replica's tick thread ends, without closing its
            # files and sockets, as soon as the thread that created it (this one) has ended.
            for group in self.all_groups():
                group.close()
            self._supervisor_running = False

    def wake(self) -> None:
        """Make the supervisor run a round now (at stop, or when something changed)."""
        self._meta_changed.set()

    def _supervise_once(self) -> None:
        self._close_halted_groups()
        self._follow_metadata_membership()
        active, pending = self._news.active, self._news.pending
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
                pending = state.decisions()[2]          # the plan's epoch ("pending" or "unwinding")
            elif change is None and pending and active and pending["number"] <= active["number"]:
                pending = None
        self._reconcile(active, pending)
        self._promote_learners()
        self._reopen_healed_groups(pending)     # after: a slot's retired group is closed first (_reconcile)

    # -- groups whose journal failed (a full disk, EIO): closed, reopened from disk (kvs.raft.recovery) --

    def _close_halted_groups(self) -> None:
        with self._lock:
            halted = {sid: g for sid, g in self._groups.items() if g.failure is not None}
        if self._meta is not None and self._meta.failure is not None:
            halted[_META] = self._meta
        if not halted:
            return
        for key, group in halted.items():
            self._recovery.take(key, group)         # listed as down before it leaves this node's groups
        with self._lock:
            self._groups = {sid: g for sid, g in self._groups.items() if sid not in halted}
        if _META in halted:
            self._meta = None

    def _reopen_healed_groups(self, pending: dict | None) -> None:
        """Take back the halted groups the recovery reopened: those the epochs this node runs still give it."""
        if not self._recovery.holds_any():
            return
        epochs = [e for e in (self._epoch, ConfigEpoch.from_dict(pending) if pending else None) if e is not None]

        def reopen(key: str) -> RaftGroup | None:
            if key == _META:
                member = self._metadata.get("member", self.settings.is_member)
                return self._build.metadata_group(self._metadata.get("peers")) if member else None
            epoch = next((e for e in epochs if self.settings.address in e.shards.get(key, ())), None)
            # with the active epoch: a replica it does not list reopens as a learner, as it started
            return self._build.shard_group(epoch, key, self._epoch) if epoch is not None else None

        for key, group in self._recovery.reopen_due(reopen).items():
            with self._lock:
                if key == _META:
                    self._meta = group
                else:
                    self._groups[key] = group

    def _follow_metadata_membership(self) -> None:
        """Open or close this node's metadata replica as it was told; remember the members it sees."""
        s = self.settings
        member = self._metadata.get("member", s.is_member)
        if member and self._meta is None and not self._recovery.holds(_META):
            self._meta = self._build.metadata_group(self._metadata.get("peers"))
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
            write_record(self.settings.data_dir, METADATA_FILE, record)

    def _reconcile(self, active: dict | None, pending: dict | None) -> None:
        """Run the groups of the active and pending epochs, and only those.

        Groups of neither are closed first, before any new group starts: a plan that was rolled back
        (or one this node only heard of from a lagging member) may have put a group on the Raft slot
        that the next plan gives to another group, and two groups must never share a port."""
        adopt = None
        if active is not None and (self._epoch is None or active["number"] > self._epoch.number):
            adopt = ConfigEpoch.from_dict(active)
        upcoming = ConfigEpoch.from_dict(pending) if pending is not None else None
        self._pending = upcoming
        wanted = [e for e in (adopt or self._epoch, upcoming) if e is not None]
        if wanted:
            keep = {sid for e in wanted for sid, replicas in e.shards.items() if self.settings.address in replicas}
            with self._lock:
                retired = {sid: g for sid, g in self._groups.items() if sid not in keep}
                for sid in retired:
                    del self._groups[sid]
            with self._directories:             # not while the janitor may delete its directory
                for sid, group in retired.items():
                    log.info("%s retires its replica of shard %s", self.settings.address, sid)
                    group.close()
                    self._build.mark_retired(sid)
        if adopt is not None:
            self._start_groups(adopt, self._epoch)
            with self._epoch_changed:
                self._epoch = adopt
                self._epoch_changed.notify_all()
            log.info("%s adopted epoch %d", self.settings.address, adopt.number)
        if upcoming is not None:
            self._start_groups(upcoming, self._epoch)

    def _start_groups(self, epoch: ConfigEpoch, current: ConfigEpoch | None) -> None:
        s = self.settings
        for shard_id, replicas in epoch.shards.items():
            if s.address not in replicas or shard_id in self.shard_groups() or self._recovery.holds(shard_id):
                continue                # (a halted one is reopened by the recovery, after a disk probe)
            with self._directories:
                group = self._build.shard_group(epoch, shard_id, current)
                with self._lock:
                    self._groups[shard_id] = group

    def _promote_learners(self) -> None:
        """Reopen as a voting replica, on the same directory, each learner that its group's configuration
        now names (`kvs.raft.replica`, change 5): until then it receives the log but cannot vote."""
        epochs = [e for e in (self._pending, self._epoch) if e is not None]
        for shard_id, learner in self.shard_groups().items():
            epoch = next((e for e in epochs if self.settings.address in e.shards.get(shard_id, ())), None)
            if not learner.promoted or epoch is None:
                continue
            members = learner.members()
            log.info("%s: its learner of shard %s is a member now; reopening it as a voter", self.settings.address,
                     shard_id)
            with self._directories:
                with self._lock:
                    del self._groups[shard_id]      # should the reopening fail, the next round starts it again
                learner.close()
                voter = self._build.shard_group(epoch, shard_id, promoted_members=members)
                with self._lock:
                    self._groups[shard_id] = voter

    def delete_replica_directory(self, shard_id: str) -> bool:
        """Delete this node's directory of `shard_id` unless it runs (or holds, halted) a replica of it;
        the caller has made sure that the latest decided epochs give it none (kvs.reconfig.shard_membership)."""
        with self._directories:
            if shard_id in self.shard_groups() or self._recovery.holds(shard_id):
                return False
            self._build.delete_shard_directory(shard_id)
            return True

    def replica_directories(self) -> list[str]:
        """Shard ids of the replica directories in DATA_DIR, run or not."""
        return self._build.shard_directories()

    # -- epochs pushed by a view change coordinator ---------------------------------------

    def learn(self, active: dict, pending: dict | None, revision: int = 0) -> None:
        """Take epochs from a coordinator or a metadata member (for nodes outside the metadata group);
        kept on disk, newest news only (`EpochNews`)."""
        if self._news.learn(active, pending, revision):
            self._meta_changed.set()

    @property
    def pushed_pending(self) -> dict | None:
        return self._news.pending

    @property
    def pushed_revision(self) -> int:
        return self._news.revision

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

    def committed_configuration(self, deadline: float) -> tuple[dict | None, dict | None, int]:
        """(active epoch, change in progress, largest shard id of any plan) once this metadata replica
        holds every decision committed before the call (a ReadIndex round): one that restarted and still
        replays its log must not answer from an older epoch. NotMember on other nodes."""
        return self._member_meta().read(lambda state: (state.active_epoch(), state.change(),
                                                       state.max_shard_id), deadline)

    def meta_epoch(self, number: int) -> ConfigEpoch | None:
        meta = self._meta
        epoch = meta.state.epoch(number) if meta is not None else None
        return ConfigEpoch.from_dict(epoch) if epoch is not None else None

    def shard_id_floor(self) -> int:
        """The largest shard id the metadata group has seen in any plan (0 on non-members)."""
        meta = self._meta
        return meta.state.max_shard_id if meta is not None else 0

    def propose_meta(self, command: tuple, deadline: float) -> object:
        return self._member_meta().execute(command, deadline)

    def _member_meta(self) -> RaftGroup:
        meta = self._meta                   # read once: the supervisor may close it meanwhile
        if meta is None:
            raise NotMember("this node is not a member of the metadata group")
        return meta

    # -- what routing reads --------------------------------------------------------------

    @property
    def epoch(self) -> ConfigEpoch | None:
        return self._epoch

    @property
    def pending_epoch(self) -> ConfigEpoch | None:
        """The plan of the change in progress as this node last heard of it (a hint)."""
        return self._pending

    def leaving(self, shard_id: str) -> bool:
        """Whether the change in progress takes this node's replica of `shard_id` out of its group:
        the replica may be removed at any moment, so requests are better served by the others."""
        pending, me = self._pending, self.settings.address
        return pending is not None and pending.status == "pending" and shard_id in pending.shards \
            and me not in pending.replicas(shard_id)

    def wait_for_epoch(self, number: int, deadline: float) -> bool:
        """Block until this node knows epoch `number` (or newer); False at the deadline."""
        with self._epoch_changed:
            return self._epoch_changed.wait_for(
                lambda: self._epoch is not None and self._epoch.number >= number,
                timeout=max(0.0, deadline - time.monotonic()))

    def group(self, shard_id: str) -> RaftGroup | None:
        """This node's replica of the shard that serves requests (a learner does not: it has no vote)."""
        with self._lock:
            group = self._groups.get(shard_id)
        return None if group is None or group.learner else group

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
        return self._trust.trusts(host)     # node-to-node requests of an unsecured cluster (kvs.node.trust)

    def _known_addresses(self) -> set[str]:     # its VIEW, the epochs' views, the metadata members
        epoch, pending = self._epoch, self._news.pending or {}
        known = set(self.settings.view) | {self.settings.address} | set(pending.get("view") or ())
        return known | (set(epoch.view) | set(epoch.metadata_members) if epoch is not None else set())

    def shard_groups(self) -> dict[str, RaftGroup]:
        with self._lock:                    # this node's shard replicas by shard id
            return dict(self._groups)

    def hosted_groups(self) -> list[RaftGroup]:
        return list(self.shard_groups().values())       # not the metadata replica

    def all_groups(self) -> list[RaftGroup]:
        """Every replica this node runs, the metadata replica included."""
        with self._lock:
            groups = list(self._groups.values())
        return groups + ([self._meta] if self._meta is not None else [])

    # -- status and health (kvs.node.status) ----------------------------------------------------

    def status(self, digest: bool = False) -> dict:
        return describe(self, digest)       # with `digest`, each replica's key count and digest (costly)

    def health(self) -> tuple[bool, str]:
        return readiness(self)              # (ready, reason): see kvs.node.status

    def liveness(self) -> tuple[bool, str]:
        return liveness(self)               # (live, reason)

    @property
    def supervisor(self) -> tuple[bool, str | None]:
        """(running, the last round's error or None)."""
        return self._supervisor_running, self._supervisor_error

    @property
    def recovery(self) -> GroupRecovery:
        return self._recovery
