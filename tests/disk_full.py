"""DiskFullScenario: one replica's disk fills up during writes, then space returns (issue 11).

Shared by the process test (tests/test_disk_full.py: a file-size limit on one
node's process) and the Docker test (tests/test_docker_disk_full.py: a small
tmpfs as one container's DATA_DIR, filled up). The backend supplies how to
reach a node and how to take the space away and give it back; the scenario
checks the promises of issue 11:

1. while the disk is full, the node reports its halted replica in /health and
   /kvs/status, the replica stays down (its disk probes fail), and writes keep
   succeeding through every node, the full one included (the group serves
   with the other replicas);
2. once space returns, the replica comes back on its own (no restart) and
   catches up: the three replicas hold the same keys (same digest);
3. every acknowledged write is readable through every node.

Every wait has a deadline and every loop a bound.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import requests

from kvs.client import KvsClient
from kvs.testing.cluster import wait_until

SHARD = "1"
VALUE = "v" * 200
MAX_WRITES_UNTIL_DOWN = 5000        # bound on the writes it takes for the disk to refuse the journal
DOWN_TIMEOUT = 120.0
CATCH_UP_TIMEOUT = 120.0


class DiskFullScenario:
    def __init__(self, nodes: list[str], client_address: Callable[[str], str], full: str,
                 take_space: Callable[[], None], give_space_back: Callable[[], None], error_text: str):
        self.nodes = nodes
        self.full = full
        self.error_text = error_text            # in the reported failure, e.g. "No space left on device"
        self._address = client_address
        self._take_space, self._give_space_back = take_space, give_space_back
        self._keys = (f"disk-{i}" for i in itertools.count())
        self._targets = itertools.cycle(nodes)
        self.acked: dict[str, str] = {}
        self.unacked = 0

    def client(self, node: str, timeout: float = 10.0) -> KvsClient:
        return KvsClient(self._address(node), timeout=timeout)

    # -- the scenario ----------------------------------------------------------------------------

    def run(self) -> None:
        self.write(30, must_succeed=True)
        self._take_space()
        writes = 0

        def reported_down() -> dict | None:
            nonlocal writes
            assert writes < MAX_WRITES_UNTIL_DOWN, "the full disk never failed the journal"
            self.write(5)                       # one of them may meet the halting replica: outcome unknown
            writes += 5
            group = self.group_status(self.full)
            return group if group and group["role"] in ("down", "failed") else None

        group = wait_until(reported_down, DOWN_TIMEOUT, interval=0.01, message=f"{self.full} reports shard "
                           f"{SHARD}'s replica down")
        assert self.error_text in group["failure"]["error"], group
        reason = self.down_reason()             # /health names one halted group (the metadata one may be too)
        assert reason is not None and self.error_text in reason, reason

        # The group serves with the other two, and the full node forwards to them, while the replica stays
        # down: its disk probes fail (at least two attempts, the second after a backoff).
        deadline = time.monotonic() + DOWN_TIMEOUT
        while True:
            self.write(20, must_succeed=True)
            group = self.group_status(self.full)
            assert group and group["role"] in ("down", "failed"), f"back although its disk is full: {group}"
            if group.get("reopen-attempts", 0) >= 2:
                break
            assert time.monotonic() < deadline, f"no second disk probe within {DOWN_TIMEOUT} s: {group}"

        self._give_space_back()
        wait_until(self.converged, CATCH_UP_TIMEOUT, interval=0.5, message="the replica back and caught up")
        wait_until(lambda: self.client(self.full, 3).health()[0] == 200, 60, interval=0.5,
                   message=f"{self.full} healthy again")
        self.write(10, must_succeed=True)
        self.check_every_acked_write_everywhere()

    # -- steps -----------------------------------------------------------------------------------

    def write(self, count: int, must_succeed: bool = False) -> None:
        for _ in range(count):
            key, node = next(self._keys), next(self._targets)
            try:
                status, body = self.client(node).put(key, VALUE)
            except requests.RequestException as exc:
                status, body = None, {"error": repr(exc)}
            if status in (200, 201):
                self.acked[key] = VALUE
            else:
                assert not must_succeed, f"PUT {key} through {node}: {status} {body}"
                self.unacked += 1

    def down_reason(self) -> str | None:
        try:
            status, body = self.client(self.full, 3).health()
        except requests.RequestException:
            return None
        reason = body.get("reason", "")
        return reason if status == 503 and " is down" in reason else None

    def group_status(self, node: str, digest: bool = False) -> dict | None:
        path = "/kvs/status?digest=1" if digest else "/kvs/status"
        try:
            body = requests.get(f"http://{self._address(node)}{path}", timeout=5).json()
        except (requests.RequestException, ValueError):
            return None
        return body.get("groups", {}).get(f"shard-{SHARD}")

    def converged(self) -> bool:
        groups = [self.group_status(node, digest=True) for node in self.nodes]
        if not all(g and "digest" in g for g in groups):
            return False
        return len({(g["key-count"], g["digest"]) for g in groups}) == 1 and groups[0]["key-count"] >= len(self.acked)

    def check_every_acked_write_everywhere(self) -> None:
        def read(node: str, key: str) -> str | None:
            status, body = self.client(node).get(key)
            return body.get("value") if status == 200 else f"status {status}"

        with ThreadPoolExecutor(8) as pool:
            for node in self.nodes:
                values = dict(zip(self.acked, pool.map(lambda key: read(node, key), self.acked)))
                lost = {k: v for k, v in values.items() if v != self.acked[k]}
                assert not lost, f"{len(lost)} of {len(self.acked)} acknowledged writes wrong through {node}: " \
                                 f"{dict(list(lost.items())[:5])}"
