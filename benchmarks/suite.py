"""The kvs benchmark suite: one command per scenario, side by side with etcd, JSON + plots + README.

    python benchmarks/suite.py throughput  [--seconds 10] [--clients 1,4,16,64]
    python benchmarks/suite.py scaling     [--seconds 10] [--groups 1,2,3] [--clients-per-group 16]
    python benchmarks/suite.py failover    [--rounds 5]
    python benchmarks/suite.py size        [--keys 100000,300000]
    python benchmarks/suite.py view-change [--keys 100000]        (runs benchmarks/view_change.py)
    python benchmarks/suite.py profile     [--seconds 10]          (py-spy on the leader under load)
    python benchmarks/suite.py member-add  [--ma-keys 100000] [--copy-root DIR]   (a replica added: in place vs copy)
    python benchmarks/suite.py latency     [--seconds 10]          (the steps of one write at 1 client, traced)
    python benchmarks/suite.py all         (each of the above, in that order)
    python benchmarks/suite.py report      (plots and the README section, from benchmarks/results/*.json)

Each scenario writes benchmarks/results/<scenario>.json (the machine, the kvs commit, the settings,
the exact commands, the raw numbers and where the CPU went) and then regenerates the report.
Progress goes to stderr. Every process a scenario starts is stopped by its pid, also on Ctrl-C or
SIGTERM. Run from anywhere; the working tree's kvs/ is what is measured.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import signal
import string
import subprocess
import sys
import time

import harness
from harness import BENCH_DIR, CpuMeter, RESULTS_DIR, machine, now_utc, progress, temp_root, write_result

README = os.path.join(BENCH_DIR, "README.md")
VIEW_CHANGE_TIMEOUT = 900        # seconds: the wrapped view-change benchmark is interrupted after this


def ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def command_line() -> str:
    return "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def random_value(size: int) -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=size))


RECORDED_ENVIRONMENT = ("KVS_RAFT_ON_LOOP", "KVS_FSYNC", "KVS_ACCESS_LOG", "KVS_LOG_LEVEL")


def header(args: argparse.Namespace, host: dict) -> dict:
    return {"timestamp": now_utc(), "command": command_line(), "machine": host,
            "settings": {k: v for k, v in vars(args).items() if k != "func"},
            # The nodes inherit this environment: e.g. KVS_RAFT_ON_LOOP chooses what is measured.
            "environment": {k: v for k, v in os.environ.items() if k in RECORDED_ENVIRONMENT}}


# -- scenarios -----------------------------------------------------------------------------------------

def cmd_throughput(args: argparse.Namespace) -> None:
    import throughput
    clients, systems = ints(args.clients), args.systems.split(",")
    if args.skip_etcd:
        systems = [s for s in systems if not s.startswith("etcd")]
    payload = header(args, machine())
    payload["settings"].update(clients=clients, warmup_seconds=args.warmup)
    value = random_value(args.value_size)
    rounds = []
    for i in range(args.repeat):
        if args.repeat > 1:
            progress(f"throughput: round {i + 1} of {args.repeat}")
        rounds.append(throughput.run(temp_root("kvs-suite-tp-"), value, clients, args.seconds, systems, args.warmup))
    payload["systems"] = throughput.combine(rounds) if len(rounds) > 1 else rounds[0]
    write_result("throughput", payload, args.out)


def cmd_scaling(args: argparse.Namespace) -> None:
    import scaling
    payload = header(args, machine())
    payload["groups"] = scaling.run(temp_root("kvs-suite-sc-"), random_value(args.value_size), ints(args.groups),
                                    args.clients_per_group, args.seconds, args.warmup)
    write_result("scaling", payload, args.out)


def cmd_failover(args: argparse.Namespace) -> None:
    import failover
    payload = header(args, machine())
    meter = CpuMeter([]).start()
    payload["systems"] = failover.run(temp_root("kvs-suite-fo-"), args.rounds, random_value(args.value_size),
                                      not args.skip_etcd)
    payload["cpu"] = meter.stop()           # the nodes are waited for, so they count as "load" here
    write_result("failover", payload, args.out)


def cmd_size(args: argparse.Namespace) -> None:
    import size
    payload = header(args, machine())
    meter = CpuMeter([]).start()
    payload["systems"] = size.run(temp_root("kvs-suite-size-"), ints(args.keys), random_value(args.value_size),
                                  not args.skip_etcd)
    payload["cpu"] = meter.stop()
    write_result("size", payload, args.out)


def cmd_view_change(args: argparse.Namespace) -> None:
    """benchmarks/view_change.py twice: with its closed-loop writers (`view_change.json`), then at a fixed
    rate of `--vc-rate` writes/s per key set (`view_change_rate.json`; skipped with --vc-rate 0)."""
    out = args.out or os.path.join(RESULTS_DIR, "view_change.json")
    _view_change(args, out, [])
    if args.vc_rate > 0:
        _view_change(args, os.path.splitext(out)[0] + "_rate.json", ["--rate", f"{args.vc_rate:g}"])


def _view_change(args: argparse.Namespace, out: str, load: list[str]) -> None:
    """Run benchmarks/view_change.py as it is (the lead owns it) and add the machine and the CPU accounting.

    Its nodes are its children, and it waits for them when it stops them, so the CPU of the whole
    benchmark shows up in our RUSAGE_CHILDREN once it has exited: the machine's busy time minus that
    is what other processes used meanwhile."""
    import json
    cmd = [sys.executable, os.path.join(BENCH_DIR, "view_change.py"), "--keys", str(args.vc_keys),
           "--baseline", str(args.vc_baseline), *load, "--out", out]
    harness.record_command(cmd)
    host = machine()
    meter = CpuMeter([]).start()
    started = time.monotonic()
    # Its own session: a Ctrl-C at the terminal reaches only us, and we forward exactly one SIGINT,
    # so a second one cannot interrupt its clean-up. Its progress lines go to our stderr.
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        child.wait(timeout=VIEW_CHANGE_TIMEOUT)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        progress("view-change: interrupting the benchmark (SIGINT, so that it stops its nodes)")
        child.send_signal(signal.SIGINT)                            # its `finally` stops its cluster
        harness.shielded(lambda: child.wait(timeout=60))
        raise
    cpu = meter.stop()
    if child.returncode != 0:
        raise SystemExit(f"view_change.py exited with {child.returncode}")
    with open(out) as f:
        payload = json.load(f)
    payload.update(machine=host, command=command_line(),
                   suite={"wrapped_command": shlex.join(cmd), "seconds": round(time.monotonic() - started, 1),
                          "cpu": cpu})
    payload.setdefault("timestamp", now_utc())
    with open(out, "w") as f:
        json.dump(payload, f, indent=2)
    progress(f"view-change: results in {out}")


def cmd_profile(args: argparse.Namespace) -> None:
    import leader_profile
    payload = header(args, machine())
    payload["profiles"] = [leader_profile.run(temp_root("kvs-suite-prof-"), random_value(args.value_size), op,
                                              args.profile_clients, args.seconds, via)
                           for via in args.profile_via.split(",") for op in args.profile_ops.split(",")]
    write_result("profile", payload, args.out)


def cmd_member_add(args: argparse.Namespace) -> None:
    import member_add
    payload = header(args, machine())
    payload["member_add"] = member_add.run(temp_root("kvs-suite-ma-"), args.ma_keys, args.ma_other_keys,
                                           args.value_size, args.ma_baseline, args.ma_writers,
                                           args.ma_readers, args.copy_root, args.copy_commit,
                                           compaction_entries=args.ma_compaction_entries)
    write_result("member_add", payload, args.out)


def cmd_latency(args: argparse.Namespace) -> None:
    import latency_trace
    payload = header(args, machine())
    payload["latency"] = latency_trace.run(temp_root("kvs-suite-lat-"), random_value(args.value_size), args.seconds,
                                           with_etcd=not args.skip_etcd)
    write_result("latency", payload, args.out)


def cmd_report(args: argparse.Namespace) -> None:
    import report
    verdicts = report.generate(args.readme, RESULTS_DIR, with_plots=not args.no_plots)
    progress(f"report: {args.readme} and the plots in {RESULTS_DIR} regenerated")
    for v in verdicts:
        print(report.verdict_line(v))


SCENARIOS = {"throughput": cmd_throughput, "scaling": cmd_scaling, "failover": cmd_failover, "size": cmd_size,
             "view-change": cmd_view_change, "profile": cmd_profile, "member-add": cmd_member_add,
             "latency": cmd_latency}


def cmd_all(args: argparse.Namespace) -> None:
    for name, func in SCENARIOS.items():
        progress(f"=== {name} ===")
        func(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="scenario", required=True)

    def scenario(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        return p

    common = []
    for name, func, help_ in (("throughput", cmd_throughput, "one group vs etcd vs Flask dict, 1..64 clients"),
                              ("scaling", cmd_scaling, "1, 2, 3 groups; CPU-seconds per operation"),
                              ("failover", cmd_failover, "SIGKILL the leader; time to the next write"),
                              ("size", cmd_size, "RSS, snapshot size, restart time against keys"),
                              ("view-change", cmd_view_change, "benchmarks/view_change.py with CPU accounting"),
                              ("profile", cmd_profile, "py-spy on the leader under load: what bounds a group"),
                              ("member-add", cmd_member_add, "one replica added to a shard: in place vs copy"),
                              ("latency", cmd_latency, "the steps of one write at 1 client, traced; etcd's p50"),
                              ("all", cmd_all, "every scenario, then the report")):
        common.append(scenario(name, func, help_))
    for p in common:
        p.add_argument("--seconds", type=float, default=10.0, help="length of each measurement (throughput, scaling)")
        p.add_argument("--warmup", type=float, default=harness.WARMUP_SECONDS, help="warm-up thrown away before each")
        p.add_argument("--value-size", type=int, default=256, help="value size in bytes, every system")
        p.add_argument("--clients", default="1,4,16,64", help="throughput: concurrent clients")
        p.add_argument("--repeat", type=int, default=1,
                       help="throughput: rounds of the whole sequence; each cell reports the median round")
        p.add_argument("--systems", default="kvs-leader,kvs-follower,etcd-leader,etcd-follower,flask-dict",
                       help="throughput: which systems and entry points")
        p.add_argument("--groups", default="1,2,3", help="scaling: group counts")
        p.add_argument("--clients-per-group", type=int, default=16, help="scaling: wrk connections per group")
        p.add_argument("--rounds", type=int, default=5, help="failover: leader kills per system")
        p.add_argument("--keys", default="100000,300000", help="size: key counts, loaded in stages")
        p.add_argument("--vc-keys", type=int, default=100_000, help="view-change: keys loaded before the change")
        p.add_argument("--vc-baseline", type=float, default=8.0, help="view-change: seconds of load before it")
        p.add_argument("--vc-rate", type=float, default=200.0,
                       help="view-change: writes/s per key set of the second, fixed-rate run (0: closed loop only)")
        p.add_argument("--profile-ops", default="write,read", help="profile: operations to profile")
        p.add_argument("--profile-clients", type=int, default=16, help="profile: hey clients")
        p.add_argument("--profile-via", default="leader", help="profile: leader, follower or both (comma-separated)")
        p.add_argument("--ma-keys", type=int, default=100_000, help="member-add: keys in the shard that grows")
        p.add_argument("--ma-other-keys", type=int, default=None,
                       help="member-add: keys in the other shard (default: as many as --ma-keys)")
        p.add_argument("--ma-baseline", type=float, default=10.0, help="member-add: seconds of clients before it")
        p.add_argument("--ma-writers", type=int, default=4, help="member-add: writer threads on the shard's keys")
        p.add_argument("--ma-readers", type=int, default=4, help="member-add: reader threads on the shard's keys")
        p.add_argument("--ma-compaction-entries", type=int, default=None,
                       help="member-add: KVS_COMPACTION_ENTRIES of the nodes (default: the nodes' own default)")
        p.add_argument("--copy-root", default=None,
                       help="member-add: a checkout of the copy design's commit (its .venv is used if present); "
                            "default: git archive of --copy-commit")
        p.add_argument("--copy-commit", default="23bf04a", help="member-add: the copy design's commit")
        p.add_argument("--skip-etcd", action="store_true", help="measure kvs (and Flask) only")
        p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<scenario>.json)")
        p.add_argument("--no-report", action="store_true", help="do not regenerate plots and README afterwards")
    rp = scenario("report", cmd_report, "plots and README section from benchmarks/results/*.json")
    rp.add_argument("--readme", default=README)
    rp.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    harness.sigterm_as_interrupt()
    try:
        args.func(args)
    except KeyboardInterrupt:
        progress("interrupted; every process started has been stopped")
        return 130
    if args.scenario != "report" and not args.no_report and args.out is None:
        cmd_report(argparse.Namespace(readme=README, no_plots=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
