"""Crashes during a replica-set change in place: the change completes or rolls back, the group keeps
its quorum, no acknowledged write is lost (issue 12).

Real processes, a 2 x 3 cluster and one spare that joins shard 1 (add-member, a Raft membership
change of shard 1's group): the coordinator is SIGKILLed at each phase; the joining node is killed
while it catches up and comes back; the group's leader is killed during the configuration change;
a removal of a dead replica is rolled back while it stays dead; a leader that must leave its group
hands its leadership over first.
"""

from __future__ import annotations

import threading

import pytest
import requests

from kvs.client import KvsClient
from kvs.fsm.meta import PHASES
from kvs.testing.cluster import wait_until
from kvs.testing.linearizability import check_history
from kvs.testing.workload import WorkloadSpec, run_workload

from .test_in_place_membership import group_status, put_json

pytestmark = pytest.mark.cluster

KEYS = 1500


def phase(node: str) -> dict:
    return requests.get(f"http://{node}/kvs/view-change", timeout=5).json()


def preload(node: str, keys: int = KEYS) -> None:
    client = KvsClient(node)
    for i in range(keys):
        assert client.put(f"k-{i}", f"v{i}")[0] == 201


def assert_every_key_readable(node: str, keys: int = KEYS) -> None:
    reader = KvsClient(node)
    missing = [i for i in range(keys) if reader.get(f"k-{i}")[1].get("value") != f"v{i}"]
    assert not missing, f"{len(missing)} keys lost through {node}, e.g. {missing[:5]}"


def leader_of(nodes: list[str], shard_id: str) -> str | None:
    for node in nodes:
        try:
            g = group_status(node, shard_id)
        except requests.RequestException:
            continue
        if g is not None and g.get("role") == "leader":
            return node
    return None


def members_of(nodes: list[str], shard_id: str) -> list[str] | None:
    leader = leader_of(nodes, shard_id)
    return sorted(group_status(leader, shard_id)["members"]) if leader else None


def start(change, result: dict) -> threading.Thread:
    def run() -> None:
        try:
            result["answer"] = change()
        except requests.RequestException:
            pass                                    # its coordinator died: no answer
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("when", ["prepared", "copying", "committed"])
def test_a_killed_coordinator_s_in_place_change_is_rolled_back_or_finished_by_another_node(make_cluster, when):
    """Before commit the members go back to the old replica set, after it another node finishes; phases
    of a change without moves are short, so the kill may land a step later than the one seen."""
    cluster = make_cluster(2, 3)
    a1, a2, a3, b1, b2, b3 = cluster.view
    spare = cluster.add_idle_node(cluster.base_port + 6)
    preload(a1)
    old_members = members_of([a1, a2, a3], "1")
    result: dict = {}
    start(lambda: put_json(b1, "/kvs/view-change/add-member", {"address": spare, "shard-id": "1"}), result)
    # Without key moves the phases after "prepared" last a metadata commit each: the kill may land at a
    # later one, or after the end, which must be as harmless
    later = PHASES[PHASES.index(when):]
    wait_until(lambda: (lambda p: p["phase"] in later or p["epoch"] == 2)(phase(b2)), 60,
               interval=0.002, message=f"phase {when} or later")
    cluster.kill(b1)                                # the coordinator, a metadata member of neither shard 1 ...
    wait_until(lambda: phase(b2)["phase"] is None, 120, interval=0.2, message="the change ended")
    epoch = phase(b2)["epoch"]
    assert epoch == 2 if when == "committed" else epoch in (1, 2)
    if epoch == 1:
        # rolled back: shard 1's Raft members are the old ones again, and the spare runs no replica
        wait_until(lambda: members_of([a1, a2, a3], "1") == old_members, 60,
                   message="shard 1's members back to the old replica set")
        wait_until(lambda: not KvsClient(spare).status()[1]["groups"], 60, message="the spare closed its replica")
    else:
        wait_until(lambda: members_of([a1, a2, a3, spare], "1") is not None
                   and len(members_of([a1, a2, a3, spare], "1")) == 4, 60, message="shard 1 has 4 members")
    assert_every_key_readable(b3)
    assert KvsClient(b3).shards()[1]["shards"] == ["1", "2"]          # ids kept either way
    if epoch == 1:
        cluster.start_node(b1)
        cluster.wait_healthy([b1], timeout=60)
        status, body = put_json(b2, "/kvs/view-change/add-member", {"address": spare, "shard-id": "1"})
        assert status == 200, body
        assert [s["replicas"] for s in body["shards"]] == [[a1, a2, a3, spare], [b1, b2, b3]]
    assert_every_key_readable(spare)


def test_a_joining_node_killed_while_it_catches_up_joins_when_it_returns_and_the_shard_stays_writable(make_cluster):
    cluster = make_cluster(2, 3)
    a1, a2, a3, b1, b2, b3 = cluster.view
    spare = cluster.add_idle_node(cluster.base_port + 6)
    preload(a1, 3000)
    stop = threading.Event()
    spec = WorkloadSpec(addresses=(a1, b1), keys=tuple(f"hot-{i}" for i in range(10)), clients=4,
                        duration=240.0, seed=5, stop=stop)
    history: list = []
    clients = threading.Thread(target=lambda: history.extend(run_workload(spec)))
    clients.start()
    result: dict = {}
    changer = start(lambda: put_json(b1, "/kvs/view-change/add-member", {"address": spare, "shard-id": "1"}), result)
    try:
        wait_until(lambda: "shard-1" in KvsClient(spare).status()[1]["groups"], 60, interval=0.01,
                   message="the spare opened its replica of shard 1")
        cluster.kill(spare)                         # while it catches up (or just after)
        # the group (3 live members of 4) keeps its quorum: writes to shard 1 go on meanwhile
        writer = KvsClient(a2)
        assert all(writer.put(f"while-down-{i}", "x")[0] in (200, 201) for i in range(20))
        cluster.start_node(spare)
        changer.join(240)
    finally:
        stop.set()
    clients.join(60)
    assert result["answer"][0] == 200, result["answer"]
    assert [s["replicas"] for s in result["answer"][1]["shards"]] == [[a1, a2, a3, spare], [b1, b2, b3]]
    check = check_history(history)
    assert check.ok, check.summary()
    assert_every_key_readable(spare, 3000)
    assert all(KvsClient(spare).get(f"while-down-{i}")[1].get("value") == "x" for i in range(20))


def test_the_leader_killed_during_the_configuration_change_the_change_still_completes(make_cluster):
    cluster = make_cluster(2, 3)
    a1, a2, a3, b1, b2, b3 = cluster.view
    spare = cluster.add_idle_node(cluster.base_port + 6)
    preload(b1, 3000)
    leader = leader_of([a1, a2, a3], "1")
    result: dict = {}
    changer = start(lambda: put_json(b1, "/kvs/view-change/add-member", {"address": spare, "shard-id": "1"}), result)
    # the leader has appended the spare's membership entry: kill it mid-change
    wait_until(lambda: len(group_status(leader, "1")["members"]) == 4, 60, interval=0.005,
               message="the leader added the spare")
    cluster.kill(leader)
    changer.join(240)
    assert result["answer"][0] == 200, result["answer"]
    alive = [n for n in (a1, a2, a3) if n != leader] + [spare]
    wait_until(lambda: members_of(alive, "1") is not None and len(members_of(alive, "1")) == 4, 60,
               message="the new leader has the 4 members")
    assert_every_key_readable(spare, 3000)
    cluster.start_node(leader)
    cluster.wait_healthy([leader], timeout=60)
    assert_every_key_readable(leader, 3000)


def test_a_rolled_back_removal_of_a_dead_replica_completes_while_the_replica_stays_dead(make_cluster):
    """The soak's stall: shard 1's leader has taken a dead replica out, the coordinator stops before
    the commit, another node rolls the change back. The rollback must not wait for the dead replica
    to be a member again; it comes back as one when its node returns."""
    cluster = make_cluster(2, 3)
    a1, a2, a3, b1, b2, b3 = cluster.view
    preload(a1, 300)
    cluster.kill(a3)
    result: dict = {}
    start(lambda: put_json(b1, "/kvs/view-change/remove-member", {"address": a3}), result)
    wait_until(lambda: phase(b2)["phase"] is not None, 60, interval=0.002, message="the change is prepared")
    cluster.pause(b1)                               # the coordinator, before it could commit
    assert phase(b2)["epoch"] == 1
    wait_until(lambda: len(members_of([a1, a2], "1") or ()) == 2, 60, message="shard 1's leader took the dead replica out")
    wait_until(lambda: phase(b2)["phase"] is None, 120, interval=0.2, message="the change was rolled back")
    assert phase(b2)["epoch"] == 1
    assert KvsClient(b2).shards()[1]["shards"] == ["1", "2"]
    assert len(members_of([a1, a2], "1")) == 2      # the dead replica is not waited for
    assert_every_key_readable(b2, 300)
    cluster.kill(b1)
    cluster.start_node(b1)
    cluster.start_node(a3)
    cluster.wait_healthy([b1, a3], timeout=60)
    wait_until(lambda: len(members_of([a1, a2, a3], "1") or ()) == 3, 60,
               message="the returned replica is a member of shard 1 again")
    status, body = put_json(b2, "/kvs/view-change/remove-member", {"address": a3})
    assert status == 200, body
    assert [s["replicas"] for s in body["shards"]] == [[a1, a2], [b1, b2, b3]]
    assert_every_key_readable(b3, 300)


def test_a_leader_that_must_leave_its_group_hands_leadership_over_first(make_cluster):
    cluster = make_cluster(2, 3)
    a1, a2, a3, b1, b2, b3 = cluster.view
    preload(a1, 500)
    leader = leader_of([b1, b2, b3], "2")
    term = group_status(leader, "2")["term"]
    status, body = put_json(a1, "/kvs/view-change/remove-member", {"address": leader})
    assert status == 200, body
    rest = [n for n in (b1, b2, b3) if n != leader]
    assert [s["replicas"] for s in body["shards"]] == [[a1, a2, a3], rest]
    new_leader = leader_of(rest, "2")
    assert new_leader in rest and members_of(rest, "2") == sorted(group_status(new_leader, "2")["members"])
    assert len(members_of(rest, "2")) == 2 and group_status(new_leader, "2")["term"] > term
    assert_every_key_readable(rest[0], 500)
