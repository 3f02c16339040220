"""SIGKILL every replica of a group during writes, restart them, ten rounds: no acknowledged write is lost.

Snapshots are forced to happen often (KVS_COMPACTION_ENTRIES=100), because the
write-losing bug of stock PySyncObj lives between a snapshot and the journal
compaction that follows it (see tests/test_storage.py).
"""

from __future__ import annotations

import threading
import time

import pytest

from kvs.client import KvsClient
from kvs.testing.cluster import wait_until

from .conftest import keys_of_shard

pytestmark = pytest.mark.cluster

ROUNDS = 10
WRITERS = 4
WRITE_SECONDS = 1.5


def write_until(stop: threading.Event, address: str, keys: list[str], acked: dict[str, str], lock: threading.Lock):
    client = KvsClient(address, timeout=7)
    for key in keys:
        if stop.is_set():
            return
        value = f"value-of-{key}"
        try:
            status, _ = client.put(key, value)
        except Exception:
            continue                    # unknown outcome: not acknowledged
        if status in (200, 201):
            with lock:
                acked[key] = value


def test_killing_a_whole_group_during_writes_loses_no_acknowledged_write(make_cluster):
    cluster = make_cluster(2, 3, KVS_COMPACTION_ENTRIES="100")
    group = cluster.replicas_of("1")
    keys = keys_of_shard(cluster, "1", ROUNDS * WRITERS * 400, prefix="durable")
    acked: dict[str, str] = {}
    lock = threading.Lock()
    per_writer = 400
    for round_no in range(ROUNDS):
        stop = threading.Event()
        writers = []
        for w in range(WRITERS):
            start = (round_no * WRITERS + w) * per_writer
            target = group[w % len(group)] if w % 2 == 0 else cluster.replicas_of("2")[w % 3]
            t = threading.Thread(target=write_until, args=(stop, target, keys[start:start + per_writer], acked, lock))
            t.start()
            writers.append(t)
        before = len(acked)
        wait_until(lambda: len(acked) >= before + 50, 20, message="writes flowing")
        time.sleep(WRITE_SECONDS * (0.5 + (round_no % 3) / 3))    # vary the kill instant across rounds
        for address in group:
            cluster.kill(address)
        stop.set()
        for t in writers:
            t.join(15)
        for address in group:
            cluster.start_node(address)
        cluster.wait_healthy(group, timeout=60)

    assert len(acked) > ROUNDS * 100
    reader = KvsClient(group[0], timeout=10)
    missing = [k for k, v in acked.items() if reader.get(k)[1].get("value") != v]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes lost, e.g. {missing[:5]}"
    counts = {a: KvsClient(a).key_count()[1]["key-count"] for a in group}
    assert len(set(counts.values())) == 1 and min(counts.values()) >= len(acked), counts
