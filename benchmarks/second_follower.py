"""What the second follower costs a write at 1 client: hey against the leader of one 3-replica group
(or, with `--via follower`, against one of its followers), alternating both followers running and
the other one stopped (SIGSTOP; the leader and the remaining follower are still a majority, so writes
commit as before).

    python benchmarks/second_follower.py [--pairs 3] [--seconds 5] [--via leader|follower]

With one follower stopped, the leader gets one acknowledgement per write instead of two, and the two
vCPUs carry one process fewer; the difference in p50 bounds what the second follower's work (its
AppendEntries, fsync and acknowledgement, and the leader's handling of that acknowledgement while it
answers the request) adds to a write. The stopped follower is always continued, also on errors; a
row is marked when the leader changed meanwhile (a follower stopped longer than an election timeout
may campaign when it is continued), since it then measured another path.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import hey_command, one_group, parse_hey  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--via", choices=("leader", "follower"), default="leader",
                        help="the entry node; via a follower, the other follower is the one stopped")
    args = parser.parse_args()
    with one_group("kvs-second-follower-") as (cluster, leader, pids):
        followers = [address for address in pids if address != leader]
        entry = leader if args.via == "leader" else followers[0]
        stopped = pids[followers[1]]
        body = json.dumps({"value": "x" * 256})
        hey = hey_command(f"http://{entry}/kvs/keys/k", "PUT", body, 1, args.seconds)
        subprocess.run(hey, capture_output=True, check=True, timeout=args.seconds + 60)      # warm-up
        print(f"writes at 1 client via the {args.via}: req/s, p50 ms, p99 ms")
        for _ in range(args.pairs):
            for one_stopped in (False, True):
                if one_stopped:
                    os.kill(stopped, signal.SIGSTOP)
                try:
                    out = subprocess.run(hey, capture_output=True, text=True, check=True,
                                         timeout=args.seconds + 60).stdout
                finally:
                    if one_stopped:
                        os.kill(stopped, signal.SIGCONT)
                r = parse_hey(out)
                label = "one follower stopped" if one_stopped else "both followers      "
                now = cluster.leader_of("1")
                moved = "" if now == leader else f"  (the leader is now {now}: not comparable)"
                print(f"  {label}  {r['ok_rps']:6.0f}  {r['p50_ms']:.1f}  {r['p99_ms']:.1f}{moved}", flush=True)


if __name__ == "__main__":
    main()
