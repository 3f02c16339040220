"""The long soak: many chaos runs on one backend, their summary kept in the repo with the commit they ran on.

    python -m tests.chaos.soak --backend docker --runs 100 --seconds 60 \\
        --out benchmarks/results/soak-docker.json

Each run is the CI chaos run (`tests/chaos/test_chaos.py`: 2 shards x 3
replicas and 4 spares, kill / pause / isolate / whole-group faults, a view
change mid-run, a dead replica replaced by a spare, and a change whose
coordinator is SIGKILLed), with its own seed.
The summary is rewritten after every run, so an interrupted soak still
records what it did; `--max-minutes` bounds the whole soak. A soak continued
later on the same commit (`--first-seed` past the last run) is joined to the
first part with `--merge PART... --out FILE`, which refuses parts of
different commits or overlapping seeds. "Lost" counts
acknowledged write-once keys missing at the end; a write applied twice or a
stale read shows as a linearizability violation.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .docker_driver import DockerDriver, docker_available, ensure_image
from .driver import ProcessDriver, iptables_usable
from .runner import ChaosRun
from .test_chaos import REPLICAS, SHARDS, SPARES
from .view_changes import MODES, dead_replica_replaced


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+uncommitted changes" if dirty else "")


def one_run(backend: str, seed: int, seconds: float, image: str, workdir: str) -> dict:
    if backend == "docker":
        driver = DockerDriver(SHARDS, REPLICAS, image=image, spares=SPARES)
    else:
        driver = ProcessDriver(SHARDS, REPLICAS, os.path.join(workdir, f"cluster-{seed}"), spares=SPARES)
    started = time.time()
    try:
        driver.start()          # inside: a signal while it starts still removes what it started
        driver.wait_healthy(timeout=90)
        report = ChaosRun(driver, backend, seed, duration=seconds, view_changes=MODES,
                          artifacts_dir=os.path.join(workdir, f"artifacts-{seed}")).run()
    finally:
        driver.stop()
    if not report.violations:
        shutil.rmtree(os.path.join(workdir, f"cluster-{seed}"), ignore_errors=True)
    lost = sum(1 for v in report.violations if "acknowledged write-once keys missing" in v)
    return {
        "seed": seed, "seconds": round(time.time() - started, 1),
        "ops-ok": report.ops_ok, "ops-failed": report.ops_failed, "ops-unknown": report.ops_unknown,
        "faults": [f["kind"] for f in report.faults],
        "view-changes": [c["description"] for c in report.view_changes],
        "coordinator-killed": any(c.get("killed_in_phase") for c in report.view_changes),
        "dead-replica-replaced": dead_replica_replaced(report.view_changes),
        "violations": report.violations[:10], "violation-count": len(report.violations), "lost": lost,
        "unavailable-seconds": round(sum(b - a for w in report.unavailability.values() for a, b in w), 1),
        "harness-errors": report.harness_errors[:5],
        "artifacts": report.artifacts,
    }


_EMPTY_RUN = {"seconds": 0.0, "ops-ok": 0, "ops-failed": 0, "ops-unknown": 0, "faults": [], "view-changes": [],
              "coordinator-killed": False, "dead-replica-replaced": False, "violations": [], "violation-count": 0,
              "lost": 0, "unavailable-seconds": 0.0, "harness-errors": [], "artifacts": None}


def summarize(backend: str, seconds: float, runs: list[dict], meta: dict) -> dict:
    faults = collections.Counter(kind for r in runs for kind in r["faults"])
    return dict(meta, **{
        "backend": backend, "seconds-per-run": seconds, "runs": len(runs),
        "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load-average-end": os.getloadavg(),
        "operations": {"ok": sum(r["ops-ok"] for r in runs), "failed": sum(r["ops-failed"] for r in runs),
                       "unknown": sum(r["ops-unknown"] for r in runs)},
        "faults": dict(faults), "faults-total": sum(faults.values()),
        "view-changes": sum(len(r["view-changes"]) for r in runs),
        "runs-with-coordinator-killed": sum(r["coordinator-killed"] for r in runs),
        "runs-with-dead-replica-replaced": sum(r["dead-replica-replaced"] for r in runs),
        "violations": sum(r["violation-count"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "unavailable-seconds": round(sum(r["unavailable-seconds"] for r in runs), 1),
        "failed-runs": [r["seed"] for r in runs if r["violation-count"]],
        "runs-with-harness-errors": [r["seed"] for r in runs if r["harness-errors"]],
        "per-run": runs,
    })


def merge(paths: list[str], out: str) -> int:
    """Join soak summaries of one commit and backend into one, as if one soak had made every run."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    first = parts[0]
    for part in parts[1:]:
        for field in ("commit", "backend", "seconds-per-run"):
            if part[field] != first[field]:
                print(f"cannot merge: {field} differs ({first[field]!r} vs {part[field]!r})", file=sys.stderr)
                return 2
    runs = [run for part in parts for run in part["per-run"]]
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        print("cannot merge: the parts ran some seeds twice", file=sys.stderr)
        return 2
    meta = {"commit": first["commit"], "command": " + ".join(p["command"] for p in parts),
            "started": first["started"], "load-average-start": first["load-average-start"],
            "parts": [{"command": p["command"], "started": p["started"], "ended": p["ended"], "runs": p["runs"]}
                      for p in parts]}
    summary = summarize(first["backend"], first["seconds-per-run"], sorted(runs, key=lambda r: r["seed"]), meta)
    summary["ended"], summary["load-average-end"] = parts[-1]["ended"], parts[-1]["load-average-end"]
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['runs']} runs, {summary['violations']} violations, {summary['lost']} lost -> {out}")
    return 0


def interruptible() -> None:
    """SIGINT and SIGTERM stop the soak through KeyboardInterrupt, so a run's clean-up (its containers,
    processes and firewall rules) still runs. A shell starts a background job with SIGINT ignored, and
    Python then installs no handler of its own: without this, `kill -INT` did nothing and SIGTERM left
    the run's cluster behind."""
    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    interruptible()
    if argv[:1] == ["--merge"]:
        parser = argparse.ArgumentParser(description="join soak summaries of one commit")
        parser.add_argument("--merge", nargs="+", required=True)
        parser.add_argument("--out", required=True)
        args = parser.parse_args(argv)
        return merge(args.merge, args.out)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("docker", "process"), required=True)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--max-minutes", type=float, default=240.0, help="stop starting runs after this")
    parser.add_argument("--image", default=os.environ.get("KVS_CHAOS_IMAGE", "kvs:test"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.backend == "docker" and not docker_available():
        print("no usable Docker engine", file=sys.stderr)
        return 2
    if args.backend == "process" and not iptables_usable():
        print("iptables is not usable here (needed to isolate nodes)", file=sys.stderr)
        return 2
    if args.backend == "docker":
        ensure_image(args.image)
    meta = {"commit": commit(), "command": " ".join(["python -m tests.chaos.soak"] + argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load-average-start": os.getloadavg()}
    deadline = time.monotonic() + args.max_minutes * 60
    runs: list[dict] = []
    workdir = tempfile.mkdtemp(prefix="kvs-soak-")     # kept: a failed run's artifacts are there
    print(f"artifacts and process-backend data under {workdir}", file=sys.stderr)
    for seed in range(args.first_seed, args.first_seed + args.runs):
        if time.monotonic() > deadline:
            print(f"--max-minutes reached after {len(runs)} runs", file=sys.stderr)
            break
        try:
            runs.append(one_run(args.backend, seed, args.seconds, args.image, workdir))
        except Exception as exc:            # the harness failed (not the store): recorded, the soak goes on
            runs.append(dict(_EMPTY_RUN, seed=seed, **{"harness-errors": [repr(exc)]}))
        summary = summarize(args.backend, args.seconds, runs, meta)
        with open(args.out + ".tmp", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        last = runs[-1]
        print(f"run {len(runs)} seed {seed}: ok={last['ops-ok']} faults={len(last['faults'])} "
              f"replaced={last['dead-replica-replaced']} violations={last['violation-count']} "
              f"lost={last['lost']}", flush=True)
    summary = summarize(args.backend, args.seconds, runs, meta)
    print(f"{summary['runs']} runs, {summary['operations']['ok']} ok ops, {summary['faults-total']} faults, "
          f"{summary['violations']} violations, {summary['lost']} lost")
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
