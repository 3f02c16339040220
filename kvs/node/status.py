"""What a node reports about itself: its status (`GET /kvs/status`), liveness (`/livez`) and readiness
(`/readyz`, and `/health` as the seeds have it).

Read-only views of a `kvs.node.Node` (passed in: the Node imports this module), kept apart from the
supervisor that changes what it hosts.
"""

from __future__ import annotations


def describe(node, digest: bool = False) -> dict:
    """The node's view; with `digest`, each shard replica's key count and data digest (costly)."""
    epoch = node.epoch
    groups = {}
    meta = node.metadata_group
    if meta is not None:
        groups["meta"] = meta.status()
    for shard_id, group in sorted(node.shard_groups().items()):
        groups[f"shard-{shard_id}"] = group.status()
        if digest and group.failure is None:
            groups[f"shard-{shard_id}"].update({"key-count": group.state.key_count(),
                                                "digest": group.state.digest(),
                                                "ownership-epoch": group.state.epoch})
    groups.update(node.recovery.status())          # halted groups, closed until their disk heals
    s = node.settings
    return {
        "address": s.address,
        "member": s.is_member or (epoch is not None and s.address in epoch.view),
        "epoch": epoch.number if epoch is not None else None,
        "shard-id": node.own_shard(),
        "secured": s.secured,
        "groups": groups,
    }


def liveness(node) -> tuple[bool, str]:
    """(live, reason): the process serves and its supervisor runs; a node that is not live needs a
    restart (a node without a leader for a moment, or idle, is live: it only is not ready)."""
    running, error = node.supervisor
    if not running:
        return False, "the supervisor is not running: this node adopts no new configuration"
    if error is not None:
        return False, f"the supervisor is failing: {error}"
    return True, "ok"


def readiness(node) -> tuple[bool, str]:
    """(ready, reason): ready once the configuration is known and every hosted group has a leader,
    and while the node is live."""
    live, reason = liveness(node)
    if not live:
        return False, reason
    if node.epoch is None:
        if not node.settings.is_member and node.metadata_group is None:
            return False, "idle: this node is not in any configuration"
        return False, "the cluster configuration is not known yet"
    groups = node.all_groups()
    for name, failure in [(g.name, g.failure) for g in groups] + node.recovery.failures():
        if failure is not None:
            return False, f"group {name} is down: {failure.summary()}"
    for group in groups:
        if group.leader() is None:
            return False, f"group {group.name} has no leader"
    own = node.own_shard()
    if own is not None and node.group(own) is None:
        return False, f"the replica of shard {own} is not running yet"
    return True, "ok"
