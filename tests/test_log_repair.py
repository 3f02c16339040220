"""A leader repairs a follower's log whatever the follower's stale tail and however late its answers.

Soak seed 33 (process backend, 5fbec4a): a shard's leader, cut off while it
kept taking writes, came back with a long tail of its old term; the new leader,
whose third replica was down, needed it for every commit. Stock PySyncObj
answers a refused AppendEntries with "go back one entry" (or "go to my end"),
and its leader takes the last answer it gets; while it kept sending (every
write it took), the answers to those later messages undid each step back, and
the group took no write and no read for 14 s. A follower's refusal now skips
its conflicting term's whole run and never asks for more than its last refusal
did until a message matches (`kvs.raft.append_entries.refusal_hint`).

Crafted messages go to a real `Replica` nobody ticks (`Follower`, from
`tests.test_truncation`); the last test runs the seed's situation on a real
three-replica group.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest
from pysyncobj.transport import TCPTransport

from kvs.errors import Unavailable
from kvs.fsm.shard import ShardState
from kvs.raft.append_entries import refusal_hint
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.replica import Replica
from kvs.testing.cluster import find_free_base_port, wait_until
from tests.test_truncation import Follower, acknowledged, entries

NEVER_COMPACT = RaftTiming(compaction_entries=10**9, compaction_seconds=10**9)


def refused(answer: dict | None, next_index: int) -> bool:
    return answer is not None and answer["reset"] and not answer["success"] and answer["next_node_idx"] == next_index


def with_stale_tail(tmp_path) -> Follower:
    """A follower with 2..5 of term 1 (the leaders' common past) and 6..40 of term 2, an old leader's."""
    f = Follower(tmp_path)
    f.append(1, 0, entries(2, 5, 1), term=1)
    f.append(5, 1, entries(6, 40, 2), term=2)
    return f


# -- crafted messages --------------------------------------------------------------------------

def test_a_refusal_sends_the_leader_back_past_the_old_term_s_whole_run_at_once(tmp_path):
    f = with_stale_tail(tmp_path)
    try:
        commit = f.commit_index
        assert refused(f.append(40, 3, [], commit=45, term=3), 6)       # not 40, one entry back
        assert f.truncated == [] and f.commit_index == commit          # a refusal changes no entry, commits none
        assert acknowledged(f.append(5, 1, entries(6, 8, 3), term=3), 9)
        assert f.terms() == [(1, 0)] + [(i, 1) for i in range(2, 6)] + [(i, 3) for i in range(6, 9)]
    finally:
        f.close()


def test_answers_to_messages_sent_before_the_leader_went_back_never_ask_for_more(tmp_path):
    f = with_stale_tail(tmp_path)
    try:
        assert refused(f.append(30, 3, [], term=3), 6)
        # Sent before the leader took that answer: one past the follower's end, one inside the old run.
        # Stock PySyncObj answered 41 and 35, and its leader, taking the last answer, went forward again.
        assert refused(f.append(50, 3, entries(51, 52, 3), term=3), 6)
        assert refused(f.append(35, 3, [], term=3), 6)
        assert acknowledged(f.append(5, 1, entries(6, 6, 3), term=3), 7)
        # A message matched: the next refusal is worked out afresh (the follower's end is now 6).
        assert refused(f.append(20, 3, [], term=3), 7)
    finally:
        f.close()


def test_a_new_leader_s_refusals_do_not_inherit_the_last_one_s(tmp_path):
    f = with_stale_tail(tmp_path)
    try:
        assert refused(f.append(30, 3, [], term=3), 6)
        assert refused(f.append(50, 4, [], term=4), 41)                # another term: its own answer
    finally:
        f.close()


@pytest.mark.parametrize("prev, commit, lower, hint", [
    (60, 10, None, 41),      # past the end: the end + 1
    (40, 10, None, 21),      # in the log: the first index of the run of the term at prev
    (20, 10, None, 11),
    (12, 10, None, 11),
    (10, 10, None, 11),      # at or before the snapshot's end (10): the entry after it, never lower
    (3, 10, None, 11),
    (60, 10, 25, 25),        # never more than the last refusal's hint
    (60, 10, 4, 11),         # ... nor at or below the snapshot's end
    (20, 15, None, 16),      # nor at or below the commit index: committed entries are the leader's
    (40, 25, 4, 26),
    (60, 99, None, 41),      # a commit index past the end (the log was cut since) counts up to the end
])
def test_a_refusal_hint_skips_a_term_s_run_and_stays_above_what_is_committed(prev, commit, lower, hint):
    terms = {i: (1 if i <= 20 else 3) for i in range(10, 41)}          # the log: 10 (snapshot end) .. 40
    assert refusal_hint(prev, 10, 40, commit, terms.__getitem__, lower) == hint


def test_a_refusal_never_sends_the_leader_back_over_committed_entries(tmp_path):
    f = Follower(tmp_path)
    try:
        f.append(1, 0, entries(2, 5, 1), term=1)
        f.append(5, 1, entries(6, 40, 2), commit=30, term=2)       # the old leader committed up to 30
        assert f.commit_index == 30
        assert refused(f.append(35, 3, [], term=3), 31)            # not 6: 6..30 are the new leader's too
        assert acknowledged(f.append(30, 2, entries(31, 32, 3), term=3), 33)
        assert f.truncated == [[(i, 2) for i in range(31, 41)]]
    finally:
        f.close()


# -- a real group: the seed's situation ---------------------------------------------------------

def test_a_leader_whose_only_partner_holds_a_long_stale_tail_commits_while_it_keeps_sending(tmp_path, monkeypatch):
    """An old leader, cut off while it kept taking proposals, comes back with a long tail of its term;
    the third replica is down, so every commit needs the old leader, whose answers arrive 100 ms late and
    in bursts while the new leader keeps proposing every 10 ms. Its log must be repaired and writes commit."""
    base = find_free_base_port(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    cut: set[str] = set()                        # addresses whose messages, both ways, are dropped
    late_from: set[str] = set()                  # addresses whose AppendEntries answers arrive late
    held: dict[int, collections.deque] = collections.defaultdict(collections.deque)   # per receiving replica
    senders: dict[int, str] = {}                 # id(transport) -> its replica's address
    real_send, real_receive, real_tick = (TCPTransport.send, Replica._SyncObj__onMessageReceived,
                                          Replica._onTick)

    def send(transport, node, message) -> bool:
        if senders.get(id(transport)) in cut or getattr(node, "id", None) in cut:
            return True
        return real_send(transport, node, message)

    def receive(replica, node, message) -> None:
        if getattr(node, "id", None) in late_from and isinstance(message, dict) \
                and message.get("type") == "next_node_idx":
            held[id(replica)].append((time.monotonic() + 0.1, node, message))   # a 100 ms network, in order
            return
        real_receive(replica, node, message)

    def tick(replica, timeToWait: float = 0.0) -> None:
        real_tick(replica, timeToWait)
        queue = held.get(id(replica))
        if queue and queue[0][0] <= time.monotonic():
            # On the tick thread, like any message, and in bursts: all that waited, once the oldest is
            # due, as a loaded machine's poll hands over what piled up (soak seed 33: load average 19).
            while queue:
                _, node, message = queue.popleft()
                real_receive(replica, node, message)

    monkeypatch.setattr(TCPTransport, "send", send)
    monkeypatch.setattr(Replica, "_SyncObj__onMessageReceived", receive)   # before the groups bind it
    monkeypatch.setattr(Replica, "_onTick", tick)
    groups = [RaftGroup("repair", a, addresses, ShardState(), str(tmp_path / f"r{i}"), None, NEVER_COMPACT)
              for i, a in enumerate(addresses)]
    for g in groups:
        senders[id(g._replica._SyncObj__transport)] = g.self_address
    stop = threading.Event()
    pump: threading.Thread | None = None
    try:
        old = wait_until(lambda: next((g for g in groups if g.is_leader()), None), 20, message="a leader")
        old.execute(("put", "before", "k-before", "v"), time.monotonic() + 10)
        cut.add(old.self_address)
        start = old.status()["log-length"]
        for i in range(200):                      # appended by the cut-off leader, never committed
            old.propose(("put", f"stale-{i}", f"k-stale-{i}", "v"), lambda result, error: None)
        wait_until(lambda: old.status()["log-length"] >= start + 200, 10, message="the stale tail appended")
        others = [g for g in groups if g is not old]
        new = wait_until(lambda: next((g for g in others if g.is_leader()), None), 20, message="a new leader")
        new.execute(("put", "while-cut", "k-while-cut", "v"), time.monotonic() + 10)
        third = next(g for g in others if g is not new)
        third.close()
        groups.remove(third)
        late_from.add(old.self_address)
        cut.clear()

        def keep_proposing() -> None:
            i = 0
            while not stop.wait(0.01):            # the new leader's clients: a proposal every 10 ms
                new.propose(("put", f"pumped-{i}", f"k-pumped-{i}", "v"), lambda result, error: None)
                i += 1

        pump = threading.Thread(target=keep_proposing, daemon=True)
        pump.start()
        try:
            new.execute(("put", "after", "k-after", "v"), time.monotonic() + 15)
        except Unavailable:
            pytest.fail("no commit in 15 s: the old leader's stale tail was never repaired")
        stop.set()
        pump.join()
        committed = new.status()["commit-index"]
        wait_until(lambda: old.status()["commit-index"] >= committed, 10, message="the old leader caught up")
        keys = old.read(lambda s: s.key_list()[0], time.monotonic() + 10)
    finally:
        stop.set()
        if pump is not None:
            pump.join()
        for g in groups:
            g.close()
    assert {"k-before", "k-while-cut", "k-after"} <= set(keys)
    assert not any(k.startswith("k-stale-") for k in keys)          # the stale tail is gone, as Raft says
