import json
from bisect import bisect_left

import pytest

from kvs.errors import BadRequest
from kvs.config.epoch import ConfigEpoch
from kvs.reconfig.planner import Move, Plan, plan_add_member, plan_layout, plan_remove_member, plan_view_change
from kvs.config.ring import RING_SIZE, HashRing, key_hash

A, B, C, D, E, F, G = (f"10.0.0.{i}:13800" for i in range(1, 8))
KEYS = ["key-%d" % i for i in range(10_000)]


def move_index(plan: Plan) -> tuple[list[int], list[tuple[int, int, Move]]]:
    """Every move's arcs cut at the top of the ring, sorted; fails if any two overlap."""
    pieces = []
    for move in plan.moves:
        for r in move.ranges:
            if r.start < r.end:
                pieces.append((r.start, r.end, move))
            else:  # wraps around 0 (or is the whole ring if start == end)
                pieces.append((r.start, RING_SIZE - 1, move))
                pieces.append((-1, r.end, move))
    pieces.sort(key=lambda p: p[1])
    for before, after in zip(pieces, pieces[1:]):
        assert after[0] >= before[1], "two moved ranges overlap"
    return [p[1] for p in pieces], pieces


def check_moves(current: ConfigEpoch, plan: Plan) -> int:
    """Every key whose owner changes is in exactly one move's ranges, with the right
    source and destination; a key that keeps its owner is in none. Returns #moved."""
    ends, pieces = move_index(plan)
    moved = 0
    for key in KEYS:
        h = key_hash(key)
        old, new = current.shard_for_key(key), plan.epoch.shard_for_key(key)
        i = bisect_left(ends, h)
        hit = pieces[i][2] if i < len(pieces) and pieces[i][0] < h <= pieces[i][1] else None
        assert (hit is None) == (old == new), key
        if hit is not None:
            moved += 1
            assert (hit.source, hit.destination) == (old, new), key
    for key in KEYS[:200]:  # cross-check the index against HashRange.contains
        h = key_hash(key)
        hits = [(m.source, m.destination) for m in plan.moves for r in m.ranges if r.contains(h)]
        old, new = current.shard_for_key(key), plan.epoch.shard_for_key(key)
        assert hits == ([] if old == new else [(old, new)]), key
    for move in plan.moves:
        assert move.ranges and all(r.group == move.destination for r in move.ranges)
    return moved


def check_invariants(current: ConfigEpoch, plan: Plan) -> None:
    epoch = plan.epoch
    assert epoch.number == current.number + 1
    assert epoch.status == "pending"
    assert epoch.metadata_members == epoch.view             # the metadata group follows the view
    assert epoch.ring == HashRing(epoch.shards, current.ring.vnodes)
    assert set(epoch.slots) == set(epoch.shards)
    for sid, replicas in epoch.shards.items():
        assert set(epoch.slots[sid]) == set(replicas)
    assert [(m.source, m.destination) for m in plan.moves] == sorted((m.source, m.destination) for m in plan.moves)
    assert set(plan.new_groups) == set(epoch.shards) - set(current.shards)
    assert set(plan.retired_groups) == set(current.shards) - set(epoch.shards)
    # A replica that joins a group (new or kept) never shares a slot (a Raft port) with any current
    # group on its node; one that stays keeps its slot.
    for sid, slots in epoch.slots.items():
        for address, slot in slots.items():
            assert slot >= 1
            if address in current.shards.get(sid, ()):
                assert slot == current.slots[sid][address], (sid, address)
            else:
                assert all(s.get(address) != slot for s in current.slots.values()), (sid, address)
    # A kept shard's replica changes are listed, and only those; a kept shard's keys never move away
    # unless the shard count changes.
    changed = {m.shard: (set(m.added), set(m.removed)) for m in plan.members}
    for sid in set(epoch.shards) & set(current.shards):
        added, removed = set(epoch.shards[sid]) - set(current.shards[sid]), set(current.shards[sid]) - set(epoch.shards[sid])
        assert changed.get(sid, (set(), set())) == (added, removed), sid
    if len(epoch.shards) == len(current.shards):
        assert plan.moves == () and plan.new_groups == () and plan.retired_groups == ()
    # Retired groups lose all their keys.
    for sid in plan.retired_groups:
        assert not any(current.shard_for_key(k) == sid and epoch.shard_for_key(k) == sid for k in KEYS)


def sources_destinations(plan: Plan) -> list[tuple[str, str]]:
    return [(m.source, m.destination) for m in plan.moves]


# -- shapes -------------------------------------------------------------------


def test_one_node_to_four_with_repl_two():
    current = ConfigEpoch.initial((A,), 1)
    plan = plan_view_change(current, [A, B, C, D], 2)
    epoch = plan.epoch
    assert epoch.view == (A, B, C, D) and epoch.repl_factor == 2
    assert epoch.shards == {"1": (A, B), "2": (C, D)}           # shard 1 grows in place, 2 is new
    assert epoch.slots == {"1": {A: 1, B: 1}, "2": {C: 1, D: 1}}
    assert epoch.ring.groups == ("1", "2")
    assert plan.new_groups == ("2",)
    assert plan.retired_groups == ()
    assert [m.to_dict() for m in plan.members] == [{"shard": "1", "added": [B], "removed": []}]
    assert sources_destinations(plan) == [("1", "2")]
    check_invariants(current, plan)
    assert 0.3 <= check_moves(current, plan) / len(KEYS) <= 0.7    # half the keys, not all


def test_two_to_four_nodes_keeps_old_shards():
    current = ConfigEpoch.initial((A, B), 1)
    plan = plan_view_change(current, [A, B, C, D])
    epoch = plan.epoch
    assert epoch.repl_factor == 1
    assert epoch.shards == {"1": (A,), "2": (B,), "3": (C,), "4": (D,)}
    assert epoch.slots == {"1": {A: 1}, "2": {B: 1}, "3": {C: 1}, "4": {D: 1}}
    assert epoch.ring.groups == ("1", "2", "3", "4")
    assert plan.new_groups == ("3", "4")
    assert plan.retired_groups == ()
    assert {m.source for m in plan.moves} == {"1", "2"}
    assert {m.destination for m in plan.moves} == {"3", "4"}
    assert sources_destinations(plan) == [("1", "3"), ("1", "4"), ("2", "3"), ("2", "4")]
    check_invariants(current, plan)
    moved = check_moves(current, plan)
    assert 0.35 <= moved / len(KEYS) <= 0.65, moved
    for key in KEYS:  # a key that stays, stays with the same shard id
        if epoch.shard_for_key(key) in ("1", "2"):
            assert current.shard_for_key(key) == epoch.shard_for_key(key)


def test_four_to_two_nodes_retires_shards_three_and_four():
    current = ConfigEpoch.initial((A, B, C, D), 1)
    plan = plan_view_change(current, [A, B])
    epoch = plan.epoch
    assert epoch.shards == {"1": (A,), "2": (B,)}
    assert epoch.slots == {"1": {A: 1}, "2": {B: 1}}
    assert epoch.ring.groups == ("1", "2")
    assert plan.new_groups == ()
    assert plan.retired_groups == ("3", "4")
    assert {m.source for m in plan.moves} == {"3", "4"}
    assert {m.destination for m in plan.moves} == {"1", "2"}
    check_invariants(current, plan)
    check_moves(current, plan)
    for key in KEYS:
        if current.shard_for_key(key) in ("1", "2"):
            assert epoch.shard_for_key(key) == current.shard_for_key(key)


def test_repl_factor_two_to_three_on_the_same_nodes():
    current = ConfigEpoch.initial((A, B, C, D, E, F), 2)
    plan = plan_view_change(current, [A, B, C, D, E, F], 3)
    epoch = plan.epoch
    assert epoch.repl_factor == 3
    # 3 shards -> 2: shards 1 and 3 keep their ids and grow in place (C and D leave shard 2 for them,
    # in slot 2 while shard 2 still runs in slot 1); only retired shard 2's keys move
    assert epoch.shards == {"1": (A, B, C), "3": (D, E, F)}
    assert epoch.slots == {"1": {A: 1, B: 1, C: 2}, "3": {D: 2, E: 1, F: 1}}
    assert epoch.ring.groups == ("1", "3")
    assert plan.new_groups == ()
    assert plan.retired_groups == ("2",)
    assert [(m.shard, m.added, m.removed) for m in plan.members] == [("1", (C,), ()), ("3", (D,), ())]
    assert sources_destinations(plan) == [("2", "1"), ("2", "3")]
    check_invariants(current, plan)
    assert check_moves(current, plan) < 0.5 * len(KEYS)


def test_every_node_replaced():
    current = ConfigEpoch.initial((A, B), 1)
    plan = plan_view_change(current, [C, D])
    epoch = plan.epoch
    # the same shard count: each shard's only replica is replaced in place (C joins shard 1, takes over
    # its leadership, A leaves), no key moves
    assert epoch.shards == {"1": (C,), "2": (D,)}
    assert epoch.slots == {"1": {C: 1}, "2": {D: 1}}
    assert epoch.ring == current.ring
    assert plan.new_groups == () and plan.retired_groups == () and plan.moves == ()
    assert [(m.shard, m.added, m.removed) for m in plan.members] == [("1", (C,), (A,)), ("2", (D,), (B,))]
    assert epoch.metadata_members == (C, D)  # the metadata group follows the view after the commit
    check_invariants(current, plan)


def test_down_to_a_single_node():
    current = ConfigEpoch.initial((A, B, C, D, E, F), 3)
    plan = plan_view_change(current, [D], 1)
    epoch = plan.epoch
    assert epoch.view == (D,) and epoch.repl_factor == 1
    assert epoch.shards == {"2": (D,)}                      # D's shard shrinks to D; shard 1 retires
    assert epoch.slots == {"2": {D: 1}}
    assert epoch.ring.groups == ("2",)
    assert plan.new_groups == ()
    assert plan.retired_groups == ("1",)
    assert [(m.shard, m.added, m.removed) for m in plan.members] == [("2", (), (E, F))]
    assert sources_destinations(plan) == [("1", "2")]
    check_invariants(current, plan)
    assert check_moves(current, plan) < 0.7 * len(KEYS)


@pytest.mark.parametrize("view, repl", [((A,), 1), ((A, B, C, D), 1), ((A, B, C, D, E, F), 3)])
def test_same_view_same_repl_moves_nothing(view, repl):
    current = ConfigEpoch.initial(view, repl)
    plan = plan_view_change(current, list(view))
    assert plan.moves == ()
    assert plan.new_groups == () and plan.retired_groups == ()
    assert plan.epoch.number == 2 and plan.epoch.status == "pending"
    assert plan.epoch.shards == current.shards
    assert plan.epoch.slots == current.slots
    assert plan.epoch.ring == current.ring
    check_invariants(current, plan)


def test_kept_group_matches_on_the_replica_set_not_the_order():
    current = ConfigEpoch.initial((A, B, C, D), 2)
    plan = plan_view_change(current, [D, C, B, A])
    assert plan.epoch.shards == {"2": (D, C), "1": (B, A)}
    assert plan.epoch.slots == current.slots
    assert plan.moves == () and plan.new_groups == () and plan.retired_groups == ()


def test_slot_is_the_lowest_free_one_not_max_plus_one():
    # After 1 -> {a,b},{c,d}, node a runs group 2 in slot 2 and slot 1 is free again.
    first = plan_view_change(ConfigEpoch.initial((A,), 1), [A, B, C, D], 2)
    committed = ConfigEpoch.from_dict({**first.epoch.to_dict(), "status": "active"})
    plan = plan_view_change(committed, [A, B, C, D], 1)
    assert plan.epoch.shards == {"1": (A,), "3": (B,), "2": (C,), "4": (D,)}
    # B and D leave their shards for new groups: slot 1 is theirs until the change ends, so slot 2
    assert plan.epoch.slots == {"1": {A: 1}, "3": {B: 2}, "2": {C: 1}, "4": {D: 2}}
    assert plan.new_groups == ("3", "4") and plan.retired_groups == ()
    check_invariants(committed, plan)
    check_moves(committed, plan)
    # after 1 -> 2 -> 1 shards, a node's slot 1 may be free again: a joining replica takes the lowest
    again = active(plan_view_change(active(plan_view_change(committed, [A, C], 1)), [A, B, C, D], 1))
    assert again.shards == {"1": (A,), "3": (B,), "2": (C,), "4": (D,)}
    assert again.slots == {"1": {A: 1}, "3": {B: 1}, "2": {C: 1}, "4": {D: 1}}


def test_a_kept_group_keeps_the_slots_of_the_replicas_that_stay():
    first = plan_view_change(ConfigEpoch.initial((A, B, C, D), 1), [A, B, C, D], 2)
    committed = active(first)
    assert committed.slots == {"1": {A: 1, B: 2}, "3": {C: 1, D: 2}}
    keep = plan_view_change(committed, [B, A, E, F])
    assert keep.epoch.shards == {"1": (B, A), "3": (E, F)}
    assert keep.epoch.slots == {"1": {A: 1, B: 2}, "3": {E: 1, F: 1}}
    assert keep.moves == () and keep.new_groups == () and keep.retired_groups == ()
    check_invariants(committed, keep)


def test_addresses_are_normalized_and_ids_follow_the_largest_ever_used():
    current = plan_view_change(ConfigEpoch.initial((A, B), 1), [B]).epoch  # shards {"2": (B,)}
    plan = plan_view_change(current, ["10.0.0.2", " 10.0.0.5:13800"])
    assert plan.epoch.view == (B, E)
    assert plan.epoch.shards == {"2": (B,), "3": (E,)}
    assert plan.new_groups == ("3",)


# -- explicit layouts, add-member, remove-member ---------------------------------


def active(plan: Plan) -> ConfigEpoch:
    """The plan's epoch as it is once committed (the next plan starts from it)."""
    return ConfigEpoch.from_dict({**plan.epoch.to_dict(), "status": "active"})


def test_view_change_is_the_layout_of_its_blocks():
    current = ConfigEpoch.initial((A, B, C, D), 2)
    assert plan_view_change(current, [A, B, E, F, C, D], 2) == plan_layout(current, [(A, B), (E, F), (C, D)])
    assert plan_view_change(current, [A, B, C, D], 1) == plan_layout(current, [[A], [B], [C], [D]])


def test_layout_of_unequal_groups():
    current = ConfigEpoch.initial((A, B, C, D), 2)
    plan = plan_layout(current, [(C, D), (A, B, E), (F,)])
    epoch = plan.epoch
    assert epoch.view == (C, D, A, B, E, F)
    assert epoch.repl_factor == 1                 # the smallest group: what every key is guaranteed
    assert epoch.shards == {"2": (C, D), "1": (A, B, E), "3": (F,)}
    assert epoch.slots == {"2": {C: 1, D: 1}, "1": {A: 1, B: 1, E: 1}, "3": {F: 1}}
    assert plan.new_groups == ("3",) and plan.retired_groups == ()
    assert [(m.shard, m.added, m.removed) for m in plan.members] == [("1", (E,), ())]
    check_invariants(current, plan)
    check_moves(current, plan)
    assert ConfigEpoch.from_dict(json.loads(json.dumps(epoch.to_dict()))) == epoch


def test_add_member_grows_the_shard_in_place():
    current = ConfigEpoch.initial((A, B), 1)
    plan = plan_add_member(current, C, "1")
    epoch = plan.epoch
    assert epoch.view == (A, C, B)                # the new node follows its shard in the view
    assert epoch.repl_factor == 1
    assert epoch.shards == {"1": (A, C), "2": (B,)}
    assert epoch.slots == {"1": {A: 1, C: 1}, "2": {B: 1}}
    assert epoch.ring == current.ring and epoch.origins == current.origins
    assert plan.new_groups == () and plan.retired_groups == () and plan.moves == ()
    assert [m.to_dict() for m in plan.members] == [{"shard": "1", "added": [C], "removed": []}]
    assert plan.summary()["moves-keys"] is False
    check_invariants(current, plan)


def test_add_member_to_a_three_replica_shard_keeps_the_other_shard():
    current = ConfigEpoch.initial((A, B, C, D, E, F), 3)
    plan = plan_add_member(current, "10.0.0.7", "2")          # addresses are normalised
    assert plan.epoch.shards == {"1": (A, B, C), "2": (D, E, F, G)}
    assert plan.epoch.repl_factor == 3
    assert plan.epoch.slots == {"1": current.slots["1"], "2": {**current.slots["2"], G: 1}}
    assert plan.new_groups == () and plan.retired_groups == () and plan.moves == ()
    check_invariants(current, plan)


def test_remove_a_replica_of_a_three_replica_shard():
    current = ConfigEpoch.initial((A, B, C, D, E, F), 3)
    plan = plan_remove_member(current, E)
    epoch = plan.epoch
    assert epoch.view == (A, B, C, D, F)
    assert epoch.shards == {"1": (A, B, C), "2": (D, F)}
    assert epoch.repl_factor == 2
    assert epoch.slots == {"1": {A: 1, B: 1, C: 1}, "2": {D: 1, F: 1}}
    assert plan.new_groups == () and plan.retired_groups == () and plan.moves == ()
    assert [(m.shard, m.added, m.removed) for m in plan.members] == [("2", (), (E,))]
    check_invariants(current, plan)


def test_remove_the_sole_replica_retires_its_shard():
    current = ConfigEpoch.initial((A, B, C), 1)
    plan = plan_remove_member(current, "10.0.0.2")
    assert plan.epoch.view == (A, C)
    assert plan.epoch.shards == {"1": (A,), "3": (C,)} and plan.epoch.repl_factor == 1
    assert plan.new_groups == () and plan.retired_groups == ("2",)
    assert {m.source for m in plan.moves} == {"2"}            # the others keep their keys
    check_invariants(current, plan)
    check_moves(current, plan)


def test_add_then_remove_and_a_later_view_change_keep_the_smallest_group_as_repl_factor():
    grown = active(plan_add_member(ConfigEpoch.initial((A, B, C, D), 2), E, "2"))
    assert grown.shards == {"1": (A, B), "2": (C, D, E)} and grown.repl_factor == 2
    shrunk = plan_remove_member(grown, A)
    assert shrunk.epoch.shards == {"1": (B,), "2": (C, D, E)} and shrunk.epoch.repl_factor == 1
    assert shrunk.epoch.slots["1"] == {B: 1}
    check_invariants(grown, shrunk)
    # repl-factor omitted keeps the current one: 5 nodes in blocks of 2 cannot be
    with pytest.raises(BadRequest, match="multiple of repl-factor 2"):
        plan_view_change(grown, list(grown.view))
    assert plan_view_change(grown, [A, B, C, D]).epoch.shards == {"1": (A, B), "2": (C, D)}


def test_a_retired_id_is_never_reused():
    # nodes keep a retired group's journal under its id: a new group with that id would start from it
    two = active(plan_view_change(ConfigEpoch.initial((A, B, C, D), 1), [A, B]))
    assert two.shards == {"1": (A,), "2": (B,)} and two.max_shard_id == 4
    assert plan_view_change(two, [A, B, C, D]).epoch.shards == {"1": (A,), "2": (B,), "5": (C,), "6": (D,)}
    alone = active(plan_remove_member(ConfigEpoch.initial((A, B), 1), B))
    assert alone.shards == {"1": (A,)} and alone.max_shard_id == 2
    assert plan_view_change(alone, [A, B]).epoch.shards == {"1": (A,), "3": (B,)}
    # an epoch stored before the high-water mark existed numbers after its largest current id
    older = {k: v for k, v in two.to_dict().items() if k != "max_shard_id"}
    assert plan_view_change(ConfigEpoch.from_dict(older), [A, B, C]).new_groups == ("3",)


def test_member_plans_do_not_depend_on_dict_order():
    d = active(plan_add_member(ConfigEpoch.initial((A, B, C, D, E, F), 2), G, "2")).to_dict()
    shuffled = {**d, "shards": dict(reversed(d["shards"].items()))}
    for plan in (lambda e: plan_add_member(e, "10.0.0.9", "3"), lambda e: plan_remove_member(e, B)):
        one, two = plan(ConfigEpoch.from_dict(d)), plan(ConfigEpoch.from_dict(shuffled))
        assert json.dumps(one.to_dict()) == json.dumps(two.to_dict())


@pytest.mark.parametrize("groups, words", [
    ([], "empty"),
    ([(A,), ()], "group 2 of the layout is empty"),
    ([(A, B), (C, "10.0.0.1")], "duplicate addresses in the layout: " + A),
    ([(A,), A], "must be a list of addresses"),
    (A, "list of replica groups"),
    ({"1": (A,)}, "list of replica groups"),
    ([(A, 7)], "malformed"),
    ([(A, "10.0.0.2:port")], "malformed"),
])
def test_bad_layouts(groups, words):
    with pytest.raises(BadRequest) as info:
        plan_layout(ConfigEpoch.initial((A, B), 1), groups)
    assert words in info.value.message


@pytest.mark.parametrize("request_, words", [
    (lambda e: plan_add_member(e, C, "9"), "shard 9 does not exist"),
    (lambda e: plan_add_member(e, "10.0.0.1", "2"), "already in the view"),
    (lambda e: plan_add_member(e, "10.0.0.3:x", "1"), "malformed"),
    (lambda e: plan_remove_member(e, C), "not in the view"),
    (lambda e: plan_remove_member(e, ""), "empty address"),
])
def test_bad_member_requests(request_, words):
    with pytest.raises(BadRequest) as info:
        request_(ConfigEpoch.initial((A, B), 1))
    assert words in info.value.message


def test_the_last_node_cannot_be_removed():
    with pytest.raises(BadRequest, match="last node"):
        plan_remove_member(ConfigEpoch.initial((A,), 1), A)


# -- errors -------------------------------------------------------------------


@pytest.mark.parametrize("view, repl, words", [
    ([], None, "empty"),
    ([A, B, A], None, "duplicate"),
    ([A, "10.0.0.1"], None, "duplicate"),
    ([A, B, C], 2, "multiple"),
    ([A, B], 0, "at least 1"),
    ([A, B], -1, "at least 1"),
    ([A, "10.0.0.2:port"], None, "malformed"),
    ([A, "10.0.0.2:70000"], None, "malformed"),
    ([A, ""], None, "empty address"),
    (A, None, "list"),
])
def test_bad_requests(view, repl, words):
    current = ConfigEpoch.initial((A, B), 1)
    with pytest.raises(BadRequest) as info:
        plan_view_change(current, view, repl)
    assert words in info.value.message


# -- data and determinism -----------------------------------------------------


def test_plan_round_trips_through_json():
    current = ConfigEpoch.initial((A, B), 1)
    plan = plan_view_change(current, [A, B, C, D])
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["moves"][0]["ranges"][0] == [plan.moves[0].ranges[0].start, plan.moves[0].ranges[0].end,
                                             plan.moves[0].destination]
    back = Plan.from_dict(data)
    assert back == plan
    assert back.to_dict() == plan.to_dict()
    assert back.epoch.status == "pending"
    assert all(isinstance(m, Move) for m in back.moves)


def test_same_inputs_give_equal_plans_and_current_is_untouched():
    current = ConfigEpoch.initial((A, B, C, D), 2)
    before = current.to_dict()
    one = plan_view_change(current, [A, B, E, F], 2)
    two = plan_view_change(ConfigEpoch.from_dict(before), [A, B, E, F], 2)
    assert one == two
    assert json.dumps(one.to_dict()) == json.dumps(two.to_dict())
    assert current.to_dict() == before


def test_current_dict_order_does_not_matter():
    d = ConfigEpoch.initial((A, B, C, D, E, F), 2).to_dict()
    shuffled = {**d, "shards": dict(reversed(d["shards"].items())),
                "slots": {sid: dict(reversed(s.items())) for sid, s in reversed(d["slots"].items())}}
    one = plan_view_change(ConfigEpoch.from_dict(d), [C, D, A, E])
    two = plan_view_change(ConfigEpoch.from_dict(shuffled), [C, D, A, E])
    assert one.epoch.shards == {"2": (C, D), "1": (A, E)} and one.retired_groups == ("3",)
    assert list(ConfigEpoch.from_dict(shuffled).shards) != list(ConfigEpoch.from_dict(d).shards)
    assert json.dumps(one.to_dict()) == json.dumps(two.to_dict())


def test_view_order_matters():
    current = ConfigEpoch.initial((A,), 1)
    one = plan_view_change(current, [A, B, C, D], 2)
    two = plan_view_change(current, [C, D, A, B], 2)
    assert one != two
    assert one.epoch.shards == {"1": (A, B), "2": (C, D)} and one.epoch.view == (A, B, C, D)
    assert two.epoch.shards == {"2": (C, D), "1": (A, B)} and two.epoch.view == (C, D, A, B)
    assert two.epoch.slots == {"2": {C: 1, D: 1}, "1": {A: 1, B: 1}}


def test_every_group_starts_from_the_epoch_that_created_it():
    """Replicas re-created at a later epoch must replay their log from the same state as their peers."""
    first = ConfigEpoch.initial((A, B), 1)
    second = plan_view_change(first, [A, B, C]).epoch
    third = plan_view_change(ConfigEpoch.from_dict({**second.to_dict(), "status": "active"}), [A, C]).epoch
    assert first.origin("1") == second.origin("1") == third.origin("1") == (1, first.ring.to_dict())
    (new,) = [sid for sid in second.shards if sid not in first.shards]
    assert second.origin(new) == third.origin(new) == (2, second.ring.to_dict())
    assert ConfigEpoch.from_dict(third.to_dict()).origins == third.origins


def test_planning_a_thousand_node_view_costs_about_what_a_hundred_node_one_does():
    """Issue 11 defect 1: a view of 1,000 addresses took 26 s and 497 MB to plan (1.7 s for 100): the
    work grew with the square of the view. The ring's token budget now bounds it; this checks the growth,
    in this process's CPU time (best of three: other processes do not count), not a speed."""
    import time

    current = ConfigEpoch.initial(("127.0.0.1:13800", "127.0.0.1:13801", "127.0.0.1:13802"), 1)

    def cpu_seconds(nodes: int) -> float:
        view = [f"127.1.{i // 250}.{i % 250 + 1}:1" for i in range(nodes)]
        best = float("inf")
        for _ in range(3):
            began = time.process_time()
            plan = plan_view_change(current, view, 1)
            best = min(best, time.process_time() - began)
        assert len(plan.epoch.shards) == nodes
        return best

    hundred, thousand = cpu_seconds(100), cpu_seconds(1000)
    assert thousand < 5 * hundred, (hundred, thousand)      # quadratic work would be 100 times
