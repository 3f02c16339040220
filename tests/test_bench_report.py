"""The benchmark report generator on small made-up results: targets, tables, README rewrite.

No benchmark runs here and nothing is timed; the plots (matplotlib) are not drawn."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import report  # noqa: E402


def hey_result(rps: float, p50: float, other_cores: float = 0.0, ok: int = 1000) -> dict:
    return {"ok_rps": rps, "ok": ok, "p50_ms": p50, "p99_ms": p50 * 3, "non_2xx": 0, "transport_errors": 0,
            "cpu": {"other_cores": other_cores, "machine_busy_pct": 80.0, "server_cores": 1.2,
                    "cpu_s_by_server_pid": {"1": 0.6, "2": 0.1, "3": 0.1}}}


def scaling_result(cpu_s_per_op: float) -> dict:
    per_op = {role: {"cpu_s_per_op": cpu_s_per_op} for role in ("leaders", "followers", "all")}
    return {"ok_rps": 2000.0, "p50_ms": 8.0, "p99_ms": 20.0, "non_2xx": 0, "transport_errors": 0,
            "cpu_per_op": per_op, "projected_rps_one_core_per_process": 1500,
            "cpu": {"other_cores": 0.0, "machine_busy_pct": 90.0}}


@pytest.fixture
def results_dir(tmp_path):
    machine = {"nproc": 2, "kvs_commit": "0123456789abcdef", "kvs_uncommitted_changes": []}
    systems = {name: {"leader_pid": 1, "results": {f"{op}@{n}": hey_result(rps * n, p50)
                                                   for op in ("write", "read") for n in (1, 16)}}
               for name, rps, p50 in (("kvs-leader", 100.0, 1.6), ("etcd-leader", 150.0, 1.0),
                                      ("flask-dict", 40.0, 0.5))}
    files = {
        "throughput": {"timestamp": "t", "command": "c", "machine": machine, "settings": {"clients": [1, 16]},
                       "systems": systems},
        "scaling": {"timestamp": "t", "command": "c", "machine": machine,
                    "groups": {"1": {"write": scaling_result(0.0008), "read": scaling_result(0.0008)},
                               "3": {"write": scaling_result(0.0012), "read": scaling_result(0.0008)}}},
        "failover": {"timestamp": "t", "command": "c", "machine": machine, "cpu": {"other_cores": 0.0},
                     "systems": {"kvs": {"median_s": 0.7, "max_s": 2.5, "rounds": 3, "failed_rounds": 0,
                                         "seconds": [0.6, 0.7, 2.5]}}},
    }
    for name, payload in files.items():
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump(payload, f)
    return tmp_path


def by_target(verdicts: list[dict]) -> dict[str, dict]:
    return {v["target"]: v for v in verdicts}


def test_targets_are_judged_from_the_results(results_dir):
    v = by_target(report.targets(report.load_results(str(results_dir))))
    writes = v["writes/s of one group via the leader, 16 clients, >= 1.0x etcd's"]
    assert writes["measured"] == pytest.approx(0.67, abs=0.01) and writes["met"] is False
    assert writes["missed_by_factor"] == pytest.approx(1.49, abs=0.02)
    assert "writes/s of one group via the follower, 16 clients, >= 1.0x etcd's" not in v   # not measured
    assert v["p50 write latency at 1 client via the leader <= 1.0x etcd's (both fsyncing)"]["met"] is False  # 1.6 vs 1.0
    assert "p50 write latency at 1 client via the follower <= 1.0x etcd's (both fsyncing)" not in v   # not measured
    cpu_per_write = v["leader CPU per write at 16 clients <= 0.2 ms"]     # 0.6 CPU-s on pid 1, 1,000 writes
    assert cpu_per_write["measured"] == pytest.approx(0.6) and cpu_per_write["met"] is False
    cpu = [t for t in v.values() if t["target"].startswith("CPU-seconds per write")][0]
    assert cpu["measured"] == pytest.approx(1.5) and cpu["met"] is False
    assert [t for t in v.values() if t["target"].startswith("CPU-seconds per read")][0]["met"] is True
    assert v["failover <= 2 s (the slowest of the rounds)"]["met"] is False


def test_readme_section_is_replaced_in_place(results_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nhand-written text\n")
    report.generate(str(readme), str(results_dir), with_plots=False)
    first = readme.read_text()
    assert first.startswith("# Benchmarks\n\nhand-written text\n")
    assert first.count(report.BEGIN) == 1 and first.count(report.END) == 1
    assert "| write | 16 | 1,600 (1.6 / 4.8)" in first
    readme.write_text(first + "\ntext after the section\n")
    report.generate(str(readme), str(results_dir), with_plots=False)
    second = readme.read_text()
    assert second.count(report.BEGIN) == 1 and second.endswith("text after the section\n")


def member_add_side(commit: str, seconds: float, keys_moved: int, shard_ids: list[str], p99: float,
                    errors: dict[str, int]) -> dict:
    def clients(p99_ms: float, error_codes: dict[str, int]) -> dict:
        summary = {"ops": 1000, "ok": 1000 - sum(error_codes.values()), "errors": sum(error_codes.values()),
                   "ok_per_s": 100.0, "p50_ms": 5.0, "p99_ms": p99_ms, "max_ms": p99_ms * 2,
                   "error_codes": error_codes}
        return {kind: summary for kind in ("write", "read", "all")}
    cpu = {"other_cores": 0.05, "server_cores": 1.1}
    derived = {"seconds": seconds, "keys_moved": keys_moved, "ring_moved_keys": keys_moved,
               "leader_log_entries": 5000, "leader_snapshot_mib": 0.0, "network_mib": 40.0,
               "network_raft_mib": 39.0, "network_http_mib": 1.0, "network_clients_share_mib": 4.0,
               "network_net_mib": 36.0, "disk_mib": 50.0, "disk_clients_share_mib": 10.0, "disk_net_mib": 40.0,
               "spare_data_dir_mib": 30.0, "data_dir_growth_mib": 31.0, "shard_ids_after": shard_ids,
               "other_cores": 0.05, "busy": False, "checks_passed": True}
    return {"tree": {"kvs_commit": commit, "kvs_uncommitted_changes": []}, "derived": derived,
            "baseline": {"clients": clients(10.0, {}), "cpu": cpu},
            "change": {"clients": clients(p99, errors), "cpu": cpu}}


def test_member_add_table_puts_the_sides_side_by_side(results_dir, tmp_path):
    settings = {"keys_in_shard": 100000, "keys_in_other_shard": 100000, "value_bytes": 256, "writers": 4,
                "readers": 4, "hot_keys": 64, "baseline_s": 10.0}
    payload = {"timestamp": "t", "command": "python benchmarks/suite.py member-add",
               "machine": {"kvs_commit": "ea22d31aaaa", "kvs_uncommitted_changes": []},
               "member_add": {"settings": settings, "sides": {
                   "in place": member_add_side("ea22d31aaaa", 12.5, 0, ["1", "2"], 40.0, {}),
                   "in place, later": dict(member_add_side("0abcdef", 12.5, 0, ["1", "2"], 40.0, {}),
                                           tree={"kvs_commit": "0abcdef", "kvs_last_change": "ea22d31aaaa",
                                                 "kvs_uncommitted_changes": ["M kvs/node.py"]}),
                   "copy": member_add_side("23bf04abbbb", 150.25, 150123, ["2", "3"], 300.0, {"503": 3, "0": 1})}}}
    with open(results_dir / "member_add.json", "w") as f:
        json.dump(payload, f)
    table = "\n".join(report.member_add_table(payload))
    assert "|  | in place | in place, later | copy |" in table
    assert ("| kvs commit run (kvs/ last changed in) | `ea22d31` | `0abcdef` (`ea22d31`) + uncommitted changes in "
            "kvs/ | `23bf04a` |") in table
    assert "| add-member: request to HTTP 200 (s) | 12.50 | 12.50 | 150.25 |" in table
    assert "| keys moved (progress `keys-moved`) | 0 | 0 | 150,123 |" in table
    assert "| shard ids after (before: 1, 2) | 1, 2 | 1, 2 | 2, 3 |" in table
    assert "| client errors: during the change | 0 of 1,000 | 0 of 1,000 | 4 of 1,000 (3 x 503, 1 x no answer) |" in table
    assert "| clients, during the change: p50 / p99 / max ms | 5.0 / 40.0 / 80.0 | 5.0 / 40.0 / 80.0 | 5.0 / 300.0 / 600.0 |" in table
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n")
    report.generate(str(readme), str(results_dir), with_plots=False)
    assert "### One replica added to a shard" in readme.read_text()


def test_repeated_rounds_keep_the_median_round_with_its_own_leader():
    """`--repeat`: every round starts new processes, so a cell's CPU is attributed to the leader of the
    round it comes from (a round-0 pid would count the leader's CPU as a follower's)."""
    import throughput

    def round_(pid: int, rps: float) -> dict:
        cpu = {"cpu_s_by_server_pid": {str(pid): 1.0, str(pid + 1): 0.5}}
        return {"kvs-leader": {"leader_pid": pid, "results": {"write@16": {"ok_rps": rps, "ok": 100, "cpu": cpu}}}}

    combined = throughput.combine([round_(10, 300.0), round_(20, 100.0), round_(30, 200.0)])
    cell = combined["kvs-leader"]["results"]["write@16"]
    assert cell["ok_rps"] == 200.0 and cell["rounds_ok_rps"] == [300.0, 100.0, 200.0]
    assert cell["leader_pid"] == 30 and str(cell["leader_pid"]) in cell["cpu"]["cpu_s_by_server_pid"]


def view_change_payload(load: dict, base_p99: float, during_p99: float) -> dict:
    def phase(p99: float) -> dict:
        return {"ops": 1000, "errors": 0, "p50_ms": 2.0, "p99_ms": p99, "max_ms": p99 * 2}
    return {"timestamp": "t", "command": "c", "keys": 100000, "load": load,
            "view_change": {"status": 200, "seconds": 15.0, "keys_moved": 33000},
            "moving_keys": {"baseline": phase(base_p99), "during_change": phase(during_p99)},
            "staying_keys": {"baseline": phase(base_p99), "during_change": phase(during_p99)},
            "suite": {"cpu": {"other_cores": 0.0}}}


def test_a_view_change_at_a_fixed_rate_is_judged_and_tabled_beside_the_closed_loop_one(results_dir, tmp_path):
    with open(results_dir / "view_change.json", "w") as f:
        json.dump(view_change_payload({"kind": "closed loop", "writers_per_key_set": 4}, 20.0, 22.0), f)
    with open(results_dir / "view_change_rate.json", "w") as f:
        json.dump(view_change_payload({"kind": "fixed rate", "writes_per_s_per_key_set": 200.0,
                                       "max_outstanding_per_key_set": 256}, 3.0, 45.0), f)
    v = by_target(report.targets(report.load_results(str(results_dir))))
    assert v["view change: non-moving keys p99 <= 1.2x baseline"]["met"] is True                 # 22 vs 20 ms
    fixed = v["view change at a fixed rate: non-moving keys p99 <= 1.2x baseline"]                # 45 vs 3 ms
    assert fixed["measured"] == pytest.approx(15.0) and fixed["met"] is False
    assert v["view change at a fixed rate: moving-key write pause p99 <= 100 ms"]["met"] is True
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n")
    report.generate(str(readme), str(results_dir), with_plots=False)
    text = readme.read_text()
    assert "### View change under load (2 -> 3 nodes, repl-factor 1)" in text
    assert "Load: a closed loop of 4 Python writer threads per key set" in text
    assert "### View change at a fixed rate (2 -> 3 nodes, repl-factor 1)" in text
    assert "Load: a fixed rate of 200 writes/s on each key set" in text
    assert "| writes of non-moving keys | 2.0 / 3.0 / 6.0 | 2.0 / 45.0 / 90.0 | 0 |" in text
