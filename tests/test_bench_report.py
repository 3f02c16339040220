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
    assert v["p50 write latency at 1 client <= 1.0x etcd's (both fsyncing)"]["met"] is False  # 1.6 ms vs 1.0 ms
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
