"""Chaos runs: faults injected into a live cluster while clients record a history and the view changes.

Every run starts 2 shards x 3 replicas plus 4 idle spare nodes, and its view-change
lane takes three steps while the fault schedule goes on: a change in the middle of
the run growing the view to 3 x 3 (3 spares as shard 3), then a dead replica of
shard 3 replaced by the fourth spare (SIGKILL, remove-member, add-member: the shard
keeps its id), then a change back to 2 x 3 whose coordinator is SIGKILLed while it
runs (rolled back or finished by another node). Each step toggles from the view the
cluster runs then (a rolled-back step is tried the other way by the next). (When
faults stall a step for long, the next may come after the clients stopped.)

The process backend is the fast loop for developers; the Docker backend
(marker `docker`, skipped where Docker is unavailable) is what CI runs. Length and seed come from the environment
so that the same test is the short CI run and the long soak:

    KVS_CHAOS_RUNS=100 KVS_CHAOS_SECONDS=60 python -m pytest -q -m chaos tests/chaos -k docker

KVS_CHAOS_IMAGE names the image the Docker runs build and use (default kvs:test).
"""

from __future__ import annotations

import os

import pytest

from .docker_driver import DockerDriver, docker_available, ensure_image
from .driver import ProcessDriver, iptables_usable
from .runner import ChaosRun
from .view_changes import MODES, dead_replica_replaced

pytestmark = pytest.mark.chaos

RUNS = int(os.environ.get("KVS_CHAOS_RUNS", "1"))
SECONDS = float(os.environ.get("KVS_CHAOS_SECONDS", "40"))
FIRST_SEED = int(os.environ.get("KVS_CHAOS_SEED", "1"))
IMAGE = os.environ.get("KVS_CHAOS_IMAGE", "kvs:test")
SHARDS, REPLICAS, SPARES = 2, 3, 4          # 3 spares grow the view by a shard, 1 replaces a replica


def run_and_check(driver, backend: str, seed: int, tmp_path) -> None:
    driver.start()
    try:
        driver.wait_healthy(timeout=90)
        report = ChaosRun(driver, backend, seed, duration=SECONDS, view_changes=MODES,
                          artifacts_dir=str(tmp_path)).run()
        if report.violations:
            save_logs(driver, tmp_path / "logs")
    finally:
        driver.stop()
    print(report.summary())
    assert report.faults, "no fault was injected"
    assert report.ops_ok > 100, report.summary()
    assert not report.violations, report.summary() + "\n" + "\n".join(report.violations[:20])
    assert any(c["mode"] == "change" and c["during_clients"] for c in report.view_changes), \
        "no view change while the clients ran\n" + report.summary()
    assert any(c["killed_in_phase"] for c in report.view_changes), \
        "no coordinator was killed while its change ran\n" + report.summary()
    assert dead_replica_replaced(report.view_changes), "no dead replica was replaced\n" + report.summary()


def save_logs(driver, directory) -> None:
    """Every node's whole log, beside the run's artifacts (containers and their logs go at stop)."""
    directory.mkdir(parents=True, exist_ok=True)
    for node in driver.all_nodes():
        (directory / f"{node.replace(':', '_')}.log").write_text(driver.logs(node, lines=None))


@pytest.mark.skipif(not iptables_usable(), reason="iptables is not usable here (needed to isolate nodes)")
@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + RUNS))
def test_chaos_process_backend(seed, tmp_path):
    run_and_check(ProcessDriver(SHARDS, REPLICAS, str(tmp_path / "cluster"), spares=SPARES), "process", seed, tmp_path)


@pytest.mark.docker
@pytest.mark.skipif(not docker_available(), reason="no usable Docker engine")
@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + RUNS))
def test_chaos_docker_backend(seed, tmp_path):
    ensure_image(IMAGE)
    run_and_check(DockerDriver(SHARDS, REPLICAS, image=IMAGE, spares=SPARES), "docker", seed, tmp_path)
