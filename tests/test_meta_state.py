"""The metadata state machine: initial epoch, and a view change phase by phase."""

from kvs.fsm.meta import MetadataState
from kvs.fsm.base import Invalid


def plan(number: int) -> dict:
    return {"epoch": {"number": number, "status": "pending", "view": ["a", "b"]}, "moves": []}


def started() -> MetadataState:
    m = MetadataState()
    assert m.apply(("init", {"number": 1, "status": "active"})) == 1
    return m


def test_the_first_init_wins_and_later_ones_change_nothing():
    m = started()
    assert m.apply(("init", {"number": 1, "status": "active", "other": True})) == 1
    assert "other" not in m.active_epoch()
    assert isinstance(MetadataState().apply(("init", {"number": 7})), Invalid)


def test_a_view_change_goes_through_its_phases_in_order():
    m = started()
    assert m.apply(("prepare", plan(2), "a")) == 2
    assert m.apply(("prepare", plan(2), "a")) == 2                      # retried: same answer
    assert isinstance(m.apply(("prepare", plan(3), "b")), Invalid)      # one change at a time
    assert isinstance(m.apply(("commit", 2)), Invalid)                  # not caught up yet
    assert m.apply(("advance", 2, "copying", "a")) == "copying"
    assert m.apply(("advance", 2, "frozen", "b")) == "frozen"           # taken over by b
    assert isinstance(m.apply(("advance", 2, "copying", "b")), Invalid)  # never backwards
    assert m.apply(("advance", 2, "caught-up", "b")) == "caught-up"
    assert m.change()["coordinator"] == "b" and m.change()["steps"] == 3
    assert m.apply(("commit", 2)) == 2 and m.apply(("commit", 2)) == 2
    assert m.active_number == 2 and m.active_epoch()["status"] == "active"
    assert isinstance(m.apply(("abort", 2)), Invalid)                   # too late to roll back
    assert m.apply(("finish", 2)) is True and m.change() is None
    assert m.apply(("prepare", plan(3), "a")) == 3


def test_abort_before_commit_leaves_the_active_epoch():
    m = started()
    m.apply(("prepare", plan(2), "a"))
    m.apply(("advance", 2, "frozen", "a"))
    assert m.apply(("abort", 2)) is True and m.change() is None and m.active_number == 1
    assert isinstance(m.apply(("prepare", plan(5), "a")), Invalid)      # stale numbering


def test_snapshot_restore_keeps_the_change():
    m = started()
    m.apply(("prepare", plan(2), "a"))
    copy = MetadataState()
    copy.restore(m.snapshot())
    assert copy.change()["phase"] == "prepared" and copy.active_number == 1


def test_only_one_node_can_claim_a_stalled_change():
    m = started()
    m.apply(("prepare", plan(2), "a"))
    steps = m.change()["steps"]
    assert m.apply(("claim", 2, "a", steps, "b")) is True
    assert m.apply(("claim", 2, "a", steps, "c")) is False          # b got there first
    assert m.change()["coordinator"] == "b"
    assert m.apply(("claim", 3, "b", steps + 1, "c")) is False


def test_a_plan_may_not_reuse_the_shard_id_of_a_rolled_back_plan():
    from kvs.config.epoch import ConfigEpoch
    from kvs.reconfig.planner import plan_view_change
    a, b, c = "10.0.0.1:13800", "10.0.0.2:13800", "10.0.0.3:13800"
    first = ConfigEpoch.initial((a, b), 1)
    m = MetadataState()
    m.apply(("init", first.to_dict()))
    plan = plan_view_change(first, [a, b, c])
    assert m.apply(("prepare", plan.to_dict(), a)) == 2
    assert m.apply(("abort", 2)) is True
    assert m.max_shard_id == 3
    again = plan_view_change(first, [a, b, c])                    # planned from the active epoch alone
    assert isinstance(m.apply(("prepare", again.to_dict(), a)), Invalid)
    from dataclasses import replace
    floored = plan_view_change(replace(first, max_shard_id=m.max_shard_id), [a, b, c])
    assert floored.new_groups == ("4",)
    assert m.apply(("prepare", floored.to_dict(), a)) == 2


def test_a_rollback_unwinds_before_it_aborts_and_nodes_are_told():
    """While kept shards' members go back ("unwinding"), the plan stays published, as "unwinding", so
    nodes keep its replicas running; it can neither go on nor commit; the abort ends it."""
    m = started()
    m.apply(("prepare", plan(2), "a"))
    m.apply(("advance", 2, "copying", "a"))
    revision = m.decisions()[0]
    assert m.apply(("advance", 2, "unwinding", "b")) == "unwinding"
    assert m.apply(("advance", 2, "unwinding", "c")) == "unwinding"          # a takeover unwinds again
    new_revision, active, pending = m.decisions()
    assert new_revision > revision and active["number"] == 1
    assert pending["number"] == 2 and pending["status"] == "unwinding"
    assert m.change()["plan"]["epoch"]["status"] == "pending"                # the plan itself is untouched
    assert isinstance(m.apply(("advance", 2, "caught-up", "b")), Invalid)
    assert isinstance(m.apply(("commit", 2)), Invalid)
    assert m.apply(("abort", 2)) is True and m.decisions()[2] is None and m.active_number == 1


def test_a_committed_change_cannot_unwind():
    m = started()
    m.apply(("prepare", plan(2), "a"))
    m.apply(("advance", 2, "caught-up", "a"))
    m.apply(("commit", 2))
    assert isinstance(m.apply(("advance", 2, "unwinding", "a")), Invalid)
    assert m.decisions()[2] is None
