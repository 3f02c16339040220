"""View-change copies read in pages: every moving row exactly once, no reply (and no coordinator) holding
more than a page, and writes made between the pages of a pass caught up by the next pass.

An outside review found that `POST /internal/groups/<id>/export` (and `/changes`) answered every moving
key of a range in one JSON reply, which the coordinator read whole and held before installing it: both
grew with the shard. Now a request carries a cursor and a byte budget (capped by the source), a reply the
rows after the cursor up to the budget, `more` and the next cursor, and `RangeCopy` installs each page
before it reads the next.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from types import SimpleNamespace

import pytest
import requests

from kvs.client import KvsClient
from kvs.config.ring import HashRing
from kvs.errors import Unavailable
from kvs.fsm.shard import ShardState
from kvs.http import internal
from kvs.http.internal import read_page
from kvs.reconfig.copy import RangeCopy
from kvs.reconfig.protocol import Exported, ExportRequest, cursor_order
from kvs.reconfig.remote import Remote
from kvs.routing.peers import Forwarder, PeerResponse

OLD_RING, NEW_RING = HashRing(["1", "2"]), HashRing(["1", "2", "3"])
OLD, NEW = OLD_RING.to_dict(), NEW_RING.to_dict()


def moving(key) -> bool:
    return OLD_RING.group_for(key) == "1" and NEW_RING.group_for(key) == "3"


def loaded_source(count: int = 1500) -> ShardState:
    """Shard 1 with `count` str keys, some bytes keys, keys written several times (several dedup rows),
    and deleted keys whose dedup rows must move all the same."""
    s = ShardState(ownership=(1, "1", OLD))
    keys = [k for k in (f"k{i}" for i in range(count * 3)) if OLD_RING.group_for(k) == "1"][:count]
    for i, k in enumerate(keys):
        s.apply(("put", f"p{i}", k, f"value-{k}-" + "x" * (i % 40), None))
    for i, k in enumerate(keys[:60]):
        s.apply(("put", f"again{i}", k, f"second-{k}", None))
    for i, k in enumerate(keys[60:90]):
        s.apply(("delete", f"del{i}", k, None))
    binary = [k for k in (b"\xff" + bytes([i, j]) for i in range(40) for j in range(40))
              if OLD_RING.group_for(k) == "1"]
    s.apply(("set-batch", "batch", tuple((i, k, bytes(range(i % 256))) for i, k in enumerate(binary[:200]))))
    return s


def expected(s: ShardState) -> tuple[list, list]:
    snap = s.snapshot()
    items = sorted(((k, v, snap["versions"].get(k, 0)) for k, v in snap["data"].items() if moving(k)),
                   key=lambda row: (isinstance(row[0], bytes), row[0]))
    dedup = [(rid, entry) for rid, entry in s.dedup_rows() if moving(entry[1])]
    return items, dedup


def all_pages(state: ShardState, since: int | None = None, budget: int = 2000, page_bytes: int | None = None,
              between=None) -> list[Exported]:
    """Every page of an export, each through its JSON form, as the coordinator reads them."""
    pages, after = [], None
    while True:
        r = ExportRequest("1", OLD, NEW, "3", since, after, budget)
        r = ExportRequest.from_json(json.loads(json.dumps(r.to_json())), since is not None)
        page = Exported.from_json(json.loads(json.dumps(read_page(state, r, page_bytes).to_json())))
        pages.append(page)
        if not page.more:
            return pages
        assert after is None or cursor_order(page.cursor) > cursor_order(after)
        after = page.cursor
        if between is not None:
            between(len(pages))


def rows_size(page: Exported) -> int:
    body = page.to_json()
    return sum(len(json.dumps(row, separators=(",", ":"))) + 1 for what in ("items", "deleted", "dedup")
               for row in body[what])


# -- the state machine and the endpoint's page reader ------------------------------------------------------

def test_pages_carry_every_moving_key_and_dedup_row_exactly_once_in_order():
    s = loaded_source()
    items, dedup = expected(s)
    assert len(items) > 300 and any(isinstance(row[0], bytes) for row in items)
    pages = all_pages(s, budget=2000)
    assert len(pages) > 20
    got = [row for p in pages for row in p.items]
    assert got == items                                  # in key order, str before bytes, each once
    got_dedup = [row for p in pages for row in p.dedup]
    assert len(got_dedup) == len(dedup) and sorted(got_dedup, key=str) == sorted(dedup, key=str)
    deleted_keys = {entry[1] for _, entry in dedup} - {row[0] for row in items}
    assert deleted_keys and all(moving(k) for k in deleted_keys)   # dedup rows of deleted keys moved too
    assert all(rows_size(p) <= 2000 for p in pages)
    assert all(p.number == pages[0].number for p in pages) and not pages[-1].more
    # the whole-range readers the state machine keeps agree with the pages
    assert s.export("1", OLD, NEW, "3")[0] == items


def test_the_source_caps_the_budget_a_request_asks_for():
    s = loaded_source(600)
    capped = all_pages(s, budget=1 << 30, page_bytes=3000)
    assert len(capped) > 5 and all(rows_size(p) <= 3000 for p in capped)
    assert [r for p in capped for r in p.items] == expected(s)[0]


def test_a_row_larger_than_the_budget_still_goes_alone():
    s = ShardState(ownership=(1, "1", OLD))
    keys = [k for k in (f"big{i}" for i in range(200)) if moving(k)][:5]
    for i, k in enumerate(keys):
        s.apply(("put", f"r{i}", k, "v" * 5000, None))
    pages = all_pages(s, budget=100)
    # each key's row alone, then its dedup row alone: nothing is stuck behind a row over the budget
    assert [len(p.items) + len(p.dedup) for p in pages] == [1] * 10
    assert [row[0] for p in pages for row in p.items] == sorted(keys)


def test_a_keys_dedup_rows_may_span_pages():
    s = ShardState(ownership=(1, "1", OLD))
    key = next(k for k in (f"hot{i}" for i in range(100)) if moving(k))
    for i in range(300):
        s.apply(("put", f"w{i:03}", key, f"v{i}", None))
    pages = all_pages(s, budget=1500)
    assert len(pages) > 10
    rids = [rid for p in pages for rid, _ in p.dedup]
    assert rids == sorted(f"w{i:03}" for i in range(300))
    assert [row for p in pages for row in p.items] == [(key, "v299", 300)]
    assert pages[1].cursor[0] == key and pages[1].cursor[1] is not None      # a cursor inside a key's rows


def test_an_empty_range_is_one_empty_page():
    page = read_page(ShardState(ownership=(1, "1", OLD)), ExportRequest("1", OLD, NEW, "3"))
    assert (page.items, page.dedup, page.more, page.cursor) == ([], [], False, None)


def test_changes_page_their_items_deletions_and_dedup_rows():
    s = loaded_source(900)
    s.apply(("track", 2, NEW))
    start = s.export("1", OLD, NEW, "3")[2]
    items, _ = expected(s)
    written, removed = [row[0] for row in items[:200:2]], [row[0] for row in items[1:200:2]]
    for i, k in enumerate(written):
        s.apply(("put", f"c{i}", k, f"changed-{k}", None))
    for i, k in enumerate(removed):
        s.apply(("delete", f"d{i}", k, None))
    pages = all_pages(s, since=start, budget=700)
    assert len(pages) > 5
    assert [row[0] for p in pages for row in p.items] == sorted(written)
    assert [k for p in pages for k in p.deleted] == sorted(removed)
    assert sorted(rid for p in pages for rid, _ in p.dedup) == sorted(
        [f"c{i}" for i in range(len(written))] + [f"d{i}" for i in range(len(removed))])
    whole = s.export_changes("1", OLD, NEW, "3", since=start)
    assert [r for p in pages for r in p.items] == whole[0] and [k for p in pages for k in p.deleted] == whole[1]


@pytest.mark.parametrize("seed", range(6))
def test_random_shards_page_like_the_whole_range(seed):
    """Random str and bytes keys, writes, deletes and batches, tracking from a random point, random budgets:
    the pages of an export and of a catch-up put together are what the state holds, each row once."""
    rng = random.Random(seed)
    s = ShardState(ownership=(1, "1", OLD), dedup_capacity=rng.choice([50, 400, 100_000]))
    space = [f"r{i}" for i in range(300)] + [bytes([255, i]) for i in range(150)] + ["", "é", "😀"]
    space = [k for k in space if OLD_RING.group_for(k) == "1"]
    since = None
    for i in range(1500):
        if since is None and i == 700:
            s.apply(("track", 2, NEW))
            since = s.export("1", OLD, NEW, "3")[2]
        key, roll = rng.choice(space), rng.random()
        if isinstance(key, bytes) and roll < 0.85:      # binary keys come only in batches
            roll = 0.9
        if roll < 0.6:
            s.apply(("put", f"q{i}", key, "v" * rng.randrange(0, 300), None))
        elif roll < 0.85:
            s.apply(("delete", f"q{i}", key, None))
        else:
            pairs = tuple((j, rng.choice(space) if j else key, bytes(rng.randrange(50))) for j in range(4))
            if len({p[1] for p in pairs}) == 4:
                s.apply(("set-batch", f"b{i}", pairs))
    budget = rng.choice([1, 60, 500, 4000])
    pages = all_pages(s, budget=budget)
    items, dedup = expected(s)
    assert [r for p in pages for r in p.items] == items
    got = [r for p in pages for r in p.dedup]
    assert len(got) == len(dedup) and sorted(got, key=str) == sorted(dedup, key=str)
    # the catch-up: every tracked key above `since`, with its value or its deletion, and its dedup rows
    snap = s.snapshot()
    _, _, changed_keys, changed_requests = snap["tracking"]
    keys = sorted((k for k, n in changed_keys.items() if n > since and moving(k)),
                  key=lambda k: (isinstance(k, bytes), k))
    pages = all_pages(s, since=since, budget=budget)
    assert [r[0] for p in pages for r in p.items] == [k for k in keys if k in snap["data"]]
    assert [k for p in pages for k in p.deleted] == [k for k in keys if k not in snap["data"]]
    table = dict(s.dedup_rows())
    rids = sorted(r for r, n in changed_requests.items() if n > since and r in table and moving(table[r][1]))
    assert sorted(r for p in pages for r, _ in p.dedup) == rids


# -- the copier: page by page, writes between pages caught up from the first page's number -------------------

class PagedRemote:
    """A Remote over two state machines: exports are read page by page (through their JSON form) from
    `source`, commands applied to `destination`; `between(page)` runs after each page is read."""

    def __init__(self, source: ShardState, destination: ShardState, budget: int, between=None):
        self.source, self.destination, self.budget, self.between = source, destination, budget, between
        self.pages: list[Exported] = []
        self.installs: list = []

    def export(self, epoch, shard_id, request):
        body = json.loads(json.dumps(request.to_json()))
        r = ExportRequest.from_json(body, request.since is not None)
        page = Exported.from_json(json.loads(json.dumps(read_page(self.source, r, self.budget).to_json())))
        self.pages.append(page)
        if self.between is not None:
            self.between(len(self.pages))
        return page

    def command(self, epoch, shard_id, command):
        self.installs.append(command)
        return self.destination.apply(command.as_entry())


def a_move() -> tuple[SimpleNamespace, SimpleNamespace, SimpleNamespace]:
    move = SimpleNamespace(source="1", destination="3")
    plan = SimpleNamespace(epoch=SimpleNamespace(number=2, ring=NEW_RING))
    current = SimpleNamespace(ring=OLD_RING)
    return move, plan, current


def moving_data(s: ShardState) -> dict:
    snap = s.snapshot()
    return {k: (v, snap["versions"].get(k, 0)) for k, v in snap["data"].items() if moving(k)}


def test_writes_and_deletes_between_pages_are_caught_up_by_the_next_pass():
    source = loaded_source(900)
    source.apply(("track", 2, NEW))
    destination = ShardState(ownership=(2, "3", NEW))
    keys = [row[0] for row in expected(source)[0] if isinstance(row[0], str)]
    fresh = [k for k in (f"new{i}" for i in range(3000)) if moving(k)]
    late = {}

    def between(page: int) -> None:
        # after the first page: rewrite a key it sent, delete one a later page would have sent, create keys
        # on both sides of the cursor; later pages see some of it, the next pass must carry all of it
        if page == 1:
            sent = remote.pages[0].items[0][0]
            late["rewritten"], late["deleted"] = sent, keys[-5]
            source.apply(("put", "late-put", sent, "rewritten", None))
            source.apply(("delete", "late-delete", keys[-5], None))
            for i, k in enumerate(fresh[:20]):
                source.apply(("put", f"late-new{i}", k, f"fresh-{k}", None))

    remote = PagedRemote(source, destination, budget=3000, between=between)
    copier = RangeCopy(remote, SimpleNamespace(keys_total=0, keys_moved=0))
    move, plan, current = a_move()
    first = copier.copy(move, plan, current, since=None)
    assert len(remote.pages) > 5
    assert first == remote.pages[0].number < remote.pages[-1].number     # writes were numbered meanwhile
    assert [c.clear for c in remote.installs].count(True) == 1 and remote.installs[0].clear
    assert copier._progress.keys_total == sum(len(p.items) for p in remote.pages)
    # the write to a key the first page had sent is numbered above the first page's number but not above the
    # last page's: a catch-up since the last page's number would miss it
    assert first < source._changed_keys[late["rewritten"]] <= remote.pages[-1].number
    assert destination.read(late["rewritten"]) != "rewritten"
    second = copier.copy(move, plan, current, since=first)
    assert second > first
    assert moving_data(destination) == moving_data(source)
    assert destination.read(late["rewritten"]) == "rewritten" and destination.read(late["deleted"]) is None
    # every request id came along: a retry of a late write is recognised at the destination
    for rid, entry in source.dedup_rows():
        if moving(entry[1]):
            assert rid in destination._dedup
    assert copier.copied_keys[(2, "1")] >= set(moving_data(source))
    assert destination.revision >= source.revision


# -- the wire: strict fields, a 400 for malformed ones, a cursor that must move on ---------------------------

GOOD = {"source": "1", "old_ring": OLD, "new_ring": NEW, "destination": "3"}


@pytest.mark.parametrize("bad", [
    {"after": "k1"}, {"after": {"key": 5}}, {"after": {"key": "k", "request": 3}}, {"after": {"request": "r"}},
    {"after": {"key": "k", "extra": 1}}, {"after": {"key": {"b64": "!!"}}}, {"after": []},
    {"budget": 0}, {"budget": -1}, {"budget": "1000"}, {"budget": True}, {"budget": 1.5}, {"budget": 2 ** 70},
])
def test_malformed_cursors_and_budgets_are_refused(bad):
    with pytest.raises(ValueError):
        ExportRequest.from_json({**GOOD, **bad}, False)
    with pytest.raises(ValueError):
        ExportRequest.from_json({**GOOD, "since": 1, **bad}, True)


def test_cursors_round_trip_with_binary_keys():
    r = ExportRequest("1", OLD, NEW, "3", 4, (b"\xff\x00", "rid#3"), 5000)
    assert ExportRequest.from_json(json.loads(json.dumps(r.to_json())), True) == r
    assert ExportRequest.from_json({**GOOD, "after": None}, False).after is None
    page = Exported([("k", "v", 1)], [], [], 3, 4, True, ("k", None))
    assert Exported.from_json(json.loads(json.dumps(page.to_json()))) == page


@pytest.mark.parametrize("bad", [{"more": "yes"}, {"more": 1}, {"more": True}, {"more": True, "cursor": "k"},
                                 {"cursor": {"key": 1}}, {"number": -1}, {"number": True}])
def test_malformed_pages_are_refused(bad):
    with pytest.raises(ValueError):
        Exported.from_json({"items": [], "deleted": [], "dedup": [], "number": 1, **bad})


class OnePage:
    def __init__(self, body: dict):
        self.body = body

    def send(self, address, method, path, payload, request_id, deadline) -> PeerResponse:
        return PeerResponse(200, self.body, None)


def test_a_page_whose_cursor_does_not_move_on_is_refused():
    epoch = SimpleNamespace(replicas=lambda shard_id: ["127.0.0.1:1"])
    stuck = Exported([], [], [], 1, 0, True, ("k", None)).to_json()
    with pytest.raises(Unavailable, match="does not move past"):
        Remote(OnePage(stuck)).export(epoch, "1", ExportRequest("1", OLD, NEW, "3", after=("k", None)))
    page = Remote(OnePage(stuck)).export(epoch, "1", ExportRequest("1", OLD, NEW, "3", after=("j", "r")))
    assert page.cursor == ("k", None)


def endpoint(state: ShardState):
    """The internal blueprint in a Flask app over one fake group whose reads go straight to `state`."""
    from kvs.http.public import create_app
    group = SimpleNamespace(read=lambda fn, deadline: fn(state))
    node = SimpleNamespace(settings=SimpleNamespace(max_body_bytes=1 << 20), group=lambda shard_id: group)
    services = SimpleNamespace(node=node, peer_auth=SimpleNamespace(is_forwarded=lambda *args: True))
    return create_app(services).test_client()


def test_the_endpoints_page_and_answer_malformed_fields_with_a_400(monkeypatch):
    s = loaded_source(400)
    monkeypatch.setattr(internal, "PAGE_BYTES", 2500)
    client = endpoint(s)
    after, items = None, []
    for _ in range(1000):
        resp = client.post("/internal/groups/1/export", json={**GOOD, "after": after})
        assert resp.status_code == 200, resp.get_json()
        assert len(resp.data) < 2500 + 400
        page = Exported.from_json(resp.get_json())
        items += page.items
        if not page.more:
            break
        after = json.loads(json.dumps(resp.get_json()["cursor"]))
    assert items == expected(s)[0]
    for path, body in [("export", {**GOOD, "after": {"key": ["x"]}}), ("export", {**GOOD, "budget": "all"}),
                       ("changes", {**GOOD, "since": 0, "after": {"key": "k", "request": 7}}),
                       ("changes", {**GOOD, "since": 0, "budget": 0}), ("export", {**GOOD, "after": 12})]:
        resp = client.post(f"/internal/groups/1/{path}", json=body)
        assert resp.status_code == 400 and "malformed" in resp.get_json()["error"], (body, resp.get_json())


def test_the_page_size_setting_is_checked():
    assert internal._page_bytes({}) == 1 << 20
    assert internal._page_bytes({"KVS_EXPORT_PAGE_BYTES": "4096"}) == 4096
    for bad in ("0", "-5", "1e6", "lots", str(1 << 40)):
        with pytest.raises(ValueError, match="KVS_EXPORT_PAGE_BYTES"):
            internal._page_bytes({"KVS_EXPORT_PAGE_BYTES": bad})


# -- real processes ---------------------------------------------------------------------------------------------

def signed_post(node: str, path: str, body: dict, secret: str) -> PeerResponse:
    """A POST signed as a node's (through the nodes' own sender)."""
    return Forwarder(secret).send(node, "POST", path, body, uuid.uuid4().hex, time.monotonic() + 30)


@pytest.mark.cluster
def test_a_reshard_of_a_cluster_with_small_export_pages_moves_every_key(make_cluster):
    from .conftest import TEST_SECRET
    cluster = make_cluster(2, 1, KVS_EXPORT_PAGE_BYTES="4096")
    client = KvsClient(cluster.view[0])
    values = {f"page-{i}": f"v{i}-" + "y" * (i % 150) for i in range(400)}
    for key, value in values.items():
        assert client.put(key, value)[0] in (200, 201)
    # the source's pages are capped by its setting, whatever budget the request asks for
    ring = requests.get(f"http://{cluster.view[0]}/kvs/routing", timeout=10).json()["ring"]
    wider = {"groups": sorted(ring["groups"] + ["99"]), "vnodes": ring["vnodes"]}
    request = {"source": "1", "old_ring": ring, "new_ring": wider, "destination": "99", "budget": 1 << 30}
    node_of_1 = next(a for a in cluster.view if KvsClient(a).key_count()[1].get("shard-id") == "1")
    pages, after = 0, None
    while True:
        resp = signed_post(node_of_1, "/internal/groups/1/export", {**request, "after": after}, TEST_SECRET)
        assert resp.status == 200, resp.body
        assert len(json.dumps(resp.body, separators=(",", ":"))) < 4096 + 1024
        pages += 1
        if not resp.body["more"]:
            break
        after = resp.body["cursor"]
    assert pages > 2
    bad = signed_post(node_of_1, "/internal/groups/1/export", {**request, "after": {"key": 7}}, TEST_SECRET)
    assert bad.status == 400, bad.body
    # a reshard into one shard moves the other shard's keys, page by page
    resp = requests.put(f"http://{cluster.view[1]}/kvs/reshard", json={"shard-count": 1}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert sum(s["key-count"] for s in resp.json()["shards"]) == len(values)
    for node in cluster.view:
        reader = KvsClient(node)
        for key, value in values.items():
            status, body = reader.get(key)
            assert status == 200 and body["value"] == value, (node, key, status, body)
