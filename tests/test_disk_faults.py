"""Disk faults (issue 11): a journal write or fsync that fails leaves whole files, and its replica halts.

The journal, alone: a write cut short by a real file-size limit (RLIMIT_FSIZE
in a child process: the kernel's short write, then EFBIG, exactly as a full
disk answers with ENOSPC) leaves no torn record behind, nothing accepted is
lost, a `.meta` write that fails leaves no `.tmp`, and a failed journal
refuses every change until it is reopened, which drops only what no
successful sync covered.

Replicas in this process: one whose journal fails halts (no traceback per
tick) while the group commits with the others, leadership included; closed
and reopened from its directory by `GroupRecovery`, it catches up.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kvs.errors import Unavailable
from kvs.fsm.shard import ShardState
from kvs.node import Node
from kvs.raft import journal as journal_module
from kvs.raft import recovery as recovery_module
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.journal import DurableJournal, JournalError, JournalFailure, JournalSyncError, JournalWriteError
from kvs.raft.recovery import GroupRecovery
from kvs.settings import NodeSettings
from kvs.testing.cluster import find_free_base_port, wait_until
from tests.test_loop_poller import running_loop

RECORD = 24 + 100          # header + a 100-byte command


def entries_of(journal: DurableJournal) -> list[tuple]:
    return [journal[i] for i in range(len(journal))]


# -- the journal alone ------------------------------------------------------------------------------

LIMITED_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    from kvs.raft.journal import DurableJournal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of death, as for Python by default
    path, meta_dir = sys.argv[1], sys.argv[2]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    journal = DurableJournal(path, fsync=True)
    for i in range(1, 11):
        journal.add(b"x" * 100, i, 1)
    journal.sync()
    # Room for one more record and half of the next: the kernel writes that half and refuses the rest.
    resource.setrlimit(resource.RLIMIT_FSIZE, (10 * {record} + {room}, hard))
    accepted, error = [], None
    for i in range(11, 20):
        try:
            journal.add(b"y" * 100, i, 1)
            accepted.append(i)
        except OSError as exc:
            error = type(exc).__name__
            break
    size_after_failure = os.path.getsize(path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))      # space returns
    try:
        journal.add(b"z" * 100, 20, 1)                 # the same journal object: it must refuse
        accepted.append(20)
    except OSError:
        pass
    failure = getattr(journal, "failure", None)
    # .meta: an existing one, then a term that cannot be written (no file may grow past 8 bytes).
    other = DurableJournal(os.path.join(meta_dir, "journal"), fsync=True)
    other.setCurrentTerm(4, "before")
    resource.setrlimit(resource.RLIMIT_FSIZE, (8, hard))
    try:
        other.setCurrentTerm(5, "after")
        meta_error = None
    except OSError as exc:
        meta_error = type(exc).__name__
    print(json.dumps({{"accepted": accepted, "error": error, "size_after_failure": size_after_failure,
                      "operation": failure and failure.operation,
                      "meta_error": meta_error, "files": sorted(os.listdir(meta_dir))}}))
""")


def run_limited_child(tmp_path) -> dict:
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    script = LIMITED_CHILD.format(record=RECORD, room=RECORD + RECORD // 2)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "journal"), str(meta_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_append_cut_short_by_a_full_disk_leaves_no_torn_record_and_loses_nothing_accepted(tmp_path):
    result = run_limited_child(tmp_path)
    reopened = DurableJournal(str(tmp_path / "journal"), fsync=True)
    assert [e[1] for e in entries_of(reopened)] == list(range(1, 11)) + result["accepted"], \
        "an append that returned normally is not in the journal"
    assert result["size_after_failure"] == (10 + len(result["accepted"])) * RECORD, "a torn record was left behind"
    assert result["accepted"] == [11], "a failed journal accepted an append after space returned"
    assert result["error"] == "JournalWriteError" and result["operation"] == "append"
    reopened.add(b"w" * 100, 12, 2)                     # reopened, on a disk with room again
    reopened._destroy()
    assert [e[1] for e in entries_of(DurableJournal(str(tmp_path / "journal")))] == list(range(1, 13))


def test_a_meta_write_that_fails_leaves_no_tmp_file_and_the_old_term(tmp_path):
    result = run_limited_child(tmp_path)
    assert result["files"] == ["journal", "journal.meta"], "a half-written .meta.tmp was left on the full disk"
    assert result["meta_error"] == "JournalWriteError"
    again = DurableJournal(str(tmp_path / "meta" / "journal"))
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (4, "before")


class FailingWrites:
    """os.pwrite as a full disk answers it, for the journals whose fd is in `fds`: a short write, then ENOSPC."""

    def __init__(self, monkeypatch):
        self.fds: set[int] = set()
        self.calls = 0
        real = journal_module._pwrite

        def pwrite(fd: int, data, offset: int) -> int:
            if fd not in self.fds:
                return real(fd, data, offset)
            self.calls += 1
            if len(data) > 1 and self.calls % 2:
                return real(fd, bytes(data[:len(data) // 2]), offset)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(journal_module, "_pwrite", pwrite)


def synced_journal(tmp_path, entries: int) -> tuple[str, DurableJournal]:
    """A fsyncing journal holding `entries` synced records of 100 bytes (indexes 1..entries, term 1)."""
    path = str(tmp_path / "journal")
    journal = DurableJournal(path, fsync=True)
    for i in range(1, entries + 1):
        journal.add(b"x" * 100, i, 1)
    journal.sync()
    return path, journal


def test_a_failed_journal_refuses_every_change_and_logs_it_once(tmp_path, monkeypatch, caplog):
    path, journal = synced_journal(tmp_path, 5)
    failing = FailingWrites(monkeypatch)
    failing.fds.add(journal._fd)
    with caplog.at_level(logging.CRITICAL):
        with pytest.raises(JournalWriteError):
            journal.add(b"y" * 100, 6, 1)
        assert os.path.getsize(path) == 5 * RECORD
        failing.fds.clear()                                  # space returns: the journal still refuses
        for change in (lambda: journal.add(b"y", 6, 1), journal.sync, lambda: journal.setCurrentTerm(2, "x"),
                       lambda: journal.deleteEntriesFrom(2), lambda: journal.deleteEntriesTo(2), journal.clear):
            with pytest.raises(JournalError):
                change()
    assert journal.failure.operation == "append" and "No space left" in journal.failure.error
    assert len([r for r in caplog.records if "acknowledges nothing more" in r.getMessage()]) == 1
    journal._destroy()
    assert [e[1] for e in entries_of(DurableJournal(path))] == [1, 2, 3, 4, 5]


def test_after_a_failed_fsync_only_what_a_good_sync_covered_is_kept(tmp_path, monkeypatch):
    # "fsyncgate": after a failed fsync the page cache may show entries the disk never got; they were
    # never acknowledged, and a reopened journal must not acknowledge them later as if they were durable.
    path, journal = synced_journal(tmp_path, 5)
    for i in range(6, 9):
        journal.add(b"y" * 100, i, 1)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_module, "_fdatasync", failing)
    with pytest.raises(JournalSyncError):
        journal.sync()
    monkeypatch.undo()
    assert journal.failure.trusted_end == 5 * RECORD
    journal._destroy()
    assert [e[1] for e in entries_of(DurableJournal(path))] == [1, 2, 3, 4, 5]


def test_a_compaction_that_fails_leaves_the_old_journal_whole_and_no_tmp_file(tmp_path, monkeypatch):
    path, journal = synced_journal(tmp_path, 10)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(JournalWriteError):
        journal.deleteEntriesTo(6)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["journal"]
    journal._destroy()
    assert [e[1] for e in entries_of(DurableJournal(path))] == list(range(1, 11))


class HaltedGroup:
    """What GroupRecovery needs of a halted RaftGroup."""

    def __init__(self, directory) -> None:
        self.name, self.directory = "shard-9", str(directory)
        self.failure = JournalFailure(os.path.join(self.directory, "journal"), "append", "OSError: full",
                                      time.time(), 0)

    def close(self) -> None:
        pass


def test_a_group_that_halts_again_soon_after_its_reopening_keeps_its_backoff(tmp_path, monkeypatch):
    monkeypatch.setattr(recovery_module, "STABLE_AFTER", 2.0)
    recovery = GroupRecovery()
    recovery.take("9", HaltedGroup(tmp_path))
    assert recovery.status()["shard-9"]["next-attempt-in"] == 0          # a new fault: tried at once
    assert set(recovery.reopen_due(lambda key: HaltedGroup(tmp_path))) == {"9"}
    waits = []
    for _ in range(3):                                                   # it halts again at once, thrice
        recovery.take("9", HaltedGroup(tmp_path))
        waits.append(recovery.status()["shard-9"]["next-attempt-in"])
        assert recovery.reopen_due(lambda key: pytest.fail("reopened before its backoff")) == {}
        wait_until(lambda: recovery.reopen_due(lambda key: HaltedGroup(tmp_path)), 5, message="reopened")
    assert waits == [0.5, 1.0, 2.0]
    monkeypatch.setattr(recovery_module, "STABLE_AFTER", 0.0)          # as if it had run well for long
    recovery.take("9", HaltedGroup(tmp_path))
    assert recovery.status()["shard-9"]["next-attempt-in"] == 0          # a new fault again: tried at once


# -- replicas in this process --------------------------------------------------------------------------

TIMING = RaftTiming(compaction_entries=10**9, compaction_seconds=10**9)


def start_groups(tmp_path, count: int, loop=None) -> list[RaftGroup]:
    base = find_free_base_port(count)
    addresses = [f"127.0.0.1:{base + i}" for i in range(count)]
    return [RaftGroup("disk", a, addresses, ShardState(), str(tmp_path / f"r{i}"), None, TIMING, loop=loop)
            for i, a in enumerate(addresses)]


@pytest.fixture(params=["tick threads", "event loop"])
def raft_loop(request):
    """None (each replica has its tick thread), or a running loop that ticks them (kvs.raft.loop_poller)."""
    if request.param == "tick threads":
        yield None
        return
    with running_loop() as loop:
        yield loop


def one_leader(groups: list[RaftGroup]) -> RaftGroup | None:
    leaders = [g for g in groups if g.failure is None and g.is_leader()]
    return leaders[0] if len(leaders) == 1 else None


def put(groups: list[RaftGroup], key: str) -> None:
    """Through whichever replica leads and works; an attempt on a leader that halts meanwhile times out."""
    def attempt() -> bool:
        leader = one_leader(groups)
        if leader is None:
            return False
        try:
            leader.execute(("put", f"id-{key}", key, f"value-{key}"), time.monotonic() + 2)
        except Unavailable:
            return False
        return True

    wait_until(attempt, 30, message=f"put {key}")


class FullDisk:
    """The recovery's disk probe fails (ENOSPC) until `full` is set False."""

    def __init__(self, monkeypatch) -> None:
        self.full = True
        monkeypatch.setattr(recovery_module, "probe_directory", self.probe)

    def probe(self, directory: str) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_replica_whose_journal_fails_halts_the_group_goes_on_and_it_catches_up_once_reopened(
        tmp_path, monkeypatch, caplog, raft_loop):
    failing = FailingWrites(monkeypatch)
    disk = FullDisk(monkeypatch)
    groups = start_groups(tmp_path, 3, raft_loop)
    addresses = sorted(g.self_address for g in groups)
    try:
        for i in range(20):
            put(groups, f"before-{i}")
        leader = one_leader(groups)
        failing.fds.add(leader._replica._SyncObj__raftLog._fd)         # the leader's disk fills up
        with caplog.at_level(logging.ERROR):
            for i in range(20):
                put(groups, f"during-{i}")                  # the other two elect a leader and commit
            assert leader.failure is not None and leader.failure.operation == "append"
            assert leader.status()["role"] == "failed" and not leader.is_leader()
            wait_until(lambda: leader._replica._SyncObj__raftLog.failure is not None, 1)
        assert not [r for r in caplog.records if r.getMessage() in ("a Raft tick failed", "a Raft message handler failed")
                           or "failed _onTick" in r.getMessage()], \
            "a traceback per tick or per message"

        recovery = GroupRecovery()
        recovery.take("victim", leader)                     # closed; its journal is whole on disk
        groups.remove(leader)
        index = addresses.index(leader.self_address)

        def reopen(key: str) -> RaftGroup:
            return RaftGroup("disk", addresses[index], addresses, ShardState(), str(tmp_path / f"r{index}"), None,
                             TIMING, loop=raft_loop)

        assert recovery.reopen_due(reopen) == {}            # the probe fails: not reopened, tried again later
        assert recovery.status()["disk"]["reopen-attempts"] == 1
        assert recovery.reopen_due(reopen) == {}            # not due yet (backoff): not even probed
        assert recovery.status()["disk"]["reopen-attempts"] == 1
        failing.fds.clear()
        disk.full = False                                   # space returns
        reopened = wait_until(lambda: recovery.reopen_due(reopen), 10, message="the halted replica reopened")
        groups.append(reopened["victim"])
        put(groups, "after")
        last = one_leader(groups).status()["commit-index"]
        wait_until(lambda: reopened["victim"].status()["last-applied"] >= last, 20,
                   message="the reopened replica caught up")
        assert reopened["victim"].read(lambda s: s.key_count(), time.monotonic() + 10) == 41
        assert not recovery.holds_any()
    finally:
        for g in groups:
            g.close()


def test_on_the_event_loop_a_follower_whose_journal_fails_in_a_handler_stops_reading_its_sockets(
        tmp_path, monkeypatch, caplog):
    # A follower's appends run in PySyncObj's append_entries handler, which a replica on the loop runs
    # outside its ticks (kvs.raft.loop_poller): the failure must halt it there too, be logged once
    # (by the journal), and leave no readable socket that the loop would dispatch forever.
    failing = FailingWrites(monkeypatch)
    with running_loop() as loop:
        groups = start_groups(tmp_path, 3, loop)
        try:
            put(groups, "before")
            leader = one_leader(groups)
            follower = next(g for g in groups if g is not leader)
            failing.fds.add(follower._replica._SyncObj__raftLog._fd)
            dispatches = []
            real_dispatch = follower._poller._dispatch
            monkeypatch.setattr(follower._poller, "_dispatch", lambda: dispatches.append(1) or real_dispatch())
            with caplog.at_level(logging.ERROR):
                for i in range(10):
                    put(groups, f"during-{i}")
                wait_until(lambda: follower.failure is not None, 10, message="the follower halted")
                assert follower.failure.operation == "append"
                wait_until(lambda: not follower._poller._attached, 10, message="the loop let go of its sockets")
                seen = len(dispatches)
                for i in range(10):
                    put(groups, f"after-{i}")           # the leader keeps sending to it
                assert len(dispatches) == seen, "a halted replica's sockets were dispatched"
            assert not [r for r in caplog.records if r.getMessage() == "a Raft message handler failed"]
        finally:
            for g in groups:
                g.close()


def test_a_node_closes_its_halted_groups_and_reopens_them_even_while_its_metadata_replica_is_down(
        tmp_path, monkeypatch):
    failing = FailingWrites(monkeypatch)
    disk = FullDisk(monkeypatch)
    address = f"127.0.0.1:{find_free_base_port(1)}"
    node = Node(NodeSettings.load(environ={"ADDRESS": address, "VIEW": address, "DATA_DIR": str(tmp_path)}))
    stopping = threading.Event()
    supervisor = threading.Thread(target=node.supervise, args=(stopping,), daemon=True)
    supervisor.start()
    try:
        wait_until(lambda: node.health() == (True, "ok"), 30, message="the node serves")
        node.group("1").execute(("put", "id-k", "k", "v"), time.monotonic() + 10)
        meta, shard = node.metadata_group, node.group("1")
        failing.fds.update({meta._replica._SyncObj__raftLog._fd, shard._replica._SyncObj__raftLog._fd})
        meta.propose(("init", node._initial), lambda result, error: None)      # a no-op entry, appended
        shard.propose(("put", "id-k2", "k2", "v2"), lambda result, error: None)
        wait_until(lambda: node.group("1") is None and node.metadata_group is None, 10, message="both closed")
        reason = node.health()[1]
        assert reason.startswith("group ") and " is down: its journal's append failed" in reason, reason
        groups = node.status()["groups"]
        assert groups["meta"]["role"] == groups["shard-1"]["role"] == "down", groups
        assert "No space left" in groups["shard-1"]["failure"]["error"]

        failing.fds.clear()
        disk.full = False                                   # space returns: both come back, from disk
        wait_until(lambda: node.health() == (True, "ok"), 30, message="both groups reopened")
        assert node.group("1").read(lambda s: s.read("k"), time.monotonic() + 10) == "v"
        assert set(node.status()["groups"]) == {"meta", "shard-1"}
    finally:
        stopping.set()
        node.wake()
        supervisor.join(20)
    assert not supervisor.is_alive()
