"""Snapshots are written off PySyncObj's tick thread: a big shard keeps committing while it snapshots.

Before, the whole 300,000-key dump was pickled and written on the tick thread,
and the group stopped (no commits, no heartbeats) for the length of it. Now
the tick thread only captures the state; a worker thread writes it and the
journal is compacted once the new snapshot is durably in place (see
kvs/raft/storage.py).
"""

from __future__ import annotations

import glob
import os
import pickle
import statistics
import threading
import time

import pytest
from pysyncobj.config import SERIALIZER_STATE

from kvs.testing.cluster import find_free_base_port, wait_until
from kvs.raft import storage
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.fsm.shard import ShardState

KEYS = 300_000
VALUE_BYTES = 256
WRITERS = 6
RATE = 300                       # writes per second from all writers together, on a fixed schedule
SNAPSHOTS_IN_WINDOW = 2          # the window lasts until this many snapshots were renamed into place
WINDOW_LIMIT = 90.0              # seconds; the window ends earlier once the snapshots happened
WRITES_PER_WRITER = 100_000      # a bound on each writer's loop, never reached in the window
P99_FLOOR = 0.100                # seconds: the p99 limit on a quiet machine
STALL_SHARE = 0.5                # ... or this share of what pickling the whole state took in the same run
BOUNDARY = ((b"prev", 9, 1), (b"last", 10, 1), {"127.0.0.1:1"})    # (last, prev, cluster) as PySyncObj passes


def value_of(i: int) -> str:
    return f"{i:08d}".ljust(VALUE_BYTES, "v")


def preloaded_state(keys: int) -> ShardState:
    """A shard that already holds `keys` keys: loading them through the log would take minutes."""
    state = ShardState()
    state.restore({"data": {f"preloaded-{i:06d}": value_of(i) for i in range(keys)}, "dedup": []})
    return state


def file_identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def temporary_files(directory: str) -> list[str]:
    return glob.glob(os.path.join(directory, "*" + storage.TEMP_SUFFIX))


def test_a_300000_key_shard_keeps_answering_writes_while_it_snapshots(tmp_path):
    address = f"127.0.0.1:{find_free_base_port(1)}"
    directory = str(tmp_path / "group")
    _, snapshot = storage.group_files(directory)
    timing = RaftTiming(compaction_entries=1000, compaction_seconds=10**9)
    group = RaftGroup("pause", address, [address], preloaded_state(KEYS), directory, None, timing)
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(WRITERS)]
    errors: list[BaseException] = []

    def write(n: int, began: float) -> None:
        # Open loop: write i of this writer is due at a fixed time, and its latency counts from then. A
        # writer blocked by a stalled group would otherwise just not send the writes it owed meanwhile,
        # and a one-second stall would weigh one sample per writer in the percentiles.
        interval = WRITERS / RATE
        due = began + n * interval / WRITERS
        for i in range(WRITES_PER_WRITER):
            if stop.wait(max(0.0, due - time.monotonic())):     # pacing the load; stop ends it at once
                return
            try:
                group.execute(("put", f"w{n}-{i}", f"written-{n}-{i}", value_of(i)), time.monotonic() + 10)
            except BaseException as exc:        # noqa: BLE001 - reported by the assertion below
                errors.append(exc)
                return
            latencies[n].append(time.monotonic() - due)
            due += interval

    writers: list[threading.Thread] = []
    try:
        wait_until(group.is_leader, 10, message="single replica leads")
        group.execute(("put", "warm-up", "warm-up", "x"), time.monotonic() + 10)
        seen = [file_identity(snapshot)]

        def snapshots_taken() -> bool:
            identity = file_identity(snapshot)
            if identity is not None and identity != seen[-1]:
                seen.append(identity)
            return len(seen) - 1 >= SNAPSHOTS_IN_WINDOW or bool(errors)

        pickle_before = whole_pickle_seconds(KEYS)      # the machine's speed around the window: before ...
        window_began = time.monotonic()
        writers.extend(threading.Thread(target=write, args=(n, window_began), daemon=True) for n in range(WRITERS))
        for t in writers:
            t.start()
        wait_until(snapshots_taken, WINDOW_LIMIT, interval=0.02, message=f"{SNAPSHOTS_IN_WINDOW} snapshots")
        window = time.monotonic() - window_began
    finally:
        stop.set()
        for t in writers:
            t.join(15)
        group.close()

    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in writers)
    samples = sorted(x for per_writer in latencies for x in per_writer)
    p99 = statistics.quantiles(samples, n=100)[98]
    print(f"\n{len(samples)} writes in {window:.1f} s with {len(seen) - 1} snapshots of {KEYS} keys: "
          f"p50 {statistics.median(samples) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {samples[-1] * 1000:.1f} ms")
    assert len(seen) - 1 >= SNAPSHOTS_IN_WINDOW
    # A snapshot written on the tick thread stalls every write for at least the time it takes to pickle
    # the state, which the writes' p99 then shows. That time is measured here, on the same machine in
    # the same minute, before and after the window (the slower of the two: a machine that got quieter
    # after the window must not lower the limit below what the window saw), so a busy machine raises the
    # limit as much as it slows the group, and the old behaviour still fails: its p99 is about the whole
    # pickling time, above half of it.
    limit = max(P99_FLOOR, STALL_SHARE * max(pickle_before, whole_pickle_seconds(KEYS)))
    assert p99 < limit, f"p99 write latency {p99 * 1000:.0f} ms while snapshotting (limit {limit * 1000:.0f} ms)"


def whole_pickle_seconds(keys: int) -> float:
    """How long one pickling of the whole state takes right now (the least of two tries)."""
    capture = preloaded_state(keys).snapshot()
    tries = []
    for _ in range(2):
        began = time.monotonic()
        pickle.dumps(capture, protocol=pickle.HIGHEST_PROTOCOL)
        tries.append(time.monotonic() - began)
    return min(tries)


# -- the codec on its own -------------------------------------------------------------------------

def outcome(serializer: storage.BackgroundSerializer):
    """(status, id) once the snapshot in progress finished, None while it runs."""
    status, ident = serializer.checkSerializing()
    return None if status == SERIALIZER_STATE.SERIALIZING else (status, ident)


def codec_and_serializer(state: ShardState, path: str) -> tuple[storage.SnapshotCodec, storage.BackgroundSerializer]:
    codec = storage.SnapshotCodec(state, path, detached=True)
    serializer = storage.BackgroundSerializer(path, 2**16, False, codec.serialize, codec.deserialize, codec.check)
    return codec, serializer


def snapshot_once(serializer: storage.BackgroundSerializer, ident: int) -> tuple:
    serializer.serialize((None,) + BOUNDARY, ident)
    return wait_until(lambda: outcome(serializer), 30, interval=0.01, message="snapshot finished")


class Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("this value cannot be pickled")


def fail_fsync(fd: int) -> None:
    raise OSError(5, "Input/output error (injected)")


@pytest.mark.parametrize("failure", ["an unpicklable value", "a failing fsync"])
def test_a_failing_background_write_reports_failed_and_leaves_the_previous_snapshot_intact(
        tmp_path, monkeypatch, failure):
    path = str(tmp_path / "snapshot")
    state = ShardState()
    state.restore({"data": {f"k{i}": value_of(i) for i in range(5000)}, "dedup": []})
    codec, serializer = codec_and_serializer(state, path)
    assert snapshot_once(serializer, 9) == (SERIALIZER_STATE.SUCCESS, 9)
    with open(path, "rb") as f:
        previous = f.read()

    state.apply(("put", "r1", "k1", "changed"))
    if failure == "an unpicklable value":
        state._data["k2"] = Unpicklable()
    else:
        monkeypatch.setattr(storage.os, "fsync", fail_fsync)
    assert snapshot_once(serializer, 10) == (SERIALIZER_STATE.FAILED, 10)
    monkeypatch.undo()

    with open(path, "rb") as f:
        assert f.read() == previous
    assert temporary_files(str(tmp_path)) == []
    assert (codec.snapshots_written, codec.snapshots_failed) == (1, 1)
    restored = ShardState()
    storage.SnapshotCodec(restored, path).deserialize(path)
    assert restored.get("k1") == value_of(1) and restored.key_count() == 5000


def test_closing_the_codec_mid_write_stops_the_writer_and_renames_nothing(tmp_path):
    path = str(tmp_path / "snapshot")
    codec, serializer = codec_and_serializer(preloaded_state(100_000), path)
    serializer.serialize((None,) + BOUNDARY, 10)
    codec.close(timeout=10)
    assert not os.path.exists(path)
    assert temporary_files(str(tmp_path)) == []
    assert not any(t.name.startswith("snapshot-writer:") and path in t.name for t in threading.enumerate())


def test_the_next_open_removes_a_file_a_killed_writer_left_behind(tmp_path):
    path = str(tmp_path / "snapshot")
    left = str(tmp_path / ("snapshot.k1ll3d" + storage.TEMP_SUFFIX))
    with open(left, "wb") as f:
        f.write(b"half a snapshot")
    storage.SnapshotCodec(ShardState(), path)
    assert not os.path.exists(left)


def test_a_snapshot_in_the_first_format_is_still_read(tmp_path):
    path = str(tmp_path / "snapshot")
    last, prev, cluster = BOUNDARY
    with open(path, "wb") as f:
        pickle.dump({"format": 1, "last": last, "prev": prev, "cluster": cluster}, f)
        pickle.dump({"data": {"a": "1"}, "dedup": [("r", (("put", "a", "1"), "a", None))]}, f)
    state = ShardState()
    assert storage.SnapshotCodec(state, path).deserialize(path) == BOUNDARY
    assert state.get("a") == "1"
    assert storage.read_snapshot_boundary(path) == (prev, last)


def test_a_sliced_snapshot_restores_the_same_state(tmp_path):
    path = str(tmp_path / "snapshot")
    state = ShardState()
    state.restore({"data": {f"k{i}": value_of(i) for i in range(4501)}, "dedup": []})
    for i in range(10):
        state.apply(("put", f"r{i}", f"k{i}", f"new-{i}"))
    _, serializer = codec_and_serializer(state, path)
    assert snapshot_once(serializer, 10) == (SERIALIZER_STATE.SUCCESS, 10)
    with open(path, "rb") as f:
        assert pickle.load(f)["format"] == storage.SNAPSHOT_FORMAT_SLICED
    restored = ShardState()
    storage.SnapshotCodec(restored, path).deserialize(path)
    assert restored.snapshot() == state.snapshot()
    assert restored.digest() == state.digest()


# -- a real group, restarted ------------------------------------------------------------------------

def test_a_group_restarted_after_a_background_snapshot_recovers_every_acknowledged_write(tmp_path):
    address = f"127.0.0.1:{find_free_base_port(1)}"
    directory = str(tmp_path / "group")
    journal, snapshot = storage.group_files(directory)
    timing = RaftTiming(compaction_entries=40, compaction_seconds=10**9)
    acknowledged: dict[str, str] = {}

    group = RaftGroup("restart", address, [address], ShardState(), directory, None, timing)
    try:
        wait_until(group.is_leader, 10, message="single replica leads")
        for i in range(300):
            key, value = f"k{i}", value_of(i)
            group.execute(("put", f"id-{i}", key, value), time.monotonic() + 10)
            acknowledged[key] = value
        wait_until(lambda: group._codec.snapshots_written >= 2, 30, message="background snapshots in place")
        for i in range(300, 320):       # after the last snapshot: only in the journal
            key, value = f"k{i}", value_of(i)
            group.execute(("put", f"id-{i}", key, value), time.monotonic() + 10)
            acknowledged[key] = value
        assert group.status()["log-length"] < 300, "the journal was compacted"
    finally:
        group.close()
    with open(snapshot, "rb") as f:
        assert pickle.load(f)["format"] == storage.SNAPSHOT_FORMAT_SLICED

    restarted = RaftGroup("restart", address, [address], ShardState(), directory, None, timing)
    try:
        wait_until(restarted.is_leader, 10, message="restarted replica leads")
        recovered = restarted.read(lambda s: {k: s.get(k) for k in acknowledged}, time.monotonic() + 10)
        count = restarted.read(lambda s: s.key_count(), time.monotonic() + 10)
    finally:
        restarted.close()
    assert recovered == acknowledged
    assert count == len(acknowledged)
