"""The Raft journal is fsynced before anything counts an entry: group commit, on every replica.

Unit tests check DurableJournal's own fsyncs (one per batch, the compaction's
and the .meta's order, KVS_FSYNC=off). The in-process groups check the two
promises against the real system calls: a follower's `next_node_idx` answer
(its acknowledgement) reaches the socket layer only after an fdatasync that
covers the acknowledged entries, and no replica (the leader above all) moves
its commit index past what it has fdatasynced. A control run with fsync off
shows the recorder does see a violation when there is one.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from pysyncobj.transport import TCPTransport

from kvs.errors import BadRequest
from kvs.fsm.shard import ShardState
from kvs.node import Node
from kvs.raft import journal as journal_module
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.journal import DurableJournal, JournalSyncError, set_fsync
from kvs.raft.storage import group_files
from kvs.settings import NodeSettings
from kvs.testing.cluster import find_free_base_port, wait_until

NEVER_COMPACT = RaftTiming(compaction_entries=10**9, compaction_seconds=10**9)


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


class CountingFdatasync:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = journal_module._fdatasync

        def fdatasync(fd: int) -> None:
            self.calls += 1
            real(fd)

        monkeypatch.setattr(journal_module, "_fdatasync", fdatasync)


# -- DurableJournal ----------------------------------------------------------------------------

def test_one_fdatasync_covers_a_whole_batch_and_a_clean_journal_costs_none(tmp_path, monkeypatch):
    counter = CountingFdatasync(monkeypatch)
    journal = DurableJournal(str(tmp_path / "journal"), fsync=True)
    for i in range(1, 101):
        journal.add(b"cmd%d" % i, i, 1)
    assert journal.dirty and counter.calls == 0          # appends alone never fsync
    assert journal.sync() is True
    assert counter.calls == 1 and journal.synced_index == 100 and not journal.dirty
    assert journal.sync() is False and counter.calls == 1
    journal.deleteEntriesFrom(90)                         # a truncation is made durable at once
    assert not journal.dirty and journal.synced_index == 90 and counter.calls == 2
    journal.clear()
    assert not journal.dirty and counter.calls == 3
    journal._destroy()


def test_a_failed_fsync_is_sticky(tmp_path, monkeypatch):
    journal = DurableJournal(str(tmp_path / "journal"), fsync=True)
    journal.add(b"a", 1, 1)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_module, "_fdatasync", failing)
    with pytest.raises(JournalSyncError):
        journal.sync()
    monkeypatch.undo()                                    # the disk "works" again: still refused
    with pytest.raises(JournalSyncError):
        journal.sync()


@needs_proc
def test_term_and_vote_are_fsynced_file_then_directory_before_set_current_term_returns(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    journal.setCurrentTerm(7, "127.0.0.1:1")
    assert events == [("fsync", path + ".meta.tmp"), ("replace", path + ".meta"), ("fsync", str(tmp_path))]
    monkeypatch.undo()
    journal._destroy()
    reopened = DurableJournal(path, fsync=True)
    assert (reopened.getCurrentTerm(), reopened.getVotedForNodeId()) == (7, "127.0.0.1:1")
    reopened._destroy()


@needs_proc
def test_compaction_fsyncs_the_new_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    for i in range(1, 11):
        journal.add(b"cmd%d" % i, i, 1)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    journal.deleteEntriesTo(6)
    assert events == [("fsync", path + ".tmp"), ("replace", path), ("fsync", str(tmp_path))]
    assert not journal.dirty and journal.synced_index == 10   # the kept entries went out in that fsync
    monkeypatch.undo()
    journal._destroy()
    assert [DurableJournal(path)[i][1] for i in range(4)] == [7, 8, 9, 10]


def test_with_fsync_off_nothing_is_ever_fsynced(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    set_fsync(path, False)
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    monkeypatch.setattr(journal_module, "_fdatasync", lambda fd: calls.append(fd))
    journal = DurableJournal(path)                        # the registered choice, as RaftGroup leaves it
    assert journal.fsync is False
    for i in range(1, 11):
        journal.add(b"x", i, 1)
    assert journal.sync() is False
    journal.setCurrentTerm(3, None)
    journal.deleteEntriesTo(5)
    journal._destroy()
    assert calls == []
    set_fsync(path, True)
    assert DurableJournal(path).fsync is True


def test_kvs_fsync_setting_reaches_the_journal(tmp_path):
    assert NodeSettings.load(environ={}).fsync is True
    assert NodeSettings.load(environ={"KVS_FSYNC": "ON"}).fsync is True
    with pytest.raises(BadRequest):
        NodeSettings.load(environ={"KVS_FSYNC": "sometimes"})
    settings = NodeSettings.load(environ={"KVS_FSYNC": "off", "DATA_DIR": str(tmp_path / "node")})
    assert settings.fsync is False
    timing = Node(settings)._timing
    assert timing.fsync is False
    address = f"127.0.0.1:{find_free_base_port(1)}"
    group = RaftGroup("plumbing", address, [address], ShardState(), str(tmp_path / "group"), None, timing)
    try:
        assert group._replica._SyncObj__raftLog.fsync is False
    finally:
        group.close()


# -- groups of real replicas in this process --------------------------------------------------

class DurabilityRecorder:
    """Compares what each replica acknowledges or commits with what it has really fdatasynced.

    `durable[journal]` is the last entry index a journal held when an fdatasync
    of its file (the real system call, patched here) returned. A successful
    `next_node_idx` handed to the socket layer (`TCPTransport.send`, below our
    RaftTransport) acknowledges entries up to `next_node_idx - 1`; a journal's
    `setRaftCommitIndex` is where PySyncObj records a new commit index. A
    compaction rewrites and fsyncs the journal itself, so it counts as a sync."""

    def __init__(self, monkeypatch):
        self.lock = threading.Lock()
        self.journals: list[DurableJournal] = []
        self.durable: dict[int, int] = {}
        self.violations: list[str] = []
        self.acks = 0
        self.commits = 0
        recorder = self

        real_init = DurableJournal.__init__

        def init(journal, *args, **kwargs):
            real_init(journal, *args, **kwargs)
            with recorder.lock:
                recorder.journals.append(journal)

        real_fdatasync = journal_module._fdatasync

        def fdatasync(fd: int) -> None:
            real_fdatasync(fd)
            with recorder.lock:
                for journal in recorder.journals:
                    if journal._fd == fd:
                        recorder.durable[id(journal)] = journal[-1][1] if len(journal) else 0

        real_send = TCPTransport.send

        def send(transport, node, message):
            if isinstance(message, dict) and message.get("type") == "next_node_idx" and message.get("success"):
                recorder.check(transport._syncObj._SyncObj__raftLog, message["next_node_idx"] - 1, "acknowledged")
            return real_send(transport, node, message)

        real_set_commit = DurableJournal.setRaftCommitIndex

        def set_commit(journal, index):
            if index != journal.getRaftCommitIndex():
                recorder.check(journal, index, "committed")
            real_set_commit(journal, index)

        real_compact = DurableJournal.deleteEntriesTo

        def compact(journal, entry_to):
            # A compaction fsyncs the rewritten journal itself (see its own test above).
            real_compact(journal, entry_to)
            if journal.fsync:
                with recorder.lock:
                    recorder.durable[id(journal)] = journal[-1][1] if len(journal) else 0

        monkeypatch.setattr(DurableJournal, "__init__", init)
        monkeypatch.setattr(DurableJournal, "deleteEntriesTo", compact)
        monkeypatch.setattr(journal_module, "_fdatasync", fdatasync)
        monkeypatch.setattr(TCPTransport, "send", send)
        monkeypatch.setattr(DurableJournal, "setRaftCommitIndex", set_commit)

    def check(self, journal: DurableJournal, index: int, what: str) -> None:
        with self.lock:
            if what == "acknowledged":
                self.acks += 1
            else:
                self.commits += 1
            durable = self.durable.get(id(journal), 0)
            if index > durable:
                self.violations.append(f"{journal._path}: {what} {index}, fdatasynced only up to {durable}")


def start_groups(tmp_path, count: int, timing: RaftTiming, loop=None) -> list[RaftGroup]:
    base = find_free_base_port(count)
    addresses = [f"127.0.0.1:{base + i}" for i in range(count)]
    return [RaftGroup("fsync", a, addresses, ShardState(), str(tmp_path / f"r{i}"), None, timing, loop=loop)
            for i, a in enumerate(addresses)]


def leader_of(groups: list[RaftGroup]) -> RaftGroup | None:
    leaders = [g for g in groups if g.is_leader()]
    return leaders[0] if len(leaders) == 1 else None


def write_concurrently(group: RaftGroup, threads: int, per_thread: int) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                group.execute(("put", f"id-{t}-{i}", f"k{t}-{i}", "v" * 64), time.monotonic() + 20)
        except BaseException as exc:      # reported below, on the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors


def run_writes(tmp_path, count: int, timing: RaftTiming, loop=None) -> list[RaftGroup]:
    """Writes from 4 threads through the leader of `count` replicas (ticked by `loop` if given)."""
    groups = start_groups(tmp_path, count, timing, loop)
    try:
        leader = wait_until(lambda: leader_of(groups), 20, message="one leader")
        write_concurrently(leader, threads=4, per_thread=25)
        last = leader.status()["commit-index"]
        wait_until(lambda: all(g.status()["commit-index"] >= last for g in groups), 20,
                   message="every replica learnt the commit index")
    finally:
        for g in groups:
            g.close()
    return groups


def test_three_replicas_acknowledge_and_commit_only_fdatasynced_entries(tmp_path, monkeypatch):
    recorder = DurabilityRecorder(monkeypatch)
    run_writes(tmp_path, 3, NEVER_COMPACT)
    assert recorder.acks > 0 and recorder.commits > 0
    assert recorder.violations == []


def test_a_single_replica_commits_only_fdatasynced_entries(tmp_path, monkeypatch):
    # Nobody else counts: the replica's own fsync is all that stands between a write and its commit,
    # including the no-op that an election appends and counts within the same tick.
    recorder = DurabilityRecorder(monkeypatch)
    run_writes(tmp_path, 1, NEVER_COMPACT)
    assert recorder.commits > 0
    assert recorder.violations == []


def test_the_recorder_sees_violations_when_fsync_is_off(tmp_path, monkeypatch):
    recorder = DurabilityRecorder(monkeypatch)
    run_writes(tmp_path, 3, RaftTiming(compaction_entries=10**9, compaction_seconds=10**9, fsync=False))
    assert recorder.acks and recorder.violations


@needs_proc
def test_an_installed_snapshot_is_fsynced_before_the_journal_is_cleared_and_acknowledged(tmp_path, monkeypatch):
    recorder = DurabilityRecorder(monkeypatch)
    timing = RaftTiming(compaction_entries=40, compaction_seconds=10**9)
    groups = start_groups(tmp_path, 3, timing)
    lagging_dir = str(tmp_path / "lagging-restart")      # it comes back empty: only a snapshot can help
    _, lagging_snapshot = group_files(lagging_dir)
    events: list[str] = []
    real_fsync, real_clear = os.fsync, DurableJournal.clear

    def fsync(fd: int) -> None:
        if fd_path(fd) == lagging_snapshot:
            events.append("snapshot fsynced")
        real_fsync(fd)

    def clear(journal) -> None:
        if journal._path.startswith(lagging_dir + os.sep):
            events.append("journal cleared")
        real_clear(journal)

    try:
        leader = wait_until(lambda: leader_of(groups), 20, message="one leader")
        lagging = next(g for g in groups if g is not leader)
        address = lagging.self_address
        lagging.close()
        groups.remove(lagging)
        write_concurrently(leader, threads=2, per_thread=60)       # past two compactions without it
        wait_until(lambda: leader.status()["log-length"] < 120, 20, message="the leader compacted")
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(DurableJournal, "clear", clear)
        rejoined = RaftGroup("fsync", address, [g.self_address for g in groups] + [address], ShardState(),
                             lagging_dir, None, timing)
        groups.append(rejoined)
        last = leader.status()["commit-index"]
        wait_until(lambda: rejoined.status()["commit-index"] >= last, 30, message="the lagging replica caught up")
    finally:
        for g in groups:
            g.close()
    assert recorder.violations == []
    assert "journal cleared" in events, "the lagging replica never installed a snapshot"
    assert events.index("snapshot fsynced") < events.index("journal cleared")
