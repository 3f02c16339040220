"""Linearizable reads without a log entry (ReadIndex), on the leader and on followers.

The protocol's rules are checked against a scripted Raft replica (no sockets):
a round is confirmed by a majority of its term only, a leader that has not
committed its no-op confirms nothing, a deposed leader fails its reads, and a
read waits until its index is applied. On real processes, an old leader cut
off with one follower (a minority of five), still believing it leads, answers
no read with a stale value, neither itself nor through that follower, while
the majority side commits new writes.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from kvs.raft.read_index import ACK, INDEX_REPLY, INDEX_REQUEST, PROBE, ReadIndex

from kvs.testing.cluster import wait_until

from .chaos.driver import ProcessDriver, iptables_usable


class ScriptedRaft:
    """What ReadIndex reads of PySyncObj's replica, set by the test."""

    def __init__(self, others: int, leader: bool = True):
        self.others = [f"n{i}" for i in range(others)]
        self._SyncObj__otherNodes = set(self.others)
        self._SyncObj__noopIDx = 5
        self.raftCurrentTerm, self.raftCommitIndex, self.raftLastApplied = 3, 5, 5
        self.leader = leader
        self.leader_node = None if leader else "n0"
        self.sent: list[tuple[str, dict]] = []
        self.joining: set[str] = set()          # members that do not count yet (kvs.raft.joiner)
        self._SyncObj__transport = self

    def send(self, node, message) -> bool:
        self.sent.append((node, message))
        return True

    def _isLeader(self) -> bool:
        return self.leader

    def counted_members(self) -> list[str]:
        return [n for n in self.others if n not in self.joining]

    def _getLeader(self):
        return "me" if self.leader else self.leader_node


def reads(index: ReadIndex, count: int = 1) -> list[list[bool]]:
    outcomes = [[] for _ in range(count)]
    for out in outcomes:
        index.request(out.append)
    index.on_tick()
    return outcomes


def test_a_round_is_confirmed_by_a_majority_of_its_term_and_not_before():
    raft = ScriptedRaft(others=4)                      # five voters: the leader and two others
    index = ReadIndex(raft)
    outcomes = reads(index, 3)
    probes = [m for _, m in raft.sent if m["type"] == PROBE]
    assert len(probes) == 4 and all(out == [] for out in outcomes)
    index.on_message("n0", {"type": ACK, "term": 3, "seq": probes[0]["seq"]})
    index.on_message("n1", {"type": ACK, "term": 2, "seq": probes[0]["seq"]})   # an old term counts for nothing
    assert all(out == [] for out in outcomes)
    index.on_message("n2", {"type": ACK, "term": 3, "seq": probes[0]["seq"]})
    assert outcomes == [[True], [True], [True]]


def test_a_member_still_joining_neither_counts_toward_a_round_nor_raises_its_majority():
    raft = ScriptedRaft(others=3)                      # the leader, n0 and n1, and n2 joining (kvs.raft.joiner)
    raft.joining = {"n2"}
    index = ReadIndex(raft)
    (first,) = reads(index)
    seq = next(m["seq"] for _, m in raft.sent if m["type"] == PROBE)
    index.on_message("n0", {"type": ACK, "term": 3, "seq": seq})
    assert first == [True]                              # 2 of the 3 old members: a majority (not of 4)
    raft.sent.clear()
    (second,) = reads(index)
    seq = next(m["seq"] for _, m in raft.sent if m["type"] == PROBE)
    index.on_message("n2", {"type": ACK, "term": 3, "seq": seq})
    assert second == []                                 # the joiner's ack counts for nothing


def test_a_read_waits_until_its_index_is_applied():
    raft = ScriptedRaft(others=0)                      # a single-node group confirms at once
    raft.raftCommitIndex = 9
    index = ReadIndex(raft)
    (out,) = reads(index)
    assert out == []
    raft.raftLastApplied = 9
    index.on_tick()
    assert out == [True]


def test_a_leader_that_has_not_committed_its_noop_confirms_nothing():
    raft = ScriptedRaft(others=2)
    raft._SyncObj__noopIDx = 6                          # commit index 5: its own term's entry is not committed
    index = ReadIndex(raft)
    assert reads(index) == [[False]]
    assert not [m for _, m in raft.sent if m["type"] == PROBE]


def test_a_deposed_leader_fails_its_waiting_reads():
    raft = ScriptedRaft(others=2)
    index = ReadIndex(raft)
    (out,) = reads(index)
    raft.leader, raft.raftCurrentTerm = False, 4
    index.on_tick()
    assert out == [False]


def test_a_follower_reads_at_the_index_its_leader_confirms():
    raft = ScriptedRaft(others=2, leader=False)
    index = ReadIndex(raft)
    (out,) = reads(index)
    (node, request), = raft.sent
    assert node == "n0" and request["type"] == INDEX_REQUEST
    index.on_message("n0", {"type": INDEX_REPLY, "id": request["id"], "index": 7})
    assert out == []                                    # applied 5 < 7
    raft.raftLastApplied = 7
    index.on_tick()
    assert out == [True]


def test_a_follower_acknowledges_only_probes_of_its_own_term():
    raft = ScriptedRaft(others=2, leader=False)
    index = ReadIndex(raft)
    index.on_message("n0", {"type": PROBE, "term": 2, "seq": 1})
    index.on_message("n0", {"type": PROBE, "term": 3, "seq": 2})
    assert raft.sent == [("n0", {"type": ACK, "term": 3, "seq": 2})]


# -- real processes ----------------------------------------------------------------------------------------

pytestmark_cluster = pytest.mark.skipif(not iptables_usable(), reason="needs iptables (root)")


def leader_of(driver: ProcessDriver, nodes: list[str]) -> str | None:
    for node in nodes:
        try:
            group = driver.http(node, "/kvs/status")[1]["groups"].get("shard-1") or {}
        except (requests.RequestException, ValueError, KeyError):
            continue
        if group.get("role") == "leader":
            return node
    return None


@pytest.mark.cluster
@pytestmark_cluster
def test_an_isolated_old_leader_answers_no_read_with_a_stale_value_itself_or_through_a_follower():
    driver = ProcessDriver(1, 5)
    driver.start()
    try:
        nodes = driver.nodes()
        wait_until(lambda: all(driver.healthy(n) for n in nodes), 60, message="cluster healthy")
        url = lambda node: f"http://{node}/kvs/keys/probe"
        assert requests.put(url(nodes[0]), json={"value": "old"}, timeout=5).status_code in (200, 201)
        old_leader = leader_of(driver, nodes)
        assert old_leader is not None
        follower = next(n for n in nodes if n != old_leader)
        majority = [n for n in nodes if n not in (old_leader, follower)]
        stale: list[tuple[str, float]] = []
        new_written = threading.Event()
        written_at: list[float] = []

        def read_minority() -> None:
            stop = time.monotonic() + 8
            while time.monotonic() < stop:
                for node in (old_leader, follower):
                    started = time.monotonic()
                    try:
                        resp = requests.get(url(node), timeout=6)
                    except requests.RequestException:
                        continue
                    if resp.status_code == 200:
                        if new_written.is_set() and started > written_at[0] and resp.json()["value"] == "old":
                            stale.append((node, started))

        driver.isolate_together([old_leader, follower])
        reader = threading.Thread(target=read_minority)
        reader.start()
        try:
            def write_new() -> bool:
                try:
                    return requests.put(url(majority[0]), json={"value": "new"}, timeout=6).status_code in (200, 201)
                except requests.RequestException:
                    return False

            wait_until(write_new, 20, message="the majority side accepts the new write")
            written_at.append(time.monotonic())
            new_written.set()
            reader.join(30)
        finally:
            driver.heal_together([old_leader, follower])
        assert not stale, f"{len(stale)} stale reads after the new write, the first: {stale[:3]}"
        def reads_new(node: str) -> bool:
            try:
                resp = requests.get(url(node), timeout=6)
                return resp.status_code == 200 and resp.json()["value"] == "new"
            except requests.RequestException:
                return False

        for node in (old_leader, follower):
            wait_until(lambda: reads_new(node), 30, message=f"{node} reads the new value after healing")
    finally:
        driver.stop()
