"""ChaosRun: a seeded, time-bounded run of concurrent clients while faults are injected and healed.

The schedule is a pure function of (seed, duration, shards, fault kinds), so a
failing run can be replayed from its seed. One fault is active at a time; each
is injected, held for a few seconds, healed, and followed by a quiet gap.

Checks after every run:
* the recorded history is linearizable per key (kvs.linearizability);
* every acknowledged write to a write-once key is readable with its value;
* after healing, every replica of a group holds the same data (digests at the
  same applied index);
* availability: an operation may fail only if the node it was sent to was
  faulty, or the key's group had lost its majority (every replica killed), or
  had lost its leader less than 3 s before (an election), or a fault of the
  group was healed less than 3 s before (a rejoining replica may force an
  election: PySyncObj has no pre-vote). A fault on a follower alone excuses
  nothing: the group keeps its leader and majority.
A violation saves the history and the schedule as JSON for replay.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field

import requests

from kvs.client import KvsClient
from kvs.linearizability import FAIL, OK, UNKNOWN, Operation, check_history, history_to_json
from kvs.local import wait_until
from kvs.shard.layout import ConfigEpoch
from kvs.workload import WorkloadSpec, run_recorded_workload

from .driver import ClusterDriver

FAULT_KINDS = ("kill_leader", "kill_follower", "pause_leader", "pause_follower", "isolate_leader",
               "isolate_follower", "kill_group")
GRACE = 3.0              # seconds after a heal within which a group must serve again
RESTART_LIMIT = 30.0     # a restarted node must serve again within this


@dataclass(frozen=True)
class Fault:
    at: float            # seconds after the start of the run
    kind: str
    shard: str
    hold: float          # seconds until healed


@dataclass
class FaultEvent:
    kind: str
    shard: str
    nodes: list[str]
    injected: float      # monotonic
    healed: float | None = None


@dataclass
class ChaosReport:
    seed: int
    backend: str
    ops_ok: int = 0
    ops_failed: int = 0
    ops_unknown: int = 0
    faults: list[dict] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    # per shard: when clients that reached a healthy node saw failures (seconds into the run)
    unavailability: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    artifacts: str | None = None

    def summary(self) -> str:
        windows = {g: [f"{a:.1f}-{b:.1f}s" for a, b in w] for g, w in self.unavailability.items()}
        faults = [f"{f['kind']}(shard {f['shard']}) {f['injected']}-{f['healed']}s" for f in self.faults]
        return (f"chaos[{self.backend} seed={self.seed}]: ok={self.ops_ok} failed={self.ops_failed} "
                f"unknown={self.ops_unknown} faults={len(self.faults)} {faults} violations={len(self.violations)} "
                f"unavailable={windows}" + (f" artifacts={self.artifacts}" if self.artifacts else ""))


def make_schedule(seed: int, duration: float, shards: int, kinds: tuple[str, ...] = FAULT_KINDS) -> list[Fault]:
    rng = random.Random(seed)
    faults, t = [], 3.0
    while True:
        hold = rng.uniform(2.0, 5.0)
        if t + hold + 2.0 > duration:
            return faults
        faults.append(Fault(at=round(t, 2), kind=rng.choice(kinds), shard=str(rng.randint(1, shards)),
                            hold=round(hold, 2)))
        t += hold + rng.uniform(3.0, 5.0)


class ChaosRun:
    def __init__(self, driver: ClusterDriver, backend: str, seed: int, duration: float = 60.0,
                 clients: int = 8, keys_per_shard: int = 6, kinds: tuple[str, ...] = FAULT_KINDS,
                 artifacts_dir: str = "chaos-artifacts"):
        self.driver = driver
        self.report = ChaosReport(seed=seed, backend=backend)
        self.duration = duration
        self.clients = clients
        self.schedule = make_schedule(seed, duration, driver.shards, kinds)
        self.artifacts_dir = artifacts_dir
        self.epoch = ConfigEpoch.initial(tuple(driver.nodes()), driver.replicas)
        self.keys = [k for sid in map(str, range(1, driver.shards + 1)) for k in self._keys_of(sid, keys_per_shard)]
        self.events: list[FaultEvent] = []
        self.once_acked: dict[str, str] = {}

    def _keys_of(self, shard_id: str, count: int) -> list[str]:
        keys, i = [], 0
        while len(keys) < count:
            key = f"chaos-{i}"
            if self.epoch.shard_for_key(key) == shard_id:
                keys.append(key)
            i += 1
        return keys

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> ChaosReport:
        nodes = self.driver.nodes()
        spec = WorkloadSpec(addresses=tuple(nodes), keys=tuple(self.keys), clients=self.clients,
                            duration=self.duration, seed=self.report.seed, resolve=self.driver.client_address)
        self.start = time.monotonic()
        stop = threading.Event()
        injector = threading.Thread(target=self._inject_schedule, args=(stop,), daemon=True)
        once_writer = threading.Thread(target=self._write_once_keys, args=(nodes, stop), daemon=True)
        injector.start()
        once_writer.start()
        records = run_recorded_workload(spec)
        stop.set()
        injector.join(60)
        once_writer.join(30)
        self._heal_everything()
        self.driver.wait_healthy(timeout=90)
        records += self._final_reads(nodes)
        history = [op for op, _ in records]
        self._count(history)
        self._check_linearizable(history)
        self._check_write_once_keys(nodes[0])
        self._check_replicas_agree()
        self._check_availability(records)
        self.report.faults = [asdict(e) | {"injected": round(e.injected - self.start, 2),
                                           "healed": round((e.healed or 0) - self.start, 2)} for e in self.events]
        if self.report.violations:
            self._save(history)
        return self.report

    def _inject_schedule(self, stop: threading.Event) -> None:
        for fault in self.schedule:
            if stop.wait(max(0.0, self.start + fault.at - time.monotonic())):
                return
            event = self._inject(fault)
            if event is None:
                continue
            self.events.append(event)
            stop.wait(fault.hold)
            self._heal(event)

    def _inject(self, fault: Fault) -> FaultEvent | None:
        replicas = self.driver.replicas_of(fault.shard)
        leader = self.driver.leader_of(fault.shard)
        if fault.kind == "kill_group":
            targets = replicas
        elif fault.kind.endswith("_leader"):
            if leader is None:
                return None
            targets = [leader]
        else:
            targets = [random.Random(fault.at).choice([r for r in replicas if r != leader])]
        action = fault.kind.split("_")[0]
        event = FaultEvent(fault.kind, fault.shard, targets, injected=time.monotonic())
        for node in targets:
            {"kill": self.driver.kill, "pause": self.driver.pause, "isolate": self.driver.isolate}[action](node)
        return event

    def _heal(self, event: FaultEvent) -> None:
        action = event.kind.split("_")[0]
        for node in event.nodes:
            {"kill": self.driver.start_node, "pause": self.driver.resume, "isolate": self.driver.heal}[action](node)
        if action == "kill":
            # A restarted node has returned once it serves again; the 3 s grace runs from then.
            try:
                self.driver.wait_healthy(event.nodes, timeout=RESTART_LIMIT)
            except TimeoutError:
                self.report.violations.append(f"{event.nodes} not healthy {RESTART_LIMIT}s after restart")
        event.healed = time.monotonic()

    def _heal_everything(self) -> None:
        for event in self.events:
            if event.healed is None:
                self._heal(event)

    def _client(self, node: str, timeout: float, session: requests.Session | None = None) -> KvsClient:
        return KvsClient(self.driver.client_address(node), timeout=timeout, session=session)

    def _write_once_keys(self, nodes: list[str], stop: threading.Event) -> None:
        rng = random.Random(self.report.seed)
        session = requests.Session()
        n = 0
        while not stop.is_set():
            n += 1
            key, value = f"once-{self.report.seed}-{n}", f"v{n}"
            try:
                status, _ = self._client(rng.choice(nodes), 7, session).put(key, value)
            except Exception:       # unreachable or not resolvable right now: not acknowledged
                stop.wait(0.05)
                continue
            if status in (200, 201):
                self.once_acked[key] = value

    def _final_reads(self, nodes: list[str]) -> list[tuple[Operation, str]]:
        records = []
        for key in self.keys:
            address = nodes[len(records) % len(nodes)]
            call = time.monotonic()
            status, body = self._client(address, 10).get(key)
            ret = time.monotonic()
            if status in (200, 404):
                op = Operation("final", "get", key, None, call, ret, OK, body.get("value") if status == 200 else None)
            else:
                op = Operation("final", "get", key, None, call, ret, FAIL)
                self.report.violations.append(f"final read of {key} through {address} failed: {status}")
            records.append((op, address))
        return records

    # -- checks --------------------------------------------------------------------------------

    def _count(self, history: list[Operation]) -> None:
        self.report.ops_ok = sum(op.outcome == OK for op in history)
        self.report.ops_failed = sum(op.outcome == FAIL for op in history)
        self.report.ops_unknown = sum(op.outcome == UNKNOWN for op in history)

    def _check_linearizable(self, history: list[Operation]) -> None:
        result = check_history(history)
        for failure in result.failures():
            self.report.violations.append(f"not linearizable: {failure.key}: {failure.explanation}")

    def _check_write_once_keys(self, node: str) -> None:
        client = self._client(node, 10)
        missing = [k for k, v in self.once_acked.items() if client.get(k)[1].get("value") != v]
        if missing:
            self.report.violations.append(f"{len(missing)} of {len(self.once_acked)} acknowledged write-once "
                                          f"keys missing, e.g. {missing[:5]}")

    def _check_replicas_agree(self) -> None:
        for shard_id in map(str, range(1, self.driver.shards + 1)):
            replicas = self.driver.replicas_of(shard_id)

            def agree() -> bool:
                states = [self.driver.group_status(n, shard_id, digest=True) for n in replicas]
                return all(states) and len({(s["last-applied"], s["digest"]) for s in states}) == 1

            try:
                wait_until(agree, 30, interval=0.25, message=f"replicas of shard {shard_id} agree")
            except TimeoutError:
                states = {n: self.driver.group_status(n, shard_id, digest=True) for n in replicas}
                self.report.violations.append(f"replicas of shard {shard_id} differ: {states}")

    def _check_availability(self, records: list[tuple[Operation, str]]) -> None:
        windows: dict[str, list[tuple[float, float]]] = {}
        for op, node in records:
            if op.outcome == OK or op.client == "final":
                continue
            shard_id = self.epoch.shard_for_key(op.key)
            end = op.ret if op.ret is not None else op.call + 7.0
            if self._sent_to_faulty_node(op, node, end):
                continue
            # the group failed a client that reached a healthy node
            windows.setdefault(shard_id, []).append((op.call - self.start, end - self.start))
            if not self._excused(op, shard_id, end):
                self.report.violations.append(
                    f"{op.kind} {op.key} via {node} {op.outcome} at {op.call - self.start:.1f}s "
                    f"outside any fault window of shard {shard_id} or of {node}")
        self.report.unavailability = {g: _merge(w) for g, w in windows.items()}

    def _sent_to_faulty_node(self, op: Operation, node: str, end: float) -> bool:
        return any(node in e.nodes and op.call < (e.healed or time.monotonic()) + GRACE and end > e.injected
                   for e in self.events)

    def _excused(self, op: Operation, shard_id: str, end: float) -> bool:
        def overlaps(start: float, stop: float) -> bool:
            return op.call < stop and end > start

        for event in self.events:
            healed = event.healed or time.monotonic()
            if event.shard != shard_id:
                continue
            if event.kind == "kill_group" and overlaps(event.injected, healed + GRACE):
                return True                         # no majority
            if event.kind.endswith("_leader") and overlaps(event.injected, event.injected + GRACE):
                return True                         # electing a new leader
            if overlaps(healed, healed + GRACE):
                return True                         # a replica rejoining
        return False

    def _save(self, history: list[Operation]) -> None:
        os.makedirs(self.artifacts_dir, exist_ok=True)
        path = os.path.join(self.artifacts_dir, f"chaos-{self.report.backend}-seed{self.report.seed}.json")
        with open(path, "w") as f:
            json.dump({"seed": self.report.seed, "duration": self.duration,
                       "schedule": [asdict(x) for x in self.schedule], "faults": self.report.faults,
                       "violations": self.report.violations, "history": history_to_json(history)}, f)
        self.report.artifacts = path


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1] + 0.5:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(round(a, 1), round(b, 1)) for a, b in merged]
