"""A full disk in Docker (issue 11): one replica's DATA_DIR is a small tmpfs, filled up during writes.

A 1x3 DockerDriver cluster whose third container has a tmpfs of TMPFS_SIZE on
/data (the image's DATA_DIR) instead of a volume. `dd` fills it with a filler
file, so its journal writes fail with ENOSPC (a tmpfs never fails an fsync:
write failures are what this test covers); removing the filler gives the
space back. The checks are DiskFullScenario's (tests/disk_full.py); the node
is never restarted (its tmpfs would be emptied). Skipped without a Docker
daemon; the image is built by docker/build-image.sh (KVS_TEST_IMAGE names the
tag, kvs:test by default). Everything the driver creates is removed at the end.
"""

from __future__ import annotations

import os

import pytest

from tests.chaos.docker_driver import DockerDriver, docker_available, ensure_image, healthy_cluster

from .disk_full import DiskFullScenario

IMAGE = os.environ.get("KVS_TEST_IMAGE", "kvs:test")
TMPFS_SIZE = "16m"
FILLER = "/data/filler"

pytestmark = [pytest.mark.docker,
              pytest.mark.skipif(not docker_available(), reason="no Docker daemon reachable (docker SDK ping failed)")]


@pytest.fixture
def cluster():
    ensure_image(IMAGE)
    with healthy_cluster(DockerDriver(1, 3, image=IMAGE, data_tmpfs={2: TMPFS_SIZE})) as driver:
        yield driver


def available_kib(container) -> int:
    code, output = container.exec_run(["df", "-k", "--output=avail", "/data"])
    assert code == 0, output
    return int(output.split()[-1])


def test_a_replica_whose_disk_fills_up_halts_the_others_serve_and_it_catches_up_when_space_returns(cluster):
    nodes = cluster.nodes()
    full = nodes[2]
    container = cluster.container(full)

    def take_space() -> None:
        # dd stops at ENOSPC (exit status 1): the tmpfs is then full to its last page.
        container.exec_run(["dd", "if=/dev/zero", f"of={FILLER}", "bs=64k"])
        assert available_kib(container) == 0

    def give_space_back() -> None:
        code, output = container.exec_run(["rm", "-f", FILLER])
        assert code == 0 and available_kib(container) > 0, output

    scenario = DiskFullScenario(nodes, cluster.client_address, full, take_space, give_space_back,
                                error_text="No space left on device")
    try:
        scenario.run()
    except BaseException:
        print("\n".join(f"--- {n}\n{cluster.logs(n, 60)}" for n in nodes))
        raise
    container.reload()
    assert container.status == "running" and container.attrs["RestartCount"] == 0
    logs = cluster.logs(full, None)
    assert "acknowledges nothing more" in logs and "reopened from disk" in logs
    assert "failed _onTick" not in logs, "PySyncObj logged a traceback per tick"
