"""`kvs snapshot save` / `kvs snapshot restore` (issue 14): 10,000 pairs, string and binary, out of a
2 x 3 cluster and into a 3 x 1 one (another shard count), exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from kvs.client import KvsClient, data_value

pytestmark = pytest.mark.cluster


def kvs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvs", *args], capture_output=True, text=True, timeout=300)


def every_pair(node: str) -> dict:
    listed = requests.get(f"http://{node}/fetch", timeout=120).json()
    return {data_value(p["key"]): data_value(p["value"]) for p in listed}


def test_a_snapshot_of_10000_pairs_round_trips_into_a_cluster_of_another_shape(make_cluster, tmp_path):
    source = make_cluster(2, 3)
    pairs: dict = {f"bk-{i}": f"value-{i}" for i in range(9_900)}
    pairs.update({bytes([i % 256, 255, i // 256]): bytes(range(i % 256)) for i in range(100)})
    items = list(pairs.items())
    client = KvsClient(source.view[0], timeout=60)
    for start in range(0, len(items), 1000):
        status, body = client.set_many(items[start:start + 1000])
        assert status == 200 and body[0]["keys_failed"] == [], body
    file = str(tmp_path / "backup.kvs")
    saved = kvs("snapshot", "save", file, "--endpoints", f"127.0.0.1:1,{source.view[4]}")
    assert saved.returncode == 0, saved.stderr
    header = json.loads(saved.stdout)
    assert header["pairs"] == 10_000 and header["epoch"] == 1 and set(header["shards"]) == {"1", "2"}
    with open(file) as f:
        assert json.loads(f.readline()) == header and len(f.readlines()) == 10_000

    target = make_cluster(3, 1)
    restored = kvs("snapshot", "restore", file, "--node", target.view[1])
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["restored"] == 10_000
    assert every_pair(target.view[2]) == pairs == every_pair(source.view[3])
    # run again (a retried restore): nothing is written twice
    version = KvsClient(target.view[0]).get("bk-7")[1]["version"]
    assert kvs("snapshot", "restore", file, "--node", target.view[0]).returncode == 0
    assert KvsClient(target.view[0]).get("bk-7")[1]["version"] == version
    # not a snapshot: refused, nothing written
    bad = tmp_path / "bad.kvs"
    bad.write_text('{"format": "other"}\n')
    refused = kvs("snapshot", "restore", str(bad), "--node", target.view[0])
    assert refused.returncode == 1 and "not a kvs snapshot" in refused.stderr
