"""Concurrent clients for 30 s on a live cluster, a leader SIGKILLed in the middle: the history is linearizable."""

from __future__ import annotations

import json
import threading

import pytest

from kvs.testing.linearizability import check_history, history_to_json
from kvs.testing.workload import WorkloadSpec, run_workload, summarize

from .conftest import keys_of_shard

pytestmark = pytest.mark.cluster

DURATION = 30.0


def test_history_with_a_leader_kill_is_linearizable(make_cluster, tmp_path):
    cluster = make_cluster(2, 3)
    keys = keys_of_shard(cluster, "1", 6, prefix="lin") + keys_of_shard(cluster, "2", 6, prefix="lin")
    spec = WorkloadSpec(addresses=tuple(cluster.view), keys=tuple(keys), clients=8, duration=DURATION, seed=42)
    killed: list[str] = []

    def kill_leader_mid_run() -> None:
        leader = cluster.leader_of("1")
        killed.append(leader)
        cluster.kill(leader)

    timer = threading.Timer(DURATION / 2, kill_leader_mid_run)
    timer.start()
    history = run_workload(spec)
    timer.join()

    counts = summarize(history)
    result = check_history(history)
    if not result.ok:
        path = tmp_path / "history.json"
        path.write_text(json.dumps(history_to_json(history)))
        pytest.fail(f"{result.summary()}; history saved to {path}; "
                    + "; ".join(k.explanation for k in result.failures()[:3]))
    print(f"{counts} ; killed {killed} ; {result.summary()}")
    assert killed and killed[0] is not None
    assert counts["ok"] > 1000, counts
    # reads of keys whose shard kept its leader must have kept flowing: a leader kill is not an outage
    ok_after_kill = [op for op in history if op.outcome == "ok" and op.call > history[0].call + DURATION / 2 + 3]
    assert len(ok_after_kill) > 100
