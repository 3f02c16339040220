"""Epochs from peers and from a node's own files are checked for meaning, not only for shape.

Regression of an outside review: `ConfigEpoch.from_dict` took a number given as "99", a ring naming a
shard that does not exist, a view entry "127.0.0.1:23890/x?y=:1", no shards at all and 2,000,000 vnodes
(22 s of CPU to build the ring). A signed push of an epoch numbered "99" was answered 200 and saved to
epochs.json; the next push got a 500 (str compared with int) and the node's supervisor failed every
round, again after a restart. Now every such epoch is refused (`InvalidEpoch`, a ValueError) before any
ring is built, every epoch the code makes still round-trips, and a broken epochs.json is set aside.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest

from kvs.config import epoch as epoch_module
from kvs.config.epoch import MAX_RING_TOKENS, MAX_VNODES, ConfigEpoch, InvalidEpoch, _check_epoch
from kvs.config.ring import DEFAULT_VNODES, ring_vnodes
from kvs.config.records import PUSHED_FILE, EpochNews, load_record, valid_pushed
from kvs.node import Node
from kvs.reconfig.planner import plan_add_member, plan_layout, plan_remove_member, plan_view_change
from kvs.reconfig.protocol import Epochs, KnownEpochs
from kvs.settings import MAX_VIEW_NODES, NodeSettings

A, B, C, D, E, F, G, H = (f"10.0.0.{i}:13800" for i in range(1, 9))
GOOD = ConfigEpoch.initial((A, B, C, D), 2).to_dict()


def good() -> dict:
    """A valid epoch dict: 4 nodes in 2 shards of 2 (a fresh copy every time)."""
    return copy.deepcopy(GOOD)


def committed(epoch: ConfigEpoch) -> ConfigEpoch:
    """The plan's epoch as the metadata group commits it (`kvs.fsm.meta`: status "active")."""
    return ConfigEpoch.from_dict(dict(epoch.to_dict(), status="active"))


def single_replica_shards(n: int) -> dict:
    """An epoch dict of n one-replica shards, written by hand (no ring is built)."""
    view = [f"10.1.{i // 250}.{i % 250 + 1}:13800" for i in range(n)]
    shards = {str(i + 1): [a] for i, a in enumerate(view)}
    return {"number": 1, "view": view, "repl_factor": 1, "shards": shards,
            "slots": {sid: {r[0]: 1} for sid, r in shards.items()},
            "ring": {"groups": sorted(shards), "vnodes": 1024}, "metadata_members": view}


@pytest.fixture
def no_ring_is_built(monkeypatch):
    """Fail any test that builds a ring: what is refused must be refused before the expensive work."""
    class NoRing:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a ring was built before the epoch was checked")

        from_dict = classmethod(lambda cls, d: cls())

    monkeypatch.setattr(epoch_module, "HashRing", NoRing)


def edit(**changes):
    """A broken epoch: good() with top-level keys replaced (a value of DELETE drops the key)."""
    def make() -> dict:
        d = good()
        for key, value in changes.items():
            if value is DELETE:
                del d[key]
            else:
                d[key] = value
        return d
    return make


def deep(path: tuple, value):
    """A broken epoch: good() with the value at `path` (a tuple of keys) replaced."""
    def make() -> dict:
        d = good()
        target = d
        for key in path[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return d
    return make


DELETE = object()
GOOD_RING = {"groups": ["1", "2"], "vnodes": 1024}

BROKEN = {
    # the review's examples
    "number as a string": edit(number="99"),
    "number as a float": edit(number=2.0),
    "negative number": edit(number=-3),
    "ring names shard 7, not in shards": deep(("ring", "groups"), ["1", "2", "7"]),
    "view entry with a path and a query": edit(view=["127.0.0.1:23890/x?y=:1", B, C, D]),
    "empty shards": edit(shards={}, slots={}, ring={"groups": [], "vnodes": 1024}),
    "2,000,000 vnodes": deep(("ring", "vnodes"), 2_000_000),
    # the number
    "number 0": edit(number=0),
    "bool as number": edit(number=True),
    "NaN as number": edit(number=float("nan")),
    "number 2**63": edit(number=2**63),
    "huge number": edit(number=10**5000),
    "null number": edit(number=None),
    # the view and metadata members
    "view a string": edit(view="10.0.0.1:13800,10.0.0.2:13800"),
    "empty view": edit(view=[]),
    "view names a node twice": edit(view=[A, A, C, D]),
    "view entry not normalised (port 013800)": edit(view=["10.0.0.1:013800", B, C, D]),
    "view entry with spaces": edit(view=[" " + A, B, C, D]),
    "view entry without a port": edit(view=["10.0.0.1", B, C, D]),
    "view entry a number": edit(view=[13800, B, C, D]),
    "view entry a list": edit(view=[[A], B, C, D]),
    "view of MAX_VIEW_NODES + 1": edit(view=[f"10.2.{i // 250}.{i % 250 + 1}:1" for i in range(MAX_VIEW_NODES + 1)]),
    "view of 100,000 entries": lambda: edit(view=[A] * 100_000)(),
    "metadata members empty": edit(metadata_members=[]),
    "metadata members malformed": edit(metadata_members=["http://10.0.0.1:13800"]),
    "metadata members twice the same": edit(metadata_members=[A, A]),
    "metadata members a dict": edit(metadata_members={A: 1}),
    # repl_factor
    "repl_factor a string": edit(repl_factor="2"),
    "repl_factor 0": edit(repl_factor=0),
    "repl_factor not the smallest shard's size": edit(repl_factor=1),
    "repl_factor a float": edit(repl_factor=2.0),
    "repl_factor a bool": edit(repl_factor=True),
    # shards
    "shards a list": edit(shards=[[A, B], [C, D]]),
    "a replica outside the view": deep(("shards", "2"), [C, G]),
    "a node in two shards": deep(("shards", "2"), [C, D, A]),
    "a view node in no shard": deep(("shards", "2"), [C]),
    "a shard without replicas": deep(("shards", "2"), []),
    "replicas a string": deep(("shards", "2"), C + "," + D),
    "a replica twice in its shard": deep(("shards", "2"), [C, C]),
    "a replica a number": deep(("shards", "2"), [C, 7]),
    "100,000 shards": lambda: edit(shards={str(i): [A] for i in range(1, 100_001)})(),
    "100,000 replicas": lambda: deep(("shards", "2"), [C] * 100_000)(),
    # slots
    "slots without a shard": deep(("slots", "2"), DELETE),
    "slots of an extra shard": deep(("slots", "3"), {E: 1}),
    "slot 0 (the metadata group's)": deep(("slots", "1", A), 0),
    "slot a string": deep(("slots", "1", A), "1"),
    "slot a float": deep(("slots", "1", A), 1.0),
    "slot a bool": deep(("slots", "1", A), True),
    "slot with no Raft port": deep(("slots", "1", A), 70_000),
    "slots without a replica": deep(("slots", "1", B), DELETE),
    "slots of a node outside the shard": deep(("slots", "1", C), 1),
    "slots a list": deep(("slots", "1"), [1, 1]),
    # the ring
    "ring a list": edit(ring=[["1", "2"], 1024]),
    "ring without vnodes": deep(("ring", "vnodes"), DELETE),
    "ring with an extra key": deep(("ring", "seed"), 1),
    "ring misses a shard": deep(("ring", "groups"), ["1"]),
    "ring names a group twice": deep(("ring", "groups"), ["1", "2", "2"]),
    "ring groups a string": deep(("ring", "groups"), "12"),
    "ring group a number": deep(("ring", "groups"), [1, 2]),
    "vnodes a float": deep(("ring", "vnodes"), 1024.0),
    "vnodes NaN": deep(("ring", "vnodes"), float("nan")),
    "vnodes infinite": deep(("ring", "vnodes"), float("inf")),
    "vnodes a string": deep(("ring", "vnodes"), "1024"),
    "vnodes a bool": deep(("ring", "vnodes"), True),
    "vnodes 0": deep(("ring", "vnodes"), 0),
    "vnodes MAX_VNODES + 1": deep(("ring", "vnodes"), MAX_VNODES + 1),
    "a ring of 100,000 groups": lambda: deep(("ring", "groups"), [str(i) for i in range(1, 100_001)])(),
    # shard ids: decimal numbers from 1 (they name directories DATA_DIR/shard-<id>)
    "shard id 0": lambda: _renamed("0"),
    "shard id with a leading 0": lambda: _renamed("02"),
    "shard id a word": lambda: _renamed("b"),
    "shard id a path": lambda: _renamed("../../etc"),
    "shard id negative": lambda: _renamed("-2"),
    "shard id with spaces": lambda: _renamed(" 2"),
    "shard id a unicode digit": lambda: _renamed("\u00b2"),
    "shard id of 2**63": lambda: _renamed(str(2**63)),
    "shard id empty": lambda: _renamed(""),
    # status
    "unknown status": edit(status="retired"),
    "status null": edit(status=None),
    "status a list": edit(status=["active"]),
    # max_shard_id
    "max_shard_id a string": edit(max_shard_id="2"),
    "max_shard_id negative": edit(max_shard_id=-1),
    "max_shard_id below a shard id": edit(max_shard_id=1),
    "max_shard_id a float": edit(max_shard_id=2.0),
    "max_shard_id a bool": edit(max_shard_id=True),
    # origins
    "origins a list": edit(origins=[[1, GOOD_RING], [1, GOOD_RING]]),
    "origin of a shard not in the epoch": deep(("origins", "3"), [1, {"groups": ["1", "2", "3"], "vnodes": 1024}]),
    "origin number 0": deep(("origins", "1"), [0, GOOD_RING]),
    "origin number newer than the epoch": deep(("origins", "1"), [2, GOOD_RING]),
    "origin number a string": deep(("origins", "1"), ["1", GOOD_RING]),
    "origin without a ring": deep(("origins", "1"), [1]),
    "origin of three parts": deep(("origins", "1"), [1, GOOD_RING, 0]),
    "origin a dict": deep(("origins", "1"), {"number": 1, "ring": GOOD_RING}),
    "origin ring without the shard": deep(("origins", "1"), [1, {"groups": ["2"], "vnodes": 1024}]),
    "origin ring of 2,000,000 vnodes": deep(("origins", "1"), [1, {"groups": ["1", "2"], "vnodes": 2_000_000}]),
    "origin ring a string": deep(("origins", "1"), [1, "ring"]),
    "second origin ring differs, with 0 vnodes": deep(("origins", "2"), [1, {"groups": ["1", "2"], "vnodes": 0}]),
    "second origin ring names shard 02": deep(("origins", "2"), [1, {"groups": ["1", "02"], "vnodes": 1024}]),
}


def _renamed(sid: str) -> dict:
    """good() with shard "2" called `sid` everywhere (shards, slots, ring, origins)."""
    d = good()
    d["shards"][sid] = d["shards"].pop("2")
    d["slots"][sid] = d["slots"].pop("2")
    d["ring"]["groups"] = ["1", sid]
    d["origins"] = {}
    return d


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_epoch_is_refused_with_its_reason_before_any_ring_is_built(name, no_ring_is_built):
    d = BROKEN[name]()
    with pytest.raises(InvalidEpoch) as refused:
        ConfigEpoch.from_dict(d)
    assert isinstance(refused.value, ValueError) and str(refused.value)
    assert len(str(refused.value)) < 300, "the reason is short, whatever the size of the input"


@pytest.mark.parametrize("value", [None, "epoch", 5, 1.5, True, [], ["number", 1], {}, {"number": 99}])
def test_what_is_not_an_epoch_object_at_all_is_refused(value, no_ring_is_built):
    with pytest.raises(InvalidEpoch):
        ConfigEpoch.from_dict(value)


@pytest.mark.parametrize("key", ["number", "view", "repl_factor", "shards", "slots", "ring", "metadata_members"])
def test_an_epoch_without_a_required_field_names_it(key, no_ring_is_built):
    with pytest.raises(InvalidEpoch, match=key):
        ConfigEpoch.from_dict(edit(**{key: DELETE})())


def test_the_reasons_say_what_is_wrong(no_ring_is_built):
    for make, words in ((edit(number="99"), "number must be an integer"),
                        (BROKEN["ring names shard 7, not in shards"], "ring's groups must be the shard ids"),
                        (BROKEN["view entry with a path and a query"], "view: '127.0.0.1:23890/x"),
                        (BROKEN["empty shards"], "shards must be an object of 1 to 4"),
                        (BROKEN["2,000,000 vnodes"], f"vnodes must be an integer from 1 to {MAX_VNODES}"),
                        (BROKEN["a node in two shards"], "more replicas than the view has nodes"),
                        (BROKEN["shard id a path"], "'../../etc' is not a shard id")):
        with pytest.raises(InvalidEpoch, match=re.escape(words)):
            ConfigEpoch.from_dict(make())


def test_a_pushed_epoch_numbered_as_a_string_is_refused_by_the_protocol():
    """The live failure: POST /internal/epochs with "number": "99" answered 200 and was saved."""
    bad = edit(number="99")()
    for body in ({"active": bad, "pending": None, "revision": 5}, {"active": good(), "pending": bad}):
        with pytest.raises(ValueError, match="not a valid epoch"):
            Epochs.from_json(body)
    with pytest.raises(ValueError, match="not a valid epoch"):
        KnownEpochs.from_json({"active": bad, "metadata-member": True, "revision": 5})


def test_rings_up_to_the_bounds_are_taken():
    """The largest rings the code makes: MAX_VNODES per group (a small ring, built), and an initial view of
    MAX_VIEW_NODES one-replica shards at 1024 vnodes (checked only: building it takes seconds)."""
    d = good()
    d["ring"]["vnodes"] = MAX_VNODES
    assert ConfigEpoch.from_dict(d).ring.vnodes == MAX_VNODES
    biggest = single_replica_shards(MAX_VIEW_NODES)
    assert len(biggest["ring"]["groups"]) * biggest["ring"]["vnodes"] == MAX_RING_TOKENS
    _check_epoch(biggest)                                   # no exception
    biggest["ring"]["vnodes"] = 1025
    with pytest.raises(InvalidEpoch, match="tokens"):
        _check_epoch(biggest)


# -- every epoch the code makes still round-trips -----------------------------------------------


def round_trips(epoch: ConfigEpoch) -> None:
    d = epoch.to_dict()
    again = ConfigEpoch.from_dict(json.loads(json.dumps(d)))            # as it travels and is stored
    assert again == epoch and again.to_dict() == d and again.origins == epoch.origins
    older = {k: v for k, v in d.items() if k not in ("max_shard_id", "origins")}   # before those fields
    old = ConfigEpoch.from_dict(json.loads(json.dumps(older)))
    assert old.max_shard_id == 0 and old.origins == {} and old.shards == epoch.shards
    for status in ("active", "pending", "unwinding"):                  # as the metadata group publishes it
        assert ConfigEpoch.from_dict(dict(d, status=status)).status == status


@pytest.mark.parametrize("size, repl_factor", [(1, 1), (2, 1), (2, 2), (3, 3), (4, 2), (6, 3), (6, 1), (8, 4),
                                               (12, 2)])
def test_initial_epochs_round_trip(size, repl_factor):
    view = tuple(f"node-{i}.kvs.example:{13800 + i}" for i in range(size))
    round_trips(ConfigEpoch.initial(view, repl_factor))


def test_initial_epochs_of_unusual_addresses_round_trip():
    round_trips(ConfigEpoch.initial(("[::1]:13800", "[::1]:13801", "localhost:1", "KVS-2.Example.COM:65535"), 2))


def test_an_initial_epoch_of_the_largest_view_round_trips():
    view = tuple(f"10.3.{i // 250}.{i % 250 + 1}:13800" for i in range(MAX_VIEW_NODES))
    round_trips(ConfigEpoch.initial(view, MAX_VIEW_NODES // 16))


def test_planned_epochs_round_trip_through_a_history_of_changes():
    """View changes (grow, shrink, repl-factor up and down), reshards, add-member and remove-member (a
    group shrinking in place, and a one-replica shard retired), each committed and planned on again."""
    current = ConfigEpoch.initial((A, B), 1)
    steps = [
        lambda e: plan_view_change(e, [A, B, C, D], 2),                   # grow, repl-factor 2
        lambda e: plan_view_change(e, list(e.view), len(e.view) // 1),    # reshard to 1 shard
        lambda e: plan_view_change(e, list(e.view), len(e.view) // 4),    # reshard to 4 shards
        lambda e: plan_add_member(e, E, "5"),                             # unequal groups: 2 and 1
        lambda e: plan_remove_member(e, A),                               # a one-replica shard retired
        lambda e: plan_remove_member(e, E),                               # a group shrinks in place
        lambda e: plan_view_change(e, [B, C, D, F, G, H], 3),             # replace nodes, repl-factor 3
        lambda e: plan_view_change(e, [H, G, F, D, C, B], 2),             # another order, 3 shards
        lambda e: plan_layout(e, [[B, C, D], [F], [G, H]]),               # an explicit uneven layout
        lambda e: plan_view_change(e, [A], 1),                            # down to one node
    ]
    for step in steps:
        plan = step(current)
        round_trips(plan.epoch)
        assert plan.epoch.status == "pending"
        current = committed(plan.epoch)
        round_trips(current)
    assert current.number == len(steps) + 1 and current.view == (A,) and current.max_shard_id > 5


def test_the_planner_s_rings_are_within_the_bounds_whatever_the_shard_count():
    """Over 64 groups the planner lowers the ring's vnodes (`ring_vnodes`); a plan of that many groups
    takes seconds to build, so its rings are checked against the bounds here for every count."""
    for groups in range(1, MAX_VIEW_NODES + 1):
        vnodes = ring_vnodes(groups, DEFAULT_VNODES)
        assert 1 <= vnodes <= MAX_VNODES and groups * vnodes <= MAX_RING_TOKENS, groups
        assert groups * DEFAULT_VNODES <= MAX_RING_TOKENS               # and `initial`'s, not lowered


# -- records: a broken epochs.json is set aside, never a crash -----------------------------------------


def pushed(active: object, pending: object = None, revision: object = 0) -> dict:
    return {"active": active, "pending": pending, "revision": revision}


def test_valid_pushed_takes_what_epoch_news_writes():
    first = ConfigEpoch.initial((A, B), 1)
    plan = plan_view_change(first, [A, B, C], 1)
    assert valid_pushed({})
    assert valid_pushed(pushed(first.to_dict()))
    assert valid_pushed(pushed(first.to_dict(), plan.epoch.to_dict(), 7))
    assert valid_pushed({"active": first.to_dict()})                  # written before revisions
    assert valid_pushed(pushed(first.to_dict(), dict(plan.epoch.to_dict(), status="unwinding"), 2**63 - 1))


@pytest.mark.parametrize("record", [
    None, True, 0, 1.5, "epochs", [], [good()], {"revision": 0}, {"pending": good()},
    pushed(None), pushed("epoch"), pushed(edit(number="99")()), pushed(good(), "pending"),
    pushed(good(), edit(number="2")()), pushed(good(), revision="3"), pushed(good(), revision=-1),
    pushed(good(), revision=1.0), pushed(good(), revision=True), pushed(good(), revision=2**63),
    pushed(good(), revision=None), pushed(good(), revision=[1]), pushed(good(), revision={"n": 1}),
    pushed(BROKEN["2,000,000 vnodes"]()), pushed(BROKEN["empty shards"]()),
])
def test_valid_pushed_refuses_anything_else_without_raising(record):
    assert valid_pushed(record) is False


BROKEN_FILES = {
    "number as a string": json.dumps(pushed(edit(number="99")(), revision=5)),
    "revision as a string": json.dumps(pushed(good(), revision="5")),
    "2,000,000 vnodes": json.dumps(pushed(BROKEN["2,000,000 vnodes"]())),
    "a list": "[1, 2, 3]",
    "not JSON": "{\"active\": ",
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "a huge integer": "{\"revision\": " + "9" * 5000 + "}",
    "not UTF-8": b"\xff\xfe{}",
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_a_broken_epochs_file_is_set_aside_and_ignored(name, tmp_path):
    content = BROKEN_FILES[name]
    path = tmp_path / PUSHED_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert load_record(str(tmp_path), PUSHED_FILE, valid_pushed) == {}
    assert not path.exists() and (tmp_path / (PUSHED_FILE + ".bad")).exists()
    assert load_record(str(tmp_path), PUSHED_FILE, valid_pushed) == {}      # and at the next start: nothing


def test_epoch_news_refuses_news_it_could_not_compare(tmp_path):
    """The second push of the live failure got a 500: `"99" < 1`. News without integer numbers or
    revision is refused (False), whoever passes it, and what is kept still compares."""
    news = EpochNews(str(tmp_path))
    first = ConfigEpoch.initial((A, B), 1).to_dict()
    assert news.learn(first, None, 3)
    for active, pending, revision in ((edit(number="99")(), None, 4), (first, edit(number="2")(), 4),
                                      (first, None, "4"), (first, None, None), (first, None, -1), ("x", None, 4),
                                      (None, None, 4), (dict(first, number=True), None, 4)):
        assert news.learn(active, pending, revision) is False
    assert news.active == first and news.revision == 3
    second = plan_view_change(ConfigEpoch.from_dict(first), [A, B, C]).epoch.to_dict()
    assert news.learn(first, second, 4) and EpochNews(str(tmp_path)).pending == second   # kept on disk


def test_a_node_starts_and_supervises_on_a_broken_epochs_file(tmp_path):
    """No crash loop on its own files: the node of the live failure, restarted on what it had saved."""
    with open(os.path.join(tmp_path, PUSHED_FILE), "w") as f:
        json.dump(pushed(edit(number="99")(), revision=5), f)
    settings = NodeSettings.load(environ={"ADDRESS": "127.0.0.1:2", "VIEW": "127.0.0.1:1", "DATA_DIR": str(tmp_path),
                                          "KVS_FSYNC": "off"})
    node = Node(settings)                       # an idle node: not in the view, so it hosts nothing yet
    assert node.pushed_revision == 0 and node.pushed_pending is None
    assert os.path.exists(os.path.join(tmp_path, PUSHED_FILE + ".bad"))
    node._supervise_once()                      # raised TypeError at every round before
    node.learn(edit(number="99")(), None, 6)    # what the protocol refuses is refused here too
    assert node.pushed_revision == 0
    assert not os.path.exists(os.path.join(tmp_path, PUSHED_FILE))

