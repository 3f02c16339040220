"""A node's lifecycle: it stops cleanly on SIGTERM, its supervisor survives its own errors and
/health says so, and a damaged file of its own never makes it crash in a loop.
"""

from __future__ import annotations

import json
import os
import signal
import threading

from kvs.node import Node
from kvs.settings import NodeSettings
from kvs.testing.cluster import wait_until

from .conftest import start_cluster


def test_a_node_stops_on_sigterm_joins_its_threads_and_exits_0(tmp_path):
    cluster = start_cluster(str(tmp_path), 1, 1)
    try:
        address = cluster.view[0]
        process = cluster.nodes[address].process
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert f"{address} stopped" in cluster.log_tail(address, 10)
    finally:
        cluster.stop()


def test_the_supervisor_survives_a_failing_round_and_health_reports_it(tmp_path):
    # An idle node (not in its VIEW): the supervisor runs, but starts no Raft replica.
    settings = NodeSettings.load(environ={"ADDRESS": "127.0.0.1:1", "VIEW": "127.0.0.1:2",
                                          "DATA_DIR": str(tmp_path)})
    node = Node(settings)
    failing = threading.Event()
    failing.set()
    real_round = node._supervise_once

    def round_that_may_fail() -> None:
        if failing.is_set():
            raise KeyError("view")
        real_round()

    node._supervise_once = round_that_may_fail
    stopping = threading.Event()
    supervisor = threading.Thread(target=node.supervise, args=(stopping,), daemon=True)
    supervisor.start()
    try:
        wait_until(lambda: "supervisor is failing: KeyError" in node.health()[1], 10, message="failure reported")
        assert node.health()[0] is False
        failing.clear()
        node.wake()
        wait_until(lambda: node.health()[1].startswith("idle"), 10, message="the next round succeeds")
    finally:
        stopping.set()
        node.wake()
        supervisor.join(10)
    assert not supervisor.is_alive()
    assert node.health() == (False, "the supervisor is not running: this node adopts no new configuration")


def test_a_damaged_epochs_file_is_set_aside_and_the_node_serves(tmp_path):
    cluster = start_cluster(str(tmp_path), 1, 1)
    try:
        address = cluster.view[0]
        data_dir = cluster.nodes[address].data_dir
        cluster.kill(address)
        with open(os.path.join(data_dir, "epochs.json"), "w") as f:
            json.dump({"active": {"number": 99}}, f)          # no view, no shards: not an epoch
        cluster.start_node(address)
        cluster.wait_healthy([address], timeout=60)
        assert os.path.exists(os.path.join(data_dir, "epochs.json.bad"))
        assert cluster.http(address, "/kvs/shards")[1]["shards"] == ["1"]
    finally:
        cluster.stop()
