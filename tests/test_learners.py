"""A node added to a running shard group is a learner until it has caught up (issue 12): it receives the
leader's snapshot and log without a vote, and the group's configuration names it only then, so a
member still catching up never counts toward, or holds up, a quorum.

Real processes on their own loopback IPs (iptables holds the joining node's Raft traffic back), a
1 x 3 cluster and one spare that joins it with add-member.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import requests

from kvs.testing.cluster import wait_until

from .chaos.driver import ProcessDriver, iptables_usable

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(not iptables_usable(), reason="needs iptables (root)")]

KEYS = 300          # more than the leader's catch-up slack (64 entries): an empty learner is behind


def shard_status(driver: ProcessDriver, node: str) -> dict | None:
    try:
        return driver.http(node, "/kvs/status?digest=1", timeout=5)[1]["groups"].get("shard-1")
    except (requests.RequestException, ValueError, KeyError):
        return None


def leader_status(driver: ProcessDriver, nodes: list[str]) -> dict | None:
    return next((g for g in map(lambda n: shard_status(driver, n), nodes) if g and g.get("role") == "leader"), None)


def put_until_taken(node: str, key: str, value: str, deadline: float) -> bool:
    """PUT with one request id, retried on a 503 or no answer until `deadline` (monotonic)."""
    headers = {"Idempotency-Key": f"learners-{key}"}
    while time.monotonic() < deadline:
        try:
            status = requests.put(f"http://{node}/kvs/keys/{key}", json={"value": value}, headers=headers,
                                  timeout=10).status_code
        except requests.RequestException:
            continue
        if status in (200, 201):
            return True
    return False


def get(node: str, key: str) -> str | None:
    try:
        resp = requests.get(f"http://{node}/kvs/keys/{key}", timeout=10)
    except requests.RequestException:
        return None
    return resp.json().get("value") if resp.status_code == 200 else None


@contextlib.contextmanager
def loaded_shard_and_a_spare():
    """A 1 x 3 cluster holding KEYS keys (written through its first node), and one idle spare node."""
    driver = ProcessDriver(1, 3, spares=1)
    driver.start()
    try:
        a, b, c = driver.nodes()
        wait_until(lambda: all(driver.healthy(n) for n in (a, b, c)), 60, message="cluster healthy")
        deadline = time.monotonic() + 120
        assert all(put_until_taken(a, f"k-{i}", f"v{i}", deadline) for i in range(KEYS))
        yield driver, (a, b, c), driver.spare_nodes()[0]
    finally:
        driver.stop()


def test_a_joining_replica_is_a_learner_that_holds_up_no_commit_until_it_has_caught_up():
    with loaded_shard_and_a_spare() as (driver, (a, b, c), spare):
        old_members = leader_status(driver, [a, b, c])["members"]

        driver.cut_raft_traffic(spare)      # its learner can open no Raft connection: it stays behind
        answer: dict = {}
        change = threading.Thread(target=lambda: answer.update(reply=driver.add_member(b, spare, "1", 280)),
                                  daemon=True)
        change.start()
        joining = wait_until(lambda: shard_status(driver, spare) or answer.get("reply"), 60,
                             message="the spare runs a replica of shard 1")
        assert joining.get("role") == "learner", joining        # (an early answer: the change was refused)
        # One old member down: were the new replica counted already (4 members), the 2 left could commit nothing.
        driver.pause(c)
        try:
            # (retried on a 503: a machine this loaded may miss a 5 s deadline; 4 members could commit none)
            deadline = time.monotonic() + 60
            taken = [i for i in range(20) if put_until_taken(a, f"during-{i}", f"d{i}", deadline)]
            assert len(taken) == 20, f"only writes {taken} were taken while the new replica was still a learner"
            assert sorted(leader_status(driver, [a, b])["members"]) == sorted(old_members), \
                "the learner became a member before it caught up"
        finally:
            driver.resume(c)
        driver.heal_raft_traffic(spare)

        change.join(290)
        assert answer.get("reply", (None,))[0] == 200, answer
        wait_until(lambda: (shard_status(driver, spare) or {}).get("role") in ("follower", "leader"), 60,
                   message="the spare's replica votes")
        leader = leader_status(driver, [a, b, c, spare])
        assert leader is not None and len(leader["members"]) == 4
        assert [i for i in range(KEYS) if get(spare, f"k-{i}") != f"v{i}"] == []
        assert [i for i in range(20) if get(spare, f"during-{i}") != f"d{i}"] == []
        wait_until(lambda: len({(shard_status(driver, n) or {}).get("digest") for n in (a, b, c, spare)}) == 1, 30,
                   message="the four replicas' digests agree")


def test_a_replica_is_added_while_an_old_member_is_down_and_writes_commit_all_along():
    """The new member counts toward the quorum only once its add entry has committed and it has
    acknowledged that entry as a member (kvs.raft.joiner): with one old member down, the two others
    commit the add and every write while the joiner's node reopens it as a voter, and then the new
    member's acknowledgements make the majority of four. (The rule itself, with a joiner that never
    answers, is tests/test_joiner.py; there stock PySyncObj's count stalls.)"""
    with loaded_shard_and_a_spare() as (driver, (a, b, c), spare):
        driver.pause(c)
        try:
            answer: dict = {}
            change = threading.Thread(target=lambda: answer.update(reply=driver.add_member(b, spare, "1", 150)),
                                      daemon=True)
            change.start()
            written, late = 0, []
            while change.is_alive() and written < 2000:
                started = time.monotonic()
                if not put_until_taken(a, f"during-{written}", f"d{written}", started + 30):
                    late.append(written)
                    break
                written += 1
            assert late == [], f"write {late} waited over 30 s: the add held the group's quorum up"
            change.join(160)
            assert answer.get("reply", (None,))[0] == 200, answer
            leader = leader_status(driver, [a, b, spare])
            assert leader is not None and len(leader["members"]) == 4, leader
            # Now it counts: with c still down, the leader needs the new member's acknowledgements.
            deadline = time.monotonic() + 60
            assert all(put_until_taken(b, f"after-{i}", f"a{i}", deadline) for i in range(20))
        finally:
            driver.resume(c)
        assert written > 0
        assert [i for i in range(written) if get(spare, f"during-{i}") != f"d{i}"] == []
        wait_until(lambda: [i for i in range(20) if get(c, f"after-{i}") != f"a{i}"] == [], 60,
                   message="every write made while c was down reads back through c")
        wait_until(lambda: len({(shard_status(driver, n) or {}).get("digest") for n in (a, b, c, spare)}) == 1, 60,
                   message="the four replicas' digests agree")


def test_two_replicas_joining_in_one_change_each_end_with_the_group_s_own_member_list():
    """Each joiner's configuration starts as the running members' (never the plan's: a planned node
    in it would look like a member); they are added one at a time, each once caught up."""
    driver = ProcessDriver(1, 3, spares=2)
    driver.start()
    try:
        nodes, spares = driver.nodes(), driver.spare_nodes()
        wait_until(lambda: all(driver.healthy(n) for n in nodes), 60, message="cluster healthy")
        deadline = time.monotonic() + 120
        assert all(put_until_taken(nodes[i % 3], f"k-{i}", f"v{i}", deadline) for i in range(KEYS))
        status, body = driver.change_view(nodes[0], nodes + spares, 5, 280)
        assert status == 200, body
        everyone = nodes + spares
        wait_until(lambda: all((shard_status(driver, n) or {}).get("role") in ("leader", "follower")
                               for n in everyone), 60, message="five voting replicas")
        lists = {n: sorted(shard_status(driver, n)["members"]) for n in everyone}
        assert len(set(map(tuple, lists.values()))) == 1 and len(next(iter(lists.values()))) == 5, lists
        assert [i for i in range(KEYS) if get(spares[1], f"k-{i}") != f"v{i}"] == []
        wait_until(lambda: len({(shard_status(driver, n) or {}).get("digest") for n in everyone}) == 1, 30,
                   message="the five replicas' digests agree")
    finally:
        driver.stop()
