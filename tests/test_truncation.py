"""A follower truncates its log only on a real conflict, never a matching suffix it already acknowledged.

Stock PySyncObj 0.3.17 deletes every entry after `prevLogIdx` whenever the
follower's log is longer, then appends the message's entries, even when they
are the ones it already holds: a late or duplicated AppendEntries made a
follower drop entries it had acknowledged (and a kill between the deletion and
the re-append lost them). Raft's rule is kept instead (`kvs.raft.append_entries`):
skip the entries that match, truncate at the first entry of a different term,
and never let the commit index cover entries the message did not verify.

The unit tests hand crafted messages to a real `Replica` with a real
`DurableJournal` that nobody ticks (`autoTick=False`: the test's thread is the
tick thread). The last test replays every AppendEntries batch of a real
three-replica group late, after the batch that followed it.
"""

from __future__ import annotations

import threading
import time

import pysyncobj.pickle
from pysyncobj import SyncObjConf
from pysyncobj.transport import TCPTransport

from kvs.fsm.shard import ShardState
from kvs.raft import append_entries, storage
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.journal import DurableJournal
from kvs.raft.replica import Replica
from kvs.testing.cluster import find_free_base_port, wait_until

NO_OP = b"\x01"
NEVER_COMPACT = RaftTiming(compaction_entries=10**9, compaction_seconds=10**9)


def membership(op: str, address: str) -> bytes:
    return b"\x02" + pysyncobj.pickle.dumps([op, address])


class _Inert:
    """The state machine of a follower that is never ticked: nothing is applied."""

    def apply(self, command):
        raise AssertionError("nothing is applied in these tests")


class Follower:
    """A real Replica (term 2, following `leader`) whose messages come from the test, not a socket."""

    def __init__(self, tmp_path, dump: bool = False):
        storage.install()
        base = find_free_base_port(4)
        self.address, leader, other = (f"127.0.0.1:{base + i}" for i in range(3))
        self.outsider = f"127.0.0.1:{base + 3}"
        conf = SyncObjConf(autoTick=False, journalFile=str(tmp_path / "journal"), dynamicMembershipChange=True,
                           fullDumpFile=str(tmp_path / "dump") if dump else None)
        self.replica = Replica(self.address, [leader, other], _Inert(), conf)
        self.leader = next(n for n in self.replica._SyncObj__otherNodes if n.id == leader)
        self.journal: DurableJournal = self.replica._SyncObj__raftLog
        self.truncated: list[list[tuple[int, int]]] = []   # (index, term) of the entries each truncation removed
        self.answers: list[dict] = []
        real_delete, real_send = self.journal.deleteEntriesFrom, self.replica._SyncObj__transport.send

        def delete(position: int) -> None:
            self.truncated.append([(e[1], e[2]) for e in self.log()[position:]])
            real_delete(position)

        def send(node, message) -> bool:
            if message.get("type") == "next_node_idx":
                self.answers.append(message)
            return real_send(node, message)          # RaftTransport.send: the journal is synced first

        self.journal.deleteEntriesFrom = delete
        self.replica._SyncObj__transport.send = send

    def log(self) -> list[tuple]:
        return [self.journal[i] for i in range(len(self.journal))]

    def terms(self) -> list[tuple[int, int]]:
        return [(e[1], e[2]) for e in self.log()]

    def members(self) -> set[str]:
        return {n.id for n in self.replica._SyncObj__otherNodes}

    @property
    def commit_index(self) -> int:
        return self.replica.raftCommitIndex

    def receive(self, message: dict) -> dict | None:
        """Deliver one message from the leader; the answer it sent, if any."""
        before = len(self.answers)
        self.replica._SyncObj__onMessageReceived(self.leader, message)
        return self.answers[-1] if len(self.answers) > before else None

    def append(self, prev: int, prev_term: int, entries: list[tuple], commit: int = 0, term: int = 2) -> dict | None:
        return self.receive({"type": "append_entries", "term": term, "commit_index": commit, "entries": entries,
                             "prevLogIdx": prev, "prevLogTerm": prev_term})

    def close(self) -> None:
        self.replica.destroy()


def entries(first: int, last: int, term: int) -> list[tuple]:
    return [(NO_OP, i, term) for i in range(first, last + 1)]


def acknowledged(answer: dict | None, next_index: int) -> bool:
    return answer is not None and answer["success"] and not answer["reset"] and answer["next_node_idx"] == next_index


# -- one follower, crafted messages -------------------------------------------------------------

def test_a_late_append_entries_whose_entries_match_keeps_the_acknowledged_entries_after_them(tmp_path):
    f = Follower(tmp_path)
    try:
        assert acknowledged(f.append(1, 0, entries(2, 5, 2)), 6)
        assert acknowledged(f.append(5, 2, entries(6, 10, 2)), 11)       # 6..10 acknowledged
        answer = f.append(1, 0, entries(2, 5, 2))                        # the first batch again, late
        assert f.truncated == []
        assert f.terms() == [(1, 0)] + [(i, 2) for i in range(2, 11)]
        assert acknowledged(answer, 6)                # what this message verified, not more
    finally:
        f.close()


def test_a_duplicated_append_entries_leaves_the_log_untouched(tmp_path):
    f = Follower(tmp_path)
    try:
        f.append(1, 0, entries(2, 10, 2))
        assert acknowledged(f.append(1, 0, entries(2, 10, 2)), 11)
        assert acknowledged(f.append(4, 2, []), 5)                       # an old heartbeat
        assert f.truncated == []
        assert f.terms() == [(1, 0)] + [(i, 2) for i in range(2, 11)]
    finally:
        f.close()


def test_an_entry_of_a_different_term_truncates_the_log_from_that_index_and_not_before(tmp_path):
    f = Follower(tmp_path)
    try:
        f.append(1, 0, entries(2, 10, 1), term=1)                       # an old leader's entries
        answer = f.append(5, 1, entries(6, 6, 1) + entries(7, 8, 2), term=2)
        assert f.truncated == [[(i, 1) for i in range(7, 11)]]           # 6 matched: kept, not rewritten
        assert f.terms() == [(1, 0)] + [(i, 1) for i in range(2, 7)] + [(7, 2), (8, 2)]
        assert acknowledged(answer, 9)
    finally:
        f.close()


def test_the_commit_index_never_covers_entries_the_message_did_not_verify(tmp_path):
    f = Follower(tmp_path)
    try:
        f.append(1, 0, entries(2, 10, 1), term=1)                        # 6..10 may conflict with term 2
        answer = f.append(5, 1, [], commit=8, term=2)                     # verifies up to 5 only
        assert acknowledged(answer, 6)
        assert f.commit_index == 5
        assert f.truncated == [] and len(f.log()) == 10                   # no conflict seen yet: kept
        f.append(5, 1, entries(6, 6, 1) + entries(7, 7, 2), commit=8, term=2)
        assert f.commit_index == 7                                         # 8 is not the leader's 8
        assert f.terms()[-2:] == [(6, 1), (7, 2)]
    finally:
        f.close()


def test_a_membership_change_in_a_matching_suffix_is_not_reversed(tmp_path):
    f = Follower(tmp_path)
    try:
        batch = entries(2, 7, 2) + [(membership("add", f.outsider), 8, 2)] + entries(9, 10, 2)
        f.append(1, 0, batch)
        assert f.outsider in f.members()
        assert acknowledged(f.append(1, 0, batch[:4]), 6)                  # a late copy of the start
        assert f.outsider in f.members()
        assert f.truncated == [] and f.log()[7][1:] == (8, 2)
        assert acknowledged(f.append(1, 0, batch), 11)                    # a duplicate of the whole batch
        assert f.outsider in f.members() and f.truncated == []
    finally:
        f.close()


def test_a_membership_change_in_a_conflicting_suffix_is_reversed(tmp_path):
    f = Follower(tmp_path)
    try:
        f.append(1, 0, entries(2, 7, 1) + [(membership("add", f.outsider), 8, 1)], term=1)
        assert f.outsider in f.members()
        f.append(6, 1, entries(7, 9, 2), term=2)                           # 7 conflicts: 7 and 8 go
        assert f.outsider not in f.members()
        assert f.truncated == [[(7, 1), (8, 1)]]
    finally:
        f.close()


def test_a_late_entry_sent_in_chunks_does_not_truncate_either(tmp_path):
    f = Follower(tmp_path)
    try:
        big = (b"\x00" + b"x" * 300, 3, 2)
        f.append(1, 0, entries(2, 2, 2) + [big] + entries(4, 10, 2))
        data = pysyncobj.pickle.dumps(big)
        head = {"type": "append_entries", "term": 2, "commit_index": 0, "prevLogIdx": 2, "prevLogTerm": 2}
        assert not f.receive({**head, "transmission": "start", "data": data[:100]})["success"]
        answer = f.receive({**head, "transmission": "finish", "data": data[100:]})
        assert f.truncated == [] and len(f.log()) == 10
        assert acknowledged(answer, 4)
        assert f.replica._SyncObj__recvTransmission == ""                  # ready for the next transmission
    finally:
        f.close()


def test_a_message_of_an_older_term_changes_nothing_and_gets_no_answer(tmp_path):
    f = Follower(tmp_path)
    try:
        f.append(1, 0, entries(2, 10, 2), commit=3, term=2)
        assert f.append(1, 0, entries(2, 5, 2), commit=9, term=1) is None
        assert f.commit_index == 3 and len(f.log()) == 10 and f.truncated == []
    finally:
        f.close()


def test_a_snapshot_chunk_does_not_commit_the_log_it_is_about_to_replace(tmp_path):
    f = Follower(tmp_path, dump=True)
    try:
        f.append(1, 0, entries(2, 10, 1), term=1)                         # maybe not the new leader's 2..10
        before = f.commit_index
        f.receive({"type": "append_entries", "term": 2, "commit_index": 50,
                   "serialized": (b"the first part of a snapshot", True, False)})
        assert f.commit_index == before < 10
    finally:
        f.close()


def test_a_malformed_append_entries_reaches_pysyncobj_unchanged():
    log = entries(1, 10, 2)

    def entries_from(index):
        return log[index - 1:] if isinstance(index, int) and index >= 1 else []

    base = {"type": "append_entries", "term": 2, "commit_index": 3, "prevLogIdx": 1, "prevLogTerm": 2}
    for message in ({**base, "prevLogIdx": None}, {**base, "prevLogIdx": "1"}, {**base, "commit_index": None},
                    {**base, "entries": "abc"}, {**base, "entries": [(NO_OP, 5, 2)]},      # not the next index
                    {**base, "entries": [(NO_OP, 2)]}):
        assert append_entries.screen(message, entries_from) == append_entries.Screened(message)
    # a well-formed one that does not match is refused by the replica, and commits nothing on its way
    refused = append_entries.screen({**base, "prevLogTerm": 1}, entries_from)
    assert refused == append_entries.Screened({"type": "append_entries", "term": 2, "commit_index": 0}, refused=True)
    assert append_entries.complete_transmission({**base, "data": b"x"}, "", pysyncobj.pickle.loads) is None


# -- a real group whose AppendEntries arrive late ------------------------------------------------

def test_followers_never_drop_committed_entries_when_every_batch_is_replayed_late(tmp_path, monkeypatch):
    """Each AppendEntries batch reaches its follower a second time, after the next batch: the follower
    answers it without dropping the newer entries, and the leader keeps committing."""
    removed: list[tuple[str, int, int]] = []           # (journal, index, term) of every entry a truncation removed
    lock = threading.Lock()
    real_delete, real_send = DurableJournal.deleteEntriesFrom, TCPTransport.send
    previous: dict[tuple[int, object], dict] = {}
    replayed = [0]

    def delete(journal, position: int) -> None:
        with lock:
            removed.extend((journal._path, e[1], e[2]) for e in journal._entries[position:])
        real_delete(journal, position)

    def send(transport, node, message) -> bool:
        sent = real_send(transport, node, message)
        if isinstance(message, dict) and message.get("type") == "append_entries" and message.get("entries"):
            late = previous.get((id(transport), node))
            previous[(id(transport), node)] = message
            if late is not None:
                replayed[0] += 1
                real_send(transport, node, late)
        return sent

    monkeypatch.setattr(DurableJournal, "deleteEntriesFrom", delete)
    monkeypatch.setattr(TCPTransport, "send", send)
    base = find_free_base_port(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    groups = [RaftGroup("late", a, addresses, ShardState(), str(tmp_path / f"r{i}"), None, NEVER_COMPACT)
              for i, a in enumerate(addresses)]
    try:
        leader = wait_until(lambda: next((g for g in groups if g.is_leader()), None), 20, message="a leader")
        errors: list[BaseException] = []

        def write(t: int) -> None:
            try:
                for i in range(30):
                    leader.execute(("put", f"id-{t}-{i}", f"k{t}-{i}", "v"), time.monotonic() + 20)
            except BaseException as exc:           # reported on the test's thread
                errors.append(exc)

        writers = [threading.Thread(target=write, args=(t,)) for t in range(3)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        assert not errors, errors
        last = leader.status()["commit-index"]
        wait_until(lambda: all(g.status()["commit-index"] >= last for g in groups), 20,
                   message="every replica learnt the commit index")
        committed = {(e[1], e[2]) for e in (leader._replica._SyncObj__raftLog[i]
                                           for i in range(len(leader._replica._SyncObj__raftLog)))
                     if e[1] <= last}
        counts = [g.read(lambda s: s.key_count(), time.monotonic() + 10) for g in groups]
    finally:
        for g in groups:
            g.close()
    assert counts == [90, 90, 90] and replayed[0] > 0
    with lock:
        dropped = [r for r in removed if (r[1], r[2]) in committed]
    assert dropped == [], f"{len(dropped)} committed entries were truncated, e.g. {dropped[:5]}"
