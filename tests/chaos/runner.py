"""ChaosRun: a seeded, time-bounded run of concurrent clients while faults are injected and healed
and the view changes.

The schedules are pure functions of (seed, duration, layout, fault kinds, view-change
modes), so a failing run can be replayed from its seed. Two lanes run side by side:

* faults (`faults.py`): one at a time, each injected, held for a few seconds,
  healed, and followed by a quiet gap; it hits a shard of the epoch the cluster
  runs at that moment;
* view changes (`view_changes.py`), with spare nodes: a change in the middle of
  the run, a dead replica replaced by a spare (`replacement.py`: SIGKILL,
  remove-member, add-member, in place), and a change whose coordinator is
  SIGKILLed (then restarted).

Checks after every run, by the epochs the cluster went through (`epochs.py`):
* the recorded history is linearizable per key (kvs.testing.linearizability);
* every acknowledged write to a write-once key is readable with its value;
* every view change settled (rolled back or finished), with the outcome its
  answer implies; every node of the final view and every metadata member then
  routes by the final epoch, which GET /kvs/shards agrees with;
* after healing, every replica of each group of the final epoch holds the same
  data (digests at the same applied index); the final epoch's replicas, which a
  replacement made differ from the initial layout (a replaced node stays down);
* availability (`availability.py`): an operation may fail only if the node it
  was sent to was faulty, its key was moving in a view change, or its group
  was under a fault that takes its majority or leader (or had just healed).
A violation saves the history and the schedules as JSON for replay.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field

import requests

from kvs.client import KvsClient
from kvs.testing.linearizability import FAIL, OK, UNKNOWN, Operation, check_history, history_to_json
from kvs.testing.cluster import wait_until
from kvs.config.epoch import ConfigEpoch
from kvs.reconfig.planner import plan_view_change
from kvs.testing.workload import WorkloadSpec, run_recorded_workload

from .availability import AvailabilityCheck
from .driver import ClusterDriver
from .epochs import EpochTimeline
from .faults import FAULT_KINDS, Fault, FaultLog, make_schedule
from .view_changes import ViewChangeLane, grown_view, make_view_change_schedule

CHANGE_LANE_LIMIT = 300.0   # the view-change lane ends within this after the clients (its steps are bounded)
AGREE_LIMIT = 60.0          # after healing, every node routes by the final epoch within this
SETTLED_READ_LIMIT = 10.0   # after healing, a final read is asked again until it answers 200 or 404 within this


@dataclass
class ChaosReport:
    seed: int
    backend: str
    ops_ok: int = 0
    ops_failed: int = 0
    ops_unknown: int = 0
    faults: list[dict] = field(default_factory=list)
    view_changes: list[dict] = field(default_factory=list)
    final_epoch: int | None = None
    violations: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    # per shard: when clients that reached a healthy node saw failures (seconds into the run)
    unavailability: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    artifacts: str | None = None

    def summary(self) -> str:
        windows = {g: [f"{a:.1f}-{b:.1f}s" for a, b in w] for g, w in self.unavailability.items()}
        faults = [f"{f['kind']}(shard {f['shard']}) {f['injected']}-"
                  + (f"{f['healed']}s" if f["healed"] is not None else "end") for f in self.faults]
        return (f"chaos[{self.backend} seed={self.seed}]: ok={self.ops_ok} failed={self.ops_failed} "
                f"unknown={self.ops_unknown} faults={len(self.faults)} {faults} "
                f"view-changes={[c['description'] for c in self.view_changes]} final-epoch={self.final_epoch} "
                f"violations={len(self.violations)} unavailable={windows}"
                + (f" harness-errors={self.harness_errors}" if self.harness_errors else "")
                + (f" artifacts={self.artifacts}" if self.artifacts else ""))


class ChaosRun:
    def __init__(self, driver: ClusterDriver, backend: str, seed: int, duration: float = 60.0,
                 clients: int = 8, keys_per_shard: int = 6, kinds: tuple[str, ...] = FAULT_KINDS,
                 view_changes: tuple[str, ...] = (), artifacts_dir: str = "chaos-artifacts"):
        if view_changes and not driver.spare_nodes():
            raise ValueError("view changes need spare nodes to add (a driver made with spares=k)")
        if "replace_dead_replica" in view_changes and len(driver.spare_nodes()) <= driver.replicas:
            raise ValueError("a replacement needs a spare beyond the grown view's: spares > replicas")
        self.driver = driver
        self.report = ChaosReport(seed=seed, backend=backend)
        self.duration = duration
        self.clients = clients
        largest = len(grown_view(driver.nodes(), driver.spare_nodes(), driver.replicas)) // driver.replicas
        self.schedule = make_schedule(seed, duration, largest, kinds)
        self.view_change_schedule = make_view_change_schedule(seed, duration, len(driver.nodes()), view_changes)
        self.artifacts_dir = artifacts_dir
        self.initial = ConfigEpoch.initial(tuple(driver.nodes()), driver.replicas)
        self.keys = pick_keys(self.initial, self._grown(), keys_per_shard)
        self.faults = FaultLog(driver)
        self.once_acked: dict[str, str] = {}

    def _grown(self) -> ConfigEpoch | None:
        """The epoch a change to the grown view plans from the initial one (what moves in a change)."""
        if not self.driver.spare_nodes():
            return None
        grown = grown_view(self.driver.nodes(), self.driver.spare_nodes(), self.driver.replicas)
        return plan_view_change(self.initial, grown, self.driver.replicas).epoch

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> ChaosReport:
        # The clients use the initial view only: it is in every view of the lane's toggle.
        nodes = self.driver.nodes()
        spec = WorkloadSpec(addresses=tuple(nodes), keys=tuple(self.keys), clients=self.clients,
                            duration=self.duration, seed=self.report.seed, resolve=self.driver.client_address)
        first = self.driver.current_epoch()
        if first is None or first.number != 1 or first.shards != self.initial.shards:
            self.report.violations.append(f"the cluster starts at {first}, not at the initial layout")
            first = self.initial
        self.timeline = EpochTimeline(first)
        self.start = time.monotonic()
        self.changes = ViewChangeLane(self.driver, self.faults, self.timeline, self.view_change_schedule,
                                      self.start)
        stop = threading.Event()
        lanes = [threading.Thread(target=self._inject_schedule, args=(stop,), name="chaos-faults", daemon=True),
                 threading.Thread(target=self.changes.run, args=(stop,), name="chaos-view-changes", daemon=True)]
        once_writer = threading.Thread(target=self._write_once_keys, args=(nodes, stop), daemon=True)
        for thread in lanes + [once_writer]:
            thread.start()
        records = run_recorded_workload(spec)
        stop.set()
        lanes[0].join(60)
        lanes[1].join(CHANGE_LANE_LIMIT)
        once_writer.join(30)
        if lanes[1].is_alive():
            self.report.violations.append(f"the view-change lane still runs {CHANGE_LANE_LIMIT}s after the clients")
        self.faults.heal_everything()
        try:                                    # every node but those replaced while dead (they stay down)
            self.driver.wait_ready([n for n in self.driver.all_nodes() if n not in self.faults.retired_nodes()],
                                   timeout=90)
        except TimeoutError as exc:             # recorded; the checks below show what it breaks
            self.report.violations.append(f"after healing: {exc}")
        final = self._final_epoch()
        records += self._final_reads(nodes)
        history = [op for op, _ in records]
        self._count(history)
        self._check_linearizable(history)
        self._check_write_once_keys(nodes[0])
        self._check_replicas_agree(final)
        self._check_availability(records)
        self.report.violations += self.faults.violations + self.changes.violations
        self.report.harness_errors = list(self.faults.harness_errors)
        self.report.faults = [asdict(e) | {"injected": round(e.injected - self.start, 2),
                                           "healed": None if e.healed is None else round(e.healed - self.start, 2)}
                              for e in self.faults.events]
        self.report.view_changes = [asdict(c) | {"description": c.describe()} for c in self.changes.events]
        if self.report.violations:
            self._save(history, [address for _, address in records])
        return self.report

    def _inject_schedule(self, stop: threading.Event) -> None:
        for fault in self.schedule:
            if stop.wait(max(0.0, self.start + fault.at - time.monotonic())):
                return
            event = self._inject(fault)
            if event is None:
                continue
            stop.wait(fault.hold)
            self.faults.heal(event)

    def _inject(self, fault: Fault):
        epoch = self.driver.current_epoch()
        if epoch is None:
            return None
        # The schedule draws shards of the largest layout; the cluster may run fewer right now.
        ids = epoch.shard_ids()
        shard = fault.shard if fault.shard in ids else ids[(int(fault.shard) - 1) % len(ids)]
        replicas = list(epoch.replicas(shard))
        leader = self._leader(shard, replicas)
        if fault.kind == "kill_group":
            targets = replicas
        elif fault.kind.endswith("_leader"):
            if leader is None:
                return None
            targets = [leader]
        else:
            targets = [random.Random(fault.at).choice([r for r in replicas if r != leader])]
        return self.faults.inject(fault.kind, shard, targets, leader=leader in targets)

    def _leader(self, shard_id: str, replicas: list[str]) -> str | None:
        for node in replicas:
            group = self.driver.group_status(node, shard_id)
            if group and group["role"] == "leader":
                return node
        return None

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

    def _settled_read(self, address: str, key: str) -> tuple[int | None, dict]:
        """GET `key` through `address` once the cluster is healed and ready, asked again 0.2 s apart
        while the answer is neither 200 nor 404, for up to SETTLED_READ_LIMIT: one 503 (a leader elected
        a moment ago) or one lost connection is not a verdict, a store that keeps failing is. A read
        changes nothing, so its attempts are one operation. The last status (None: no answer) and body."""
        deadline = time.monotonic() + SETTLED_READ_LIMIT
        while True:
            try:
                status, body = self._client(address, 5).get(key)
            except requests.RequestException:
                status, body = None, {}
            if status in (200, 404) or time.monotonic() + 0.2 >= deadline:
                return status, body
            time.sleep(0.2)

    def _final_reads(self, nodes: list[str]) -> list[tuple[Operation, str]]:
        records = []
        for key in self.keys:
            address = nodes[len(records) % len(nodes)]
            call = time.monotonic()
            status, body = self._settled_read(address, key)
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
        missing = [k for k, v in self.once_acked.items() if self._settled_read(node, k)[1].get("value") != v]
        if missing:
            self.report.violations.append(f"{len(missing)} of {len(self.once_acked)} acknowledged write-once "
                                          f"keys missing, e.g. {missing[:5]}")

    def _final_epoch(self) -> ConfigEpoch:
        """The epoch the cluster settled on, once every metadata member and every node of its view
        routes by it and no change is in progress; GET /kvs/shards must agree with it."""
        final = self.driver.settled_epoch() or self.timeline.last()
        self.report.final_epoch = final.number
        if final.number != self.timeline.last().number:
            self.report.violations.append(f"the cluster runs epoch {final.number} after the view changes "
                                          f"settled on {self.timeline.last().number}")
        nodes = sorted(set(self.driver.nodes()) | set(final.view))

        def lagging() -> dict[str, object]:
            behind = {}
            for node in nodes:
                epoch = self.driver.epoch_of(node)
                if epoch is None or epoch.number != final.number or epoch.shards != final.shards:
                    behind[node] = epoch.number if epoch else None
            for node in self.driver.nodes():
                answered, phase = self.driver.view_change_phase(node)
                if phase is not None or not answered:
                    behind[node] = f"phase {phase}" if answered else "no answer"
            return behind

        try:
            wait_until(lambda: not lagging(), AGREE_LIMIT, interval=0.5, message="every node on the final epoch")
        except TimeoutError:
            self.report.violations.append(f"not every node routes by epoch {final.number}: {lagging()}")
        shards = self._settled_shards()
        if shards != final.shard_ids():
            self.report.violations.append(f"GET /kvs/shards says {shards}, epoch {final.number} has "
                                          f"{final.shard_ids()}")
        return final

    def _settled_shards(self) -> object:
        """GET /kvs/shards's list from the first node that answers 200, asking each in turn, 0.2 s apart,
        for up to SETTLED_READ_LIMIT (then the last failure): one lost request is not a verdict, and the
        first list answered is (every node routes by the final epoch by now)."""
        deadline, nodes = time.monotonic() + SETTLED_READ_LIMIT, self.driver.nodes()
        for attempt in itertools.count():
            try:
                status, body = self.driver.http(nodes[attempt % len(nodes)], "/kvs/shards", timeout=5)
                if status == 200:
                    return body.get("shards")
                failure: object = f"HTTP {status}: {body}"
            except (requests.RequestException, ValueError) as exc:
                failure = repr(exc)
            if time.monotonic() + 0.2 >= deadline:
                return failure
            time.sleep(0.2)

    def _check_replicas_agree(self, epoch: ConfigEpoch) -> None:
        for shard_id in epoch.shard_ids():
            replicas = list(epoch.replicas(shard_id))

            def agree() -> bool:
                states = [self.driver.group_status(n, shard_id, digest=True) for n in replicas]
                return all(states) and len({(s["last-applied"], s["digest"]) for s in states}) == 1

            try:
                wait_until(agree, 30, interval=0.25, message=f"replicas of shard {shard_id} agree")
            except TimeoutError:
                states = {n: self.driver.group_status(n, shard_id, digest=True) for n in replicas}
                self.report.violations.append(f"replicas of shard {shard_id} differ: {states}")

    def _check_availability(self, records: list[tuple[Operation, str]]) -> None:
        check = AvailabilityCheck(self.faults.events, self.timeline, self.start, time.monotonic())
        violations, self.report.unavailability = check.run(records)
        self.report.violations += violations

    def _save(self, history: list[Operation], addresses: list[str]) -> None:
        """A violating run's record: schedules, outcomes, the history with the node each operation was sent
        to, and every node's log (the process backend's data directory is gone with its machine)."""
        logs = {}
        for node in self.driver.all_nodes():
            try:
                logs[node] = self.driver.logs(node, lines=2000)
            except Exception as exc:                # a container already removed: say so, keep the rest
                logs[node] = f"(no log: {exc})"
        os.makedirs(self.artifacts_dir, exist_ok=True)
        path = os.path.join(self.artifacts_dir, f"chaos-{self.report.backend}-seed{self.report.seed}.json")
        with open(path, "w") as f:
            json.dump({"seed": self.report.seed, "duration": self.duration,
                       "schedule": [asdict(x) for x in self.schedule], "faults": self.report.faults,
                       "view_change_schedule": [asdict(x) for x in self.view_change_schedule],
                       "view_changes": self.report.view_changes, "final_epoch": self.report.final_epoch,
                       "violations": self.report.violations, "history": history_to_json(history),
                       "sent-to": addresses, "logs": logs}, f)
        self.report.artifacts = path


def pick_keys(initial: ConfigEpoch, grown: ConfigEpoch | None, per_shard: int) -> list[str]:
    """`per_shard` keys of each initial shard; with a grown epoch, a third of them move to a new group
    when the view grows (and back when it shrinks), the others stay where they are."""
    moving_share = per_shard // 3 if grown is not None else 0
    keys = []
    for shard_id in initial.shard_ids():
        wanted = {False: per_shard - moving_share, True: moving_share}
        found: dict[bool, list[str]] = {False: [], True: []}
        for i in range(1_000_000):                  # a key lands in a given shard about 1/shards of the time
            if all(len(found[m]) >= wanted[m] for m in wanted):
                break
            key = f"chaos-{i}"
            if initial.shard_for_key(key) != shard_id:
                continue
            moves = grown is not None and grown.shard_for_key(key) != shard_id
            if len(found[moves]) < wanted[moves]:
                found[moves].append(key)
        keys += found[False] + found[True]
    return keys
