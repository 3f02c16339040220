"""DockerDriver: a kvs cluster as one container per node, on networks the driver creates.

Every node container is attached to two bridge networks:

- the *cluster* network (a /24 subnet picked not to overlap any Docker network or host
  route), where node i has the fixed IP .(i+2); the node's ADDRESS and the VIEW use these
  IPs, so all Raft and forwarding traffic runs here. `isolate` disconnects a node from it,
  `heal` reconnects it with the same IP.
- the *client* network (Docker picks its subnet; inter-container traffic disabled), which
  only carries the port 13800 published on 127.0.0.1 with a random host port. Because the
  published port lives on this network, the test process still reaches an isolated node,
  as with the process backend. Docker re-assigns the host port whenever the container
  starts or its networks change, so the driver looks it up again after each of those.

Spare nodes (`spares=k`) are containers like the others, with the next IPs, started with
the same VIEW, which does not contain them: they stay idle until a view change names them.

Each node keeps its data in a named volume on /data, so kill + start_node keeps it; or, for
the nodes given in `data_tmpfs` (node index -> size, e.g. {2: "16m"}), in a tmpfs of that
size, which a test can fill up (a full disk) and which a restart of the container empties.
Everything the driver creates carries the label `kvs.chaos=<run name>`; `stop` removes
what carries it, so it is safe after a partial start and when called twice.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import subprocess
from pathlib import Path

from .driver import SECRET, ClusterDriver

HTTP_PORT = 13800
UNREACHABLE_PORT = 9          # "discard": nothing listens there
IMAGE_UID = 10001             # the image's kvs user (Dockerfile): owner of a tmpfs /data
LABEL = "kvs.chaos"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "docker" / "build-image.sh"


def _client():
    import docker

    return docker.from_env(timeout=60)


def docker_available() -> bool:
    """True if the docker SDK is installed and the daemon answers."""
    try:
        client = _client()
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def ensure_image(tag: str = "kvs:test") -> None:
    """Build `tag` with docker/build-image.sh (cached: about a second when nothing changed)."""
    result = subprocess.run([str(BUILD_SCRIPT), tag], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} {tag} failed (exit {result.returncode}):\n"
                           f"{result.stdout[-2000:]}{result.stderr[-4000:]}")


def _used_networks(client) -> list:
    """Subnets of every Docker network and every IPv4 route of this host."""
    used = []
    for net in client.networks.list():
        for pool in (net.attrs.get("IPAM") or {}).get("Config") or []:
            try:
                used.append(ipaddress.ip_network(pool.get("Subnet", ""), strict=False))
            except ValueError:
                pass
    try:
        with open("/proc/net/route") as routes:
            for line in list(routes)[1:]:
                fields = line.split()
                dest, mask = (ipaddress.IPv4Address(int(f, 16).to_bytes(4, "little")) for f in (fields[1], fields[7]))
                if int(mask):
                    used.append(ipaddress.ip_network(f"{dest}/{mask}", strict=False))
    except (OSError, ValueError, IndexError):
        pass
    return used


def _free_subnet(client) -> ipaddress.IPv4Network:
    used = [n for n in _used_networks(client) if n.version == 4]
    for _ in range(200):
        candidate = ipaddress.ip_network(f"10.{random.randint(128, 254)}.{random.randint(0, 255)}.0/24")
        if not any(candidate.overlaps(n) for n in used):
            return candidate
    raise RuntimeError("no free /24 in 10.128.0.0/9 for the cluster network")


class DockerDriver(ClusterDriver):
    """`shards` x `replicas` kvs containers of `image`, plus `spares` idle ones; `env` goes to every container."""

    def __init__(self, shards: int, replicas: int, image: str = "kvs:test", spares: int = 0,
                 data_tmpfs: dict[int, str] | None = None, **env: str):
        self.shards, self.replicas = shards, replicas
        self.image = image
        self.data_tmpfs = dict(data_tmpfs or {})              # node index (0-based) -> tmpfs size
        self.env = {k: str(v) for k, v in env.items()}
        self.name = f"kvs-chaos-{os.getpid()}-{secrets.token_hex(3)}"
        self._docker = _client()
        self._subnet = _free_subnet(self._docker)
        hosts = list(self._subnet.hosts())                    # .1 is the bridge gateway
        count = shards * replicas
        self._ips = [str(hosts[i + 1]) for i in range(count + spares)]
        addresses = [f"{ip}:{HTTP_PORT}" for ip in self._ips]
        self._view, self._spares = addresses[:count], addresses[count:]
        self._containers: dict[str, object] = {}              # node -> docker Container
        self._ports: dict[str, str] = {}                      # node -> "127.0.0.1:port" (cache)
        self._cluster_net = None
        self._client_net = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        import docker

        labels = {LABEL: self.name}
        try:
            self._cluster_net = self._docker.networks.create(
                self.name, driver="bridge", labels=labels,
                ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(self._subnet))]))
        except docker.errors.APIError as exc:
            raise RuntimeError(f"cannot create network {self.name} on {self._subnet}: {exc}") from exc
        self._client_net = self._docker.networks.create(
            f"{self.name}-clients", driver="bridge", labels=labels,
            options={"com.docker.network.bridge.enable_icc": "false"})
        api = self._docker.api
        for i, (node, ip) in enumerate(zip(self.all_nodes(), self._ips), start=1):
            environment = {**self.env, "ADDRESS": node, "VIEW": ",".join(self._view),
                           "REPL_FACTOR": str(self.replicas), "KVS_SECRET": SECRET}
            if i - 1 in self.data_tmpfs:
                data = {"tmpfs": {"/data": f"size={self.data_tmpfs[i - 1]},uid={IMAGE_UID}"}}
            else:
                volume = self._docker.volumes.create(f"{self.name}-n{i}", labels=labels)
                data = {"binds": {volume.name: {"bind": "/data", "mode": "rw"}}}
            host_config = api.create_host_config(
                port_bindings={HTTP_PORT: ("127.0.0.1",)},      # random free host port
                **data)
            # Created on the client network (which then carries the published port),
            # then joined to the cluster network with its fixed IP.
            created = api.create_container(
                self.image, name=f"{self.name}-n{i}", hostname=f"n{i}", environment=environment,
                labels=labels, ports=[HTTP_PORT], host_config=host_config,
                networking_config=api.create_networking_config(
                    {self._client_net.name: api.create_endpoint_config()}))
            self._cluster_net.connect(created["Id"], ipv4_address=ip)
            container = self._docker.containers.get(created["Id"])
            self._containers[node] = container
            container.start()

    def stop(self) -> None:
        """Remove every container, volume and network of this run (by label); idempotent."""
        import docker

        selector = {"label": f"{LABEL}={self.name}"}
        errors: list[Exception] = []

        def remove_all(objects, remove) -> None:
            for obj in objects:
                try:
                    remove(obj)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as exc:
                    errors.append(exc)

        remove_all(self._docker.containers.list(all=True, filters=selector), lambda c: c.remove(force=True, v=True))
        remove_all(self._docker.volumes.list(filters=selector), lambda v: v.remove(force=True))
        remove_all(self._docker.networks.list(filters=selector), lambda n: n.remove())
        self._containers.clear()
        self._ports.clear()
        if errors:
            raise RuntimeError(f"stopping {self.name}: {errors}")

    # -- nodes ---------------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        return list(self._view)

    def spare_nodes(self) -> list[str]:
        return list(self._spares)

    def container(self, node: str):
        try:
            return self._containers[node]
        except KeyError:
            raise KeyError(f"no container for node {node} (started? nodes: {self.all_nodes()})") from None

    def client_address(self, node: str) -> str:
        address = self._ports.get(node)
        if address is None:
            container = self.container(node)
            container.reload()
            bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{HTTP_PORT}/tcp")
            if not bindings:
                # Not running (killed): an address that refuses connections, so callers see
                # the same requests.ConnectionError as for a dead process.
                return f"127.0.0.1:{UNREACHABLE_PORT}"
            address = f"127.0.0.1:{bindings[0]['HostPort']}"
            if container.status in ("running", "paused"):
                self._ports[node] = address
        return address

    # -- faults --------------------------------------------------------------------------------

    def kill(self, node: str) -> None:
        self._ports.pop(node, None)
        self.container(node).kill(signal="SIGKILL")

    def start_node(self, node: str) -> None:
        self._ports.pop(node, None)
        self.container(node).start()

    def pause(self, node: str) -> None:
        self.container(node).pause()

    def resume(self, node: str) -> None:
        self.container(node).unpause()

    def isolate(self, node: str) -> None:
        self._ports.pop(node, None)                 # Docker re-publishes the port on network changes
        self._cluster_net.disconnect(self.container(node))
        self._ports.pop(node, None)

    def heal(self, node: str) -> None:
        self._ports.pop(node, None)
        self._cluster_net.connect(self.container(node), ipv4_address=node.split(":")[0])
        self._ports.pop(node, None)

    def logs(self, node: str, lines: int | None = 200) -> str:
        return self.container(node).logs(tail=lines if lines is not None else "all").decode("utf-8", "replace")


@contextlib.contextmanager
def healthy_cluster(driver: DockerDriver, timeout: float = 90):
    """Start `driver`'s cluster for a test, fail the test (with the nodes' last log lines) if it does not
    become healthy within `timeout`, and stop it whatever happens."""
    import pytest                   # only the tests use this; the chaos soak script imports the module too

    try:
        driver.start()
        try:
            driver.wait_healthy(timeout=timeout)
        except TimeoutError:
            pytest.fail("cluster not healthy:\n" + "\n".join(f"--- {n}\n{driver.logs(n)[-3000:]}"
                                                               for n in driver.nodes()))
        yield driver
    finally:
        driver.stop()
