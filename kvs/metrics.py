"""Prometheus metrics of a node (`GET /metrics`), with prometheus-client.

Two kinds. Events are counted where they happen, with label values from small
fixed sets (an endpoint class out of a fixed list, never a path or a key): HTTP requests and their latency,
forwards and re-routes, failed proposals, journal fsyncs, snapshot writes,
leader changes. State is read when Prometheus scrapes, by `NodeCollector`
(`kvs.node.metrics`): each hosted group's role, term, commit and applied
index, whether it has a leader, its deduplication table; the view change in
progress. This module imports nothing of kvs, so every layer may count here.

Names follow etcd's where there is one (has_leader, leader_changes_seen,
proposals_failed, wal fsync durations): an operator's dashboards carry over.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DISK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

REQUESTS = Counter("kvs_http_requests_total", "HTTP requests answered, by endpoint class, method and status code",
                   ["endpoint", "method", "code"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("kvs_http_request_duration_seconds",
                            "Time to answer an HTTP request, by endpoint class and status code",
                            ["endpoint", "code"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
FORWARDS = Counter("kvs_forwards_total",
                   "Requests this node sent on to another node: 'forward' (a key of a shard served elsewhere), "
                   "'reroute' (a key that moved: routed again by a newer epoch), 'leader' (a write a follower "
                   "had its leader propose)", ["kind"], registry=REGISTRY)
FORWARD_FALLBACKS = Counter("kvs_forward_fallbacks_total",
                            "A follower's writes that its leader did not take, or not in time (kvs.raft.forwarding), "
                            "and that this node proposed itself through PySyncObj's slower hand-over",
                            registry=REGISTRY)
PROPOSALS_FAILED = Counter("kvs_proposals_failed_total",
                           "Raft proposals that did not commit before their deadline, by group",
                           ["group"], registry=REGISTRY)
LEADER_CHANGES = Counter("kvs_leader_changes_seen_total",
                         "Changes of a hosted group's leader seen by this node (sampled every supervisor round)",
                         ["group"], registry=REGISTRY)
FSYNC_SECONDS = Histogram("kvs_journal_fsync_duration_seconds",
                          "Time of one journal fdatasync (one per batch of appended entries)",
                          buckets=_DISK_BUCKETS, registry=REGISTRY)
SNAPSHOT_SECONDS = Histogram("kvs_snapshot_write_duration_seconds",
                             "Time to write and fsync one snapshot (off the tick thread)",
                             buckets=_LATENCY_BUCKETS, registry=REGISTRY)


def endpoint_of(path: str) -> str:
    """The endpoint class of a request path (bounded label values: a key never becomes a label)."""
    if path.startswith("/kvs/keys/"):
        return "keys"
    if path.startswith("/internal/"):
        route = path[len("/internal/"):].split("/", 1)[0]
        return "internal/" + (route if route in _INTERNAL else "other")
    if path.startswith("/kvs/view-change"):
        return "view-change"
    if path.startswith("/kvs/shards"):
        return "shards"
    if path in _NAMED:
        return path.lstrip("/")
    return "other"


_INTERNAL = frozenset(("status", "epochs", "metadata", "groups", "writes", "batches"))
_NAMED = frozenset(("/set", "/fetch", "/query", "/health", "/livez", "/readyz", "/metrics", "/kvs/status",
                    "/kvs/key-count", "/kvs/reshard"))


def observe_request(method: str, path: str, status: int, seconds: float) -> None:
    endpoint = endpoint_of(path)
    key = (endpoint, method if method in _METHODS else "other", status if 100 <= status < 600 else 0)
    children = _CHILDREN.get(key)
    if children is None:        # label lookups cost more than the counting: once per (endpoint, method, code)
        children = _CHILDREN[key] = (REQUESTS.labels(key[0], key[1], str(key[2])),
                                     REQUEST_SECONDS.labels(key[0], str(key[2])))
    children[0].inc()
    children[1].observe(seconds)


_CHILDREN: dict[tuple, tuple] = {}      # bounded: endpoint classes x methods x status codes


_METHODS = frozenset(("GET", "PUT", "POST", "DELETE", "HEAD"))


FORWARDED = FORWARDS.labels("forward")       # bound once: these are counted on the key path
REROUTED = FORWARDS.labels("reroute")
TO_LEADER = FORWARDS.labels("leader")
CONTENT_TYPE = CONTENT_TYPE_LATEST


def exposition() -> bytes:
    return generate_latest(REGISTRY)
