"""Measurement only: hey at 1 client with each kvs process's threads pinned to one vCPU, alternated
with unpinned, on one cluster. Layout: leader -> CPU 0, entry follower -> CPU 1, other follower -> --other."""
import argparse, json, os, subprocess, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from harness import hey_command, one_group, parse_hey

def pin(pid, cpus):
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass

p = argparse.ArgumentParser()
p.add_argument("--pairs", type=int, default=3)
p.add_argument("--seconds", type=int, default=5)
p.add_argument("--via", default="follower")
p.add_argument("--other", type=int, default=0)
a = p.parse_args()
with one_group("kvs-pin-") as (cluster, leader, pids):
    followers = [x for x in pids if x != leader]
    entry = leader if a.via == "leader" else followers[0]
    other = followers[1] if a.via != "leader" else followers[0]
    layout = {pids[leader]: {0}, pids[entry]: {1}, pids[other]: {a.other}} if a.via != "leader" else \
             {pids[leader]: {0}, pids[followers[0]]: {1}, pids[followers[1]]: {a.other}}
    body = json.dumps({"value": "x" * 256})
    hey = hey_command(f"http://{entry}/kvs/keys/k", "PUT", body, 1, a.seconds)
    subprocess.run(hey, capture_output=True, check=True, timeout=a.seconds + 60)
    print(f"writes at 1 client via the {a.via}, other follower on CPU {a.other}: req/s, p50, p99")
    for _ in range(a.pairs):
        for pinned in (False, True):
            for pid, cpus in layout.items():
                pin(pid, cpus if pinned else {0, 1})
            out = subprocess.run(hey, capture_output=True, text=True, check=True, timeout=a.seconds + 60).stdout
            r = parse_hey(out)
            now = cluster.leader_of("1")
            print(f"  {'pinned  ' if pinned else 'unpinned'} {r['ok_rps']:6.0f}  {r['p50_ms']:.1f}  {r['p99_ms']:.1f}"
                  + ("" if now == leader else "  (leader moved)"), flush=True)
