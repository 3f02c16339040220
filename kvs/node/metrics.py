"""NodeCollector: what a node's state says, read when Prometheus scrapes `GET /metrics`.

Gauges only, computed from the hosted groups' Raft status and the state
machines at scrape time (nothing on the key path). Events are counted where
they happen (`kvs.metrics`).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kvs.metrics import LEADER_CHANGES, REGISTRY

log = logging.getLogger(__name__)

ROLES = ("leader", "follower", "candidate", "learner", "failed")
PHASES = ("prepared", "copying", "frozen", "caught-up", "committed", "unwinding")


class NodeCollector(Collector):
    def __init__(self):
        self._node = None
        self._progress: Callable[[], dict] = dict

    def watch(self, node, progress: Callable[[], dict]) -> None:
        """Report `node` (and the coordinator's `progress()`, `kvs.reconfig.phases.Progress`)."""
        self._node, self._progress = node, progress

    def collect(self) -> Iterator[GaugeMetricFamily]:
        node = self._node
        if node is None:
            return
        role = GaugeMetricFamily("kvs_group_role", "1 for the role this node's replica of the group has",
                                 labels=["group", "role"])
        has_leader = GaugeMetricFamily("kvs_group_has_leader", "Whether the group has a leader, as this replica knows",
                                       labels=["group"])
        term = GaugeMetricFamily("kvs_group_term", "The replica's Raft term", labels=["group"])
        commit = GaugeMetricFamily("kvs_group_commit_index", "The replica's commit index", labels=["group"])
        applied = GaugeMetricFamily("kvs_group_applied_index", "The replica's last applied index", labels=["group"])
        members = GaugeMetricFamily("kvs_group_members", "Members of the group's Raft configuration", labels=["group"])
        keys = GaugeMetricFamily("kvs_group_keys", "Keys held by the replica", labels=["group"])
        dedup = GaugeMetricFamily("kvs_dedup_entries", "Request ids the replica remembers (exactly-once window)",
                                  labels=["group"])
        for group in node.all_groups():
            try:
                # PySyncObj's getStatus iterates dicts the tick thread changes: a scrape may lose a group
                # for a moment, never the whole answer
                status = group.status()
            except RuntimeError:
                continue
            name = group.name
            for r in ROLES:
                role.add_metric([name, r], 1.0 if status.get("role") == r else 0.0)
            has_leader.add_metric([name], 1.0 if status.get("leader") else 0.0)
            members.add_metric([name], float(len(status.get("members") or ())))
            for family, field in ((term, "term"), (commit, "commit-index"), (applied, "last-applied")):
                if isinstance(status.get(field), int):
                    family.add_metric([name], float(status[field]))
            state = group.state
            if hasattr(state, "dedup_size"):
                keys.add_metric([name], float(state.key_count()))
                dedup.add_metric([name], float(state.dedup_size()))
        yield from (role, has_leader, term, commit, applied, members, keys, dedup)
        yield from self._view_change(node)

    def _view_change(self, node) -> Iterator[GaugeMetricFamily]:
        epoch = GaugeMetricFamily("kvs_epoch", "The configuration epoch this node routes by")
        epoch.add_metric([], float(node.epoch.number if node.epoch is not None else 0))
        phase = GaugeMetricFamily("kvs_view_change_phase",
                                  "1 for the phase of the view change the metadata group records (members only)",
                                  labels=["phase"])
        change = node.change() if node.has_metadata_replica else None
        for p in PHASES:
            phase.add_metric([p], 1.0 if change is not None and change.get("phase") == p else 0.0)
        progress = GaugeMetricFamily("kvs_view_change_progress",
                                     "This node's part of a view change it coordinates (kvs.reconfig.coordinator)",
                                     labels=["measure"])
        for measure, value in self._progress().items():
            if isinstance(value, int) and not isinstance(value, bool) and measure != "epoch":
                progress.add_metric([measure], float(value))
        yield from (epoch, phase, progress)


class LeaderWatch:
    """Counts leader changes of the hosted groups (LEADER_CHANGES), sampled once a supervisor round: a
    change between two rounds is seen (an election that comes and goes within one round is not)."""

    def __init__(self):
        self._seen: dict[str, str] = {}       # group name -> its leader at the last sample

    def sample(self, groups) -> None:
        try:
            self._sample(groups)
        except Exception:           # a metric must not make the supervisor look failing (/livez)
            log.exception("sampling the groups' leaders failed")

    def _sample(self, groups) -> None:
        for group in groups:
            leader = group.leader()
            seen = self._seen.get(group.name)
            if leader is not None and seen is not None and leader != seen:
                LEADER_CHANGES.labels(group.name).inc()
            if leader is not None:
                self._seen[group.name] = leader


COLLECTOR = NodeCollector()
REGISTRY.register(COLLECTOR)
