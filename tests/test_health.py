"""Liveness and readiness (`/livez`, `/readyz` = `/health`), on fakes: what each says of a node."""

from types import SimpleNamespace

from kvs.node.status import liveness, readiness


def node(running=True, error=None, epoch=None, member=False, groups=()):
    return SimpleNamespace(supervisor=(running, error), epoch=epoch, metadata_group=None,
                           settings=SimpleNamespace(is_member=member), all_groups=lambda: list(groups),
                           recovery=SimpleNamespace(failures=lambda: []), own_shard=lambda: None,
                           group=lambda shard: None)


def leaderless(name: str):
    return SimpleNamespace(name=name, failure=None, leader=lambda: None)


def test_an_idle_spare_is_live_and_not_ready():
    idle = node()
    assert liveness(idle) == (True, "ok")
    assert readiness(idle) == (False, "idle: this node is not in any configuration")


def test_a_group_electing_a_leader_leaves_the_node_live_but_not_ready():
    electing = node(epoch=object(), member=True, groups=[leaderless("shard-1")])
    assert liveness(electing) == (True, "ok")
    assert readiness(electing) == (False, "group shard-1 has no leader")


def test_a_node_whose_supervisor_stopped_or_fails_is_neither_live_nor_ready():
    for broken in (node(running=False), node(error="disk on fire")):
        live, reason = liveness(broken)
        assert not live and "supervisor" in reason
        assert readiness(broken) == (False, reason)
