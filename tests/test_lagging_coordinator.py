"""A metadata member that came back behind the group plans a change on the committed epoch, not its own.

Docker soak seed 54 on f4c40a1: a node restarted under load was sent a remove-member of a node that
an earlier change had added while it was down. It planned on the epoch it last knew, found the node
outside that view and answered 400, a valid change refused. A coordinator now reads the committed
configuration through the metadata group (a ReadIndex round) before it plans.

Real processes (ProcessDriver: each node on its own loopback IP, cut off by iptables): a 2 x 2 cluster
and a spare. One node of shard 2 is killed; the spare joins shard 1 meanwhile (epoch 2); the node comes
back cut off from the others, so its metadata replica stays at epoch 1. A change sent to it gets 503
(it cannot learn what is committed), not 400. Healed, it coordinates the same change.
"""

from __future__ import annotations

import os

import pytest

from kvs.raft import codec
from kvs.testing.cluster import wait_until

from .chaos.driver import ProcessDriver, iptables_usable

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(not iptables_usable(), reason="needs iptables (root)")]

CHANGE_TIMEOUT = 90.0


def metadata_commit_on_disk(driver: ProcessDriver, node: str) -> int:
    """The commit index `node`'s metadata replica has stored: what it applies again after a restart. It
    is stored lazily (once a second, `DurableJournal.onOneSecondTimer`); a restart that comes sooner
    replays less, which is safe (the leader sends it again) but, cut off, knows an older epoch."""
    try:
        with open(os.path.join(driver.data_dir(node), "meta", "journal.meta"), "rb") as f:
            return codec.loads(f.read()).get("commit_index", 0)
    except OSError:
        return 0


def epoch_number(driver: ProcessDriver, node: str) -> int | None:
    epoch = driver.epoch_of(node)
    return epoch.number if epoch is not None else None


def test_a_member_back_from_a_restart_behind_the_group_does_not_refuse_a_valid_change_planned_on_its_old_epoch():
    driver = ProcessDriver(2, 2, spares=1)
    driver.start()
    try:
        driver.wait_healthy()
        nodes, spare = driver.nodes(), driver.spare_nodes()[0]
        coordinator = nodes[0]
        behind = next(n for n in nodes if n in driver.replicas_of("2"))
        assert epoch_number(driver, behind) == 1
        # Killed before it stored the commit index of epoch 1, it would come back knowing no epoch at all.
        committed = driver.http(behind, "/kvs/status")[1]["groups"]["meta"]["commit-index"]
        wait_until(lambda: metadata_commit_on_disk(driver, behind) >= committed, 10,
                   message=f"{behind} stored metadata commit index {committed}")

        driver.kill(behind)
        status, body = driver.add_member(coordinator, spare, "1", CHANGE_TIMEOUT)
        assert status == 200, body
        wait_until(lambda: epoch_number(driver, coordinator) == 2, 30, message="epoch 2 active")

        driver.isolate(behind)
        try:
            driver.start_node(behind)
            wait_until(lambda: epoch_number(driver, behind) is not None, 60, message=f"{behind} answers again")
            # The precondition of the defect: the node itself still routes by the epoch it knew.
            assert epoch_number(driver, behind) == 1
            status, body = driver.remove_member(behind, spare, CHANGE_TIMEOUT)
            assert status == 503, (status, body)           # before the fix: 400 "... is not in the view"
            assert epoch_number(driver, coordinator) == 2  # and nothing changed
        finally:
            driver.heal(behind)

        wait_until(lambda: epoch_number(driver, behind) == 2, 60, message=f"{behind} learns epoch 2")
        answers: list[tuple[int, dict]] = []

        def answered_other_than_503() -> bool:
            # A node back from a partition may first force an election (its term moved on): a 503
            # then is the cluster settling, and is retried; any other answer ends the loop.
            answers.append(driver.remove_member(behind, spare, CHANGE_TIMEOUT))
            return answers[-1][0] != 503

        wait_until(answered_other_than_503, 120, interval=1.0, message="remove-member through it")
        assert answers[-1][0] == 200, answers
        epoch = driver.epoch_of(coordinator)
        assert epoch is not None and epoch.number == 3 and spare not in epoch.view
    finally:
        driver.stop()
