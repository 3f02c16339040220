"""System calls per write at 1 client, per kvs process: `strace -c -f` on each replica of one group.

    python benchmarks/syscalls_per_write.py [--via leader|follower] [--writes N]

Starts one 3-replica group (fsync on), warms it up, then attaches `strace -c -f` to the three
processes twice for the same length of time: once idle (ticks, heartbeats) and once while hey sends
N writes one at a time. Prints each process's system calls per write, idle counts subtracted. Under
strace every call is slow, so only the counts mean anything, not the times. Needs strace and hey.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import one_group  # noqa: E402


def traced(pids: dict[str, int], out_dir: str, tag: str) -> dict[str, tuple[subprocess.Popen, str]]:
    """strace -c -f attached to every process; returns once every thread of each is traced."""
    running = {}
    for address, pid in pids.items():
        path = os.path.join(out_dir, f"{tag}-{pid}.txt")
        running[address] = (subprocess.Popen(["strace", "-c", "-f", "-o", path, "-p", str(pid)],
                                             stderr=subprocess.DEVNULL), path)
    deadline = time.monotonic() + 20
    while not all(_all_threads_traced(pid) for pid in pids.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("strace did not attach to every thread within 20 s")
        time.sleep(0.05)        # polling /proc for the attach, with a deadline
    return running


def _all_threads_traced(pid: int) -> bool:
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                if any(line.startswith("TracerPid:") and line.split()[1] == "0" for line in f):
                    return False
        except FileNotFoundError:
            continue        # a thread that ended meanwhile
    return True


def stopped(running: dict[str, tuple[subprocess.Popen, str]]) -> dict[str, dict[str, int]]:
    """Detach every strace (SIGINT) and read its summary: {address: {syscall: calls}}."""
    counts = {}
    for address, (process, path) in running.items():
        process.send_signal(2)
        process.wait(30)
        calls = {}
        with open(path) as f:
            for line in f:
                parts = line.split()
                # "% time seconds usecs/call calls [errors] syscall"
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    calls[parts[-1]] = int(parts[3])
        counts[address] = calls
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--via", choices=("leader", "follower"), default="leader")
    parser.add_argument("--writes", type=int, default=2000)
    args = parser.parse_args()
    with one_group("kvs-syscalls-") as (cluster, leader, pids):
        root = cluster.data_root
        follower = next(a for a in cluster.view if a != leader)
        entry = leader if args.via == "leader" else follower
        body = json.dumps({"value": "x" * 256})
        hey = ["hey", "-c", "1", "-m", "PUT", "-T", "application/json", "-d", body, f"http://{entry}/kvs/keys/k"]
        subprocess.run(hey[:1] + ["-n", "500"] + hey[1:], capture_output=True, check=True, timeout=120)
        running = traced(pids, root, "load")
        started = time.monotonic()
        subprocess.run(hey[:1] + ["-n", str(args.writes)] + hey[1:], capture_output=True, check=True, timeout=600)
        seconds = time.monotonic() - started
        load = stopped(running)
        running = traced(pids, root, "idle")
        time.sleep(seconds)         # the same length of time with no requests: the idle baseline
        idle = stopped(running)
    roles = {leader: "leader", follower: "entry follower" if args.via == "follower" else "follower"}
    print(f"system calls per write, {args.writes} writes via the {args.via} at 1 client "
          f"({seconds:.1f} s traced), idle counts of the same length subtracted")
    for address in pids:
        per_write = {name: (calls - idle[address].get(name, 0)) / args.writes
                     for name, calls in load[address].items()}
        shown = sorted(((v, k) for k, v in per_write.items() if v >= 0.05), reverse=True)
        total = sum(v for v, _ in shown)
        print(f"  {roles.get(address, 'other follower')} ({address}): {total:.1f} in all")
        print("    " + ", ".join(f"{k} {v:.1f}" for v, k in shown))


if __name__ == "__main__":
    main()
