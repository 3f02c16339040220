"""`next_step`: the one membership change a group's leader takes next (metadata and shard groups)."""

from kvs.reconfig.membership import Step, next_step


def test_adds_come_first_then_removes_then_the_leader_hands_over():
    assert next_step(["a", "b", "c"], ["a", "b", "c", "d"], "a") == Step("add", "d")
    assert next_step(["a", "b", "c"], ["b", "d", "e"], "a") == Step("add", "d")
    assert next_step(["a", "b", "c", "d", "e"], ["b", "d", "e"], "a") == Step("remove", "c")
    assert next_step(["a", "b", "d", "e"], ["b", "d", "e"], "a") == Step("hand over")
    assert next_step(["a", "b", "c"], ["c", "b", "a"], "a") is None


def test_no_member_is_removed_while_one_that_stays_catches_up():
    # d was just added and still receives the snapshot: removing b would make the quorum need d
    assert next_step(["a", "b", "c", "d"], ["a", "c", "d"], "a", lagging=["d"]) is None
    assert next_step(["a", "b", "c", "d"], ["a", "c", "d"], "a", lagging=["b"]) == Step("remove", "b")
    assert next_step(["a", "b", "c"], ["a", "b", "c", "d"], "a", lagging=["b"]) == Step("add", "d")
