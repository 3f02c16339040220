"""The kvs image: built with docker/build-image.sh, run as one container and as a DockerDriver cluster.

Skipped when no Docker daemon answers. The first build takes about a minute; later
ones reuse Docker's layer cache and the wheelhouse (about a second; ~15 s after kvs/ changed).
"""

from __future__ import annotations

import secrets
import time

import pytest
import requests

from kvs.testing.cluster import wait_until
from tests.chaos.docker_driver import DockerDriver, docker_available, ensure_image, healthy_cluster

IMAGE = "kvs:test"

pytestmark = [pytest.mark.docker,
              pytest.mark.skipif(not docker_available(), reason="no Docker daemon reachable (docker SDK ping failed)")]


@pytest.fixture(scope="module")
def image() -> str:
    ensure_image(IMAGE)
    return IMAGE


def put(address: str, key: str, value: str, timeout: float = 7.0) -> requests.Response:
    return requests.put(f"http://{address}/kvs/keys/{key}", json={"value": value}, timeout=timeout)


def get(address: str, key: str, timeout: float = 7.0) -> requests.Response:
    return requests.get(f"http://{address}/kvs/keys/{key}", timeout=timeout)


def published(container) -> str:
    container.reload()
    return f"127.0.0.1:{container.attrs['NetworkSettings']['Ports']['13800/tcp'][0]['HostPort']}"


def health_status(container) -> str:
    container.reload()
    return container.attrs["State"].get("Health", {}).get("Status", "none")


@pytest.fixture
def single(image):
    """One container: REPL_FACTOR=1, VIEW = its own address (its hostname), data in a named volume."""
    import docker

    client = docker.from_env()
    name = f"kvs-image-test-{secrets.token_hex(3)}"
    volume = client.volumes.create(name)
    address = f"{name}:13800"          # the hostname resolves to the container's IP (/etc/hosts)
    container = client.containers.run(
        image, detach=True, name=name, hostname=name,
        environment={"ADDRESS": address, "VIEW": address, "REPL_FACTOR": "1", "KVS_SECRET": "image-test"},
        ports={"13800/tcp": ("127.0.0.1", None)}, volumes={volume.name: {"bind": "/data", "mode": "rw"}})
    try:
        yield container
    finally:
        container.remove(force=True, v=True)
        volume.remove(force=True)
        client.close()


def test_single_container_health_user_and_volume(single):
    try:
        wait_until(lambda: health_status(single) == "healthy", 60, interval=0.5, message="HEALTHCHECK healthy")
    except TimeoutError:
        pytest.fail(f"container not healthy ({health_status(single)}):\n{single.logs(tail=50).decode()}")

    exit_code, output = single.exec_run(["id", "-u"])
    assert exit_code == 0 and int(output) != 0, f"runs as uid {output!r}"

    address = published(single)
    assert put(address, "greeting", "hello").status_code == 201
    reply = get(address, "greeting")
    assert reply.status_code == 200 and reply.json()["value"] == "hello"

    single.restart(timeout=5)
    address = published(single)          # the host port may change on restart
    reply = wait_until(lambda: (r := get(address, "greeting", timeout=2)).status_code == 200 and r, 60,
                       interval=0.2, message="key readable after docker restart")
    assert reply.json()["value"] == "hello"


@pytest.fixture
def cluster(image):
    driver = DockerDriver(1, 3, image=image)
    with healthy_cluster(driver):
        yield driver
    driver.stop()                          # idempotent


def write_succeeds(address: str, key: str, value: str) -> bool:
    try:
        return put(address, key, value, timeout=3).status_code in (200, 201)
    except requests.RequestException:
        return False


def test_cluster_failover_and_isolation(cluster):
    n1, n2, n3 = cluster.nodes()
    assert put(cluster.client_address(n1), "k", "v1").status_code == 201
    reply = get(cluster.client_address(n3), "k")
    assert reply.status_code == 200 and reply.json()["value"] == "v1"

    # SIGKILL the leader of shard 1: a survivor accepts writes again within a few seconds.
    leader = wait_until(lambda: cluster.leader_of("1"), 20, message="a leader of shard 1")
    survivor = next(n for n in (n1, n2, n3) if n != leader)
    cluster.kill(leader)
    started = time.monotonic()
    wait_until(lambda: write_succeeds(cluster.client_address(survivor), "k", "v2"), 15,
               message="write after the leader was killed")
    assert time.monotonic() - started < 15

    # The killed node comes back on its volume and catches up.
    cluster.start_node(leader)
    cluster.wait_healthy([leader], timeout=60)
    wait_until(lambda: get(cluster.client_address(leader), "k", timeout=2).json().get("value") == "v2", 30,
               message="restarted node reads v2")

    # Isolate the current leader: the others elect a new one and accept writes; the isolated
    # node is still reachable from the test process (its port is on the client network).
    leader = wait_until(lambda: cluster.leader_of("1"), 20, message="a leader of shard 1")
    survivor = next(n for n in (n1, n2, n3) if n != leader)
    cluster.isolate(leader)
    try:
        wait_until(lambda: write_succeeds(cluster.client_address(survivor), "k", "v3"), 20,
                   message="write while the leader is isolated")
        status, _ = cluster.http(leader, "/kvs/status")
        assert status == 200
    finally:
        cluster.heal(leader)
    cluster.wait_healthy(timeout=60)
    wait_until(lambda: get(cluster.client_address(leader), "k", timeout=2).json().get("value") == "v3", 30,
               message="healed node reads v3")
