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


# -- a shard leader's add: only a caught-up learner, or a voter outside the configuration ------------------

from kvs.reconfig.protocol import GroupStatus, NodeStatus  # noqa: E402
from kvs.reconfig.shard_membership import CAUGHT_UP_SLACK, ShardMembership  # noqa: E402
from kvs.routing.peers import PeerUnreachable  # noqa: E402


class FakeGroup:
    self_address = "a:2"

    def __init__(self, members, lagging=(), commit=1000):
        self._members, self._lagging, self.commit_index = list(members), list(lagging), commit
        self.changes: list[tuple[str, str]] = []

    def members(self):
        return sorted(self._members)

    def lagging_members(self, slack):
        return self._lagging

    def change_members(self, op, member, deadline, on_appended):
        self.changes.append((op, member))

    def transfer_leadership(self):
        self.changes.append(("hand over", ""))


class FakeRemote:
    def __init__(self, replica: GroupStatus | None | str):
        self.replica = replica

    def status(self, address, deadline):
        if self.replica == "unreachable":
            raise PeerUnreachable(address)
        groups = {} if self.replica is None else {"shard-1": self.replica}
        return NodeStatus(epoch=2, shard_id=None, groups=groups)


def add_taken(replica, lagging=(), joiners=("d:2",)) -> bool:
    group = FakeGroup(["a:2", "b:2", "c:2"], lagging)
    target = {"a:2": "a:1", "b:2": "b:1", "c:2": "c:1", "d:2": "d:1"}
    ShardMembership(node=None, remote=FakeRemote(replica))._step("1", group, target, set(joiners))
    return group.changes == [("add", "d:2")]


def learner(applied: int) -> GroupStatus:
    return GroupStatus(leader="a:2", members=["a:2", "b:2", "c:2"], role="learner", last_applied=applied)


def test_a_learner_is_added_only_once_it_has_caught_up():
    assert not add_taken(learner(0))
    assert not add_taken(learner(1000 - CAUGHT_UP_SLACK - 1))
    assert add_taken(learner(1000 - CAUGHT_UP_SLACK))


def test_a_node_with_no_replica_yet_unreachable_or_failed_is_not_added():
    assert not add_taken(None)
    assert not add_taken("unreachable")
    assert not add_taken(GroupStatus(leader=None, members=[], role="failed"))


def test_a_voter_outside_the_configuration_is_added_back_at_once():
    # removed and wanted back by a rollback: it receives nothing until it is a member again
    assert add_taken(GroupStatus(leader=None, members=["a:2", "b:2", "c:2", "d:2"], role="follower", last_applied=3))


def test_one_joiner_at_a_time_but_a_lagging_member_that_stays_does_not_hold_an_add_up():
    assert not add_taken(learner(1000), lagging=["e:2"], joiners=("d:2", "e:2"))       # e still acknowledges nothing
    assert add_taken(learner(1000), lagging=["c:2"], joiners=("d:2",))                 # c is down, and stays


def test_a_rollback_takes_the_added_member_out_before_it_puts_back_a_removed_one_that_is_dead():
    # the plan replaced c by d; rolling back, c (dead) is wanted back and d must go: d goes first
    group = FakeGroup(["a:2", "b:2", "d:2"])
    target = {"a:2": "a:1", "b:2": "b:1", "c:2": "c:1"}
    membership = ShardMembership(node=None, remote=FakeRemote("unreachable"))
    assert membership._step("1", group, target, set(), unwinding=True)
    assert group.changes == [("remove", "d:2")]
    # outside a rollback adds come first: the dead c blocks, and nothing is removed meanwhile
    forward = FakeGroup(["a:2", "b:2", "d:2"])
    assert not membership._step("1", forward, target, {"c:2"})
    assert forward.changes == []
    # once the added member is out, the rollback still puts back the removed one when it can be reached
    back = FakeGroup(["a:2", "b:2"])
    revived = ShardMembership(node=None, remote=FakeRemote(
        GroupStatus(leader=None, members=["a:2", "b:2", "c:2"], role="follower", last_applied=3)))
    assert revived._step("1", back, target, set(), unwinding=True)
    assert back.changes == [("add", "c:2")]


def test_a_rollback_never_shrinks_a_group_below_a_quorum_of_the_set_it_goes_back_to():
    from kvs.reconfig.shard_membership import rollback_removal
    # every replica replaced (x, y, z back to a, b, c): the old ones come back first, none removed before
    assert rollback_removal(["x:2", "y:2", "z:2"], ["a:2", "b:2", "c:2"], "x:2", []) is None
    assert rollback_removal(["a:2", "y:2", "z:2"], ["a:2", "b:2", "c:2"], "a:2", []) is None
    group = FakeGroup(["a:2", "y:2", "z:2"])
    alive = ShardMembership(node=None, remote=FakeRemote(
        GroupStatus(leader=None, members=[], role="follower", last_applied=3)))
    assert alive._step("1", group, {"a:2": "a:1", "b:2": "b:1", "c:2": "c:1"}, set(), unwinding=True)
    assert group.changes == [("add", "b:2")]
    # two of three back: the added one may go while the dead third is away
    assert rollback_removal(["a:2", "b:2", "d:2"], ["a:2", "b:2", "c:2"], "a:2", []) == Step("remove", "d:2")
    # the dead c lags and so does the added d: d still goes (a and b are a majority of a, b, c)
    assert rollback_removal(["a:2", "b:2", "c:2", "d:2"], ["a:2", "b:2", "c:2"], "a:2", ["c:2", "d:2"]) \
        == Step("remove", "d:2")
    # ... but not if what is left would need a lagging member for its quorum
    assert rollback_removal(["a:2", "b:2", "c:2", "d:2"], ["a:2", "b:2", "c:2"], "a:2", ["b:2", "c:2"]) is None
    # the leader is the added one: it hands over first
    assert rollback_removal(["a:2", "b:2", "d:2"], ["a:2", "b:2", "c:2"], "d:2", []) == Step("hand over")


# -- the metadata leader: no step while its previous change is uncommitted --------------------------------

from types import SimpleNamespace  # noqa: E402

from kvs.reconfig.membership import MetadataMembership  # noqa: E402


class FakeMetadataGroup(FakeGroup):
    def __init__(self, members, pending: bool):
        super().__init__(members)
        self.pending = pending

    def is_leader(self):
        return True

    def membership_change_pending(self):
        return self.pending


class TellingRemote:
    def __init__(self):
        self.told: list[str] = []

    def tell_metadata(self, address, message):
        self.told.append(address)
        return True


def metadata_step(pending: bool) -> tuple[FakeMetadataGroup, TellingRemote]:
    group = FakeMetadataGroup(["a:2", "b:2", "c:2"], pending)
    settings = SimpleNamespace(raft_address=lambda http, slot: http.replace(":0", ":2"),
                               http_address=lambda raft, slot: raft.replace(":2", ":0"))
    node = SimpleNamespace(metadata_group=group, settings=settings, change=lambda: None,
                           epoch=SimpleNamespace(metadata_members=["a:0", "b:0", "c:0", "d:0"]))
    remote = TellingRemote()
    MetadataMembership(node, remote).step()
    return group, remote


def test_the_metadata_leader_takes_no_step_while_its_previous_change_is_uncommitted():
    """Another change would be refused (kvs.raft.replica change 6) after its joiner had been told to
    open a voting replica, which would then campaign from outside the group."""
    group, remote = metadata_step(pending=True)
    assert group.changes == [] and remote.told == []
    group, remote = metadata_step(pending=False)
    assert group.changes == [("add", "d:2")] and remote.told == ["d:0"]
