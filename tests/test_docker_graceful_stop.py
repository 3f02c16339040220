"""`docker stop` of a shard's leader (issue 14): the node hands its leadership over on SIGTERM and exits
0; clients using `kvs.Client` see no failed request (its retries stay within the library). Skipped
without a Docker daemon; the image is built by docker/build-image.sh (KVS_TEST_IMAGE, kvs:test)."""

from __future__ import annotations

import os
import threading

import pytest

from kvs import Client, KvsError
from kvs.testing.cluster import wait_until
from tests.chaos.docker_driver import DockerDriver, docker_available, ensure_image, healthy_cluster

IMAGE = os.environ.get("KVS_TEST_IMAGE", "kvs:test")

pytestmark = [pytest.mark.docker,
              pytest.mark.skipif(not docker_available(), reason="no Docker daemon reachable (docker SDK ping failed)")]


def test_docker_stop_of_a_leader_costs_kvs_client_users_no_failed_request():
    ensure_image(IMAGE)
    with healthy_cluster(DockerDriver(1, 3, image=IMAGE)) as driver:
        leader = wait_until(lambda: driver.leader_of("1"), 60, message="a leader")
        others = [n for n in driver.nodes() if n != leader]
        done: list[int] = []
        failures: list[str] = []
        stop = threading.Event()

        def writer(w: int) -> None:
            kv = Client([driver.client_address(n) for n in others], timeout=15)
            for i in range(100_000):
                if stop.is_set():
                    return
                try:
                    kv.put(f"ds-{w}-{i}", "v")
                    done.append(i)
                except KvsError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(done) >= 50, 60, message="clients writing")
            container = driver.container(leader)
            container.stop(timeout=30)                      # SIGTERM, then SIGKILL after 30 s
            container.reload()
            assert container.attrs["State"]["ExitCode"] == 0, driver.logs(leader)[-3000:]
            assert "handed leadership of" in driver.logs(leader, None)
            served = len(done)
            wait_until(lambda: len(done) >= served + 50, 60, message="writes after the stop")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert failures == []
