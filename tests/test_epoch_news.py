"""A node outside the metadata group keeps only the newest news of the configuration.

Regression of a CI failure: a coordinator was killed mid-change, another node
rolled the change back, and a new node then pulled the rolled-back plan again
from a metadata member that was still replaying its log. It restarted the
plan's group on a Raft slot that the next change gave to another group; two
groups shared one port and the next change could not commit in its new group.
"""

from __future__ import annotations

import socket
from dataclasses import replace

from kvs.config.epoch import ConfigEpoch
from kvs.fsm.meta import MetadataState
from kvs.node import Node
from kvs.reconfig.epoch_sync import EpochSync
from kvs.reconfig.planner import plan_view_change
from kvs.reconfig.protocol import Epochs, KnownEpochs
from kvs.settings import NodeSettings
from kvs.testing.cluster import wait_until

OFFSET = 97


def free_http_port() -> int:
    """A port whose Raft slots (port + OFFSET * k) are free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + OFFSET * 4 < 65536 and all(_free(port + OFFSET * k) for k in range(1, 4)):
            return port
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def idle_node(tmp_path) -> tuple[Node, str]:
    address = f"127.0.0.1:{free_http_port()}"
    settings = NodeSettings.load(environ={"ADDRESS": address, "VIEW": "127.0.0.1:1", "DATA_DIR": str(tmp_path),
                                          "KVS_RAFT_PORT_OFFSET": str(OFFSET), "KVS_FSYNC": "off"})
    return Node(settings), address


def test_every_decision_about_epochs_gets_a_newer_revision_and_a_snapshot_keeps_it():
    state = MetadataState()
    first = ConfigEpoch.initial(("127.0.0.1:1",), 1)
    state.apply(("init", first.to_dict()))
    plan = plan_view_change(first, ["127.0.0.1:1", "127.0.0.1:2"], 1)
    state.apply(("prepare", plan.to_dict(), "127.0.0.1:1"))
    prepared = state.decisions()
    assert prepared[0] == 2 and prepared[2] == plan.epoch.to_dict()
    state.apply(("advance", 2, "copying", "127.0.0.1:1"))
    assert state.decisions() == prepared          # a phase is no news for nodes outside the group
    state.apply(("abort", 2))
    aborted = state.decisions()
    assert aborted[0] == 3 and aborted[1] == first.to_dict() and aborted[2] is None

    restored = MetadataState()
    restored.restore(state.snapshot())
    assert restored.decisions() == aborted


def test_a_node_ignores_older_news_than_it_has_so_a_rolled_back_plan_never_comes_back(tmp_path):
    node, address = idle_node(tmp_path)
    first = ConfigEpoch.initial(("127.0.0.1:1",), 1)
    plan = plan_view_change(first, ["127.0.0.1:1", address], 1)
    node.learn(first.to_dict(), plan.epoch.to_dict(), 2)
    node.learn(first.to_dict(), None, 3)                         # rolled back
    node.learn(first.to_dict(), plan.epoch.to_dict(), 2)         # a lagging member's answer, or a late push
    assert node.pushed_pending is None and node.pushed_revision == 3

    class LaggingMember:
        def known_epochs(self, _address: str) -> KnownEpochs:
            return KnownEpochs(first.to_dict(), plan.epoch.to_dict(), True, 2, revision=2)

    node._epoch = first                                           # what its supervisor adopted
    EpochSync(node, LaggingMember()).pull()
    assert node.pushed_pending is None

    class CurrentMember:
        def known_epochs(self, _address: str) -> KnownEpochs:
            return KnownEpochs(first.to_dict(), plan.epoch.to_dict(), True, 2, revision=4)

    EpochSync(node, CurrentMember()).pull()                       # the same plan prepared again: news
    assert node.pushed_pending == plan.epoch.to_dict()


def test_a_node_that_missed_a_roll_back_closes_the_old_plans_group_before_the_next_plans_group_starts(tmp_path):
    node, address = idle_node(tmp_path)
    first = ConfigEpoch.initial(("127.0.0.1:1",), 1)
    rolled_back = plan_view_change(first, ["127.0.0.1:1", address], 1).epoch
    retried = plan_view_change(replace(first, max_shard_id=rolled_back.max_shard_id),
                               ["127.0.0.1:1", address], 1).epoch
    old_id, new_id = rolled_back.shard_of_node(address), retried.shard_of_node(address)
    assert old_id != new_id and rolled_back.slot(old_id, address) == retried.slot(new_id, address)
    try:
        node.learn(first.to_dict(), rolled_back.to_dict(), 2)
        node._supervise_once()
        assert [g.name for g in node.hosted_groups()] == [f"shard-{old_id}"]
        node.learn(first.to_dict(), retried.to_dict(), 4)         # it never heard of the abort (revision 3)
        node._supervise_once()
        groups = node.hosted_groups()
        assert [g.name for g in groups] == [f"shard-{new_id}"]
        # a one-replica group elects itself once its replica is up on the slot's port
        wait_until(lambda: groups[0].leader() is not None, 20, message="the new group has a leader")
    finally:
        for group in node.hosted_groups():
            group.close()


def test_a_pushed_revision_must_be_a_non_negative_integer():
    first = ConfigEpoch.initial(("127.0.0.1:1",), 1).to_dict()
    assert Epochs.from_json({"active": first, "pending": None}).revision == 0
    for bad in (-1, "3", 1.5, True, 2 ** 64):
        try:
            Epochs.from_json({"active": first, "pending": None, "revision": bad})
        except ValueError:
            continue
        raise AssertionError(f"revision {bad!r} was accepted")


def test_the_revision_is_the_decision_s_log_index_so_replicas_agree_whatever_snapshot_they_restored():
    first = ConfigEpoch.initial(("127.0.0.1:1",), 1)
    plan = plan_view_change(first, ["127.0.0.1:1", "127.0.0.1:2"], 1)
    replayed = MetadataState()
    replayed.log_index = 3
    replayed.apply(("init", first.to_dict()))
    snapshot = replayed.snapshot()
    del snapshot["revision"]                        # written by the previous version, before revisions
    restored = MetadataState()
    restored.restore(snapshot)
    for state in (replayed, restored):
        state.log_index = 40
        state.apply(("prepare", plan.to_dict(), "127.0.0.1:1"))
    assert replayed.decisions() == restored.decisions() and replayed.decisions()[0] == 40


def test_a_newer_active_epoch_is_taken_whatever_its_revision(tmp_path):
    node, address = idle_node(tmp_path)
    first = ConfigEpoch.initial(("127.0.0.1:1",), 1)
    second = plan_view_change(first, ["127.0.0.1:1", address], 1).epoch
    node.learn(first.to_dict(), None, 50)
    node.learn(second.to_dict(), None, 7)          # a member whose revisions predate an upgrade
    assert node.pushed_revision == 7 and node._news.active["number"] == 2


def test_a_replica_ignores_raft_messages_of_another_group_at_its_peers_address(tmp_path):
    """Defense in depth for the same bug: were a stale replica of an old group still running at an
    address the new group uses, the new group's replica must not take its log (same secret)."""
    from kvs.fsm.shard import ShardState
    from kvs.raft.group import RaftGroup, RaftTiming

    ports = [free_http_port(), free_http_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    timing = RaftTiming(fsync=False)
    old = RaftGroup("shard-3", addresses[0], addresses, ShardState(), str(tmp_path / "old"), "s", timing)
    new = RaftGroup("shard-4", addresses[1], addresses, ShardState(), str(tmp_path / "new"), "s", timing)
    try:
        # Each campaigns at the other's address; were the other's vote counted, one would lead.
        def term(group) -> int:
            return group._replica._SyncObj__raftCurrentTerm

        wait_until(lambda: term(old) >= 4 and term(new) >= 4, 30, interval=0.05,
                   message="both replicas have campaigned several times")
        assert old.leader() is None and new.leader() is None
    finally:
        old.close()
        new.close()
