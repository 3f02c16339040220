"""CPU per write at 1 client, by process and thread, user and system time apart: hey against one
3-replica group through the leader or a follower, /proc's counters read around a steady window.

    python benchmarks/cpu_per_write.py [--via leader|follower] [--seconds 6]

Python 3.11 does not name its threads for the kernel, so threads are shown by id: the one whose id is
the process's is the event loop (HTTP, routing, batching); the busiest other one is the shard group's
tick thread (PySyncObj: messages, journal, fsync, apply). What the kernel spends for a thread (system
calls, context switches, the network stack, the virtual disk's doorbell) is its system time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import hey_command, one_group, parse_hey  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread's (user, system) clock ticks so far."""
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue                    # the thread ended meanwhile
        times[int(tid)] = (int(fields[11]), int(fields[12]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--via", choices=("leader", "follower"), default="leader")
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    with one_group("kvs-cpu-per-write-") as (cluster, leader, pids):
        entry = leader if args.via == "leader" else next(a for a in pids if a != leader)
        body = json.dumps({"value": "x" * 256})
        hey = subprocess.Popen(hey_command(f"http://{entry}/kvs/keys/k", "PUT", body, 1, args.seconds + 4),
                               stdout=subprocess.PIPE, text=True)
        time.sleep(2)                   # past the first writes: the window below is steady
        before = {address: thread_times(pid) for address, pid in pids.items()}
        started = time.monotonic()
        time.sleep(args.seconds)
        elapsed = time.monotonic() - started
        after = {address: thread_times(pid) for address, pid in pids.items()}
        result = parse_hey(hey.communicate(timeout=60)[0])
        writes = result["ok_rps"] * elapsed
        print(f"writes at 1 client via the {args.via}: p50 {result['p50_ms']} ms, {result['ok_rps']:.0f}/s; "
              f"µs of CPU per write, user / system")
        for address, pid in pids.items():
            role = "leader" if address == leader else ("entry follower" if address == entry else "follower")
            rows, total = [], [0.0, 0.0]
            for tid, (user, system) in sorted(after[address].items()):
                user0, system0 = before[address].get(tid, (0, 0))
                per = [(user - user0) / TICKS / writes * 1e6, (system - system0) / TICKS / writes * 1e6]
                total = [total[0] + per[0], total[1] + per[1]]
                if sum(per) >= 2:
                    name = "event loop" if tid == pid else f"thread {tid}"
                    rows.append(f"{name} {per[0]:.0f} / {per[1]:.0f}")
            print(f"  {role:14} {total[0]:4.0f} / {total[1]:3.0f}   ({'; '.join(rows)})")


if __name__ == "__main__":
    main()
