"""Measurement only: writes at 1 client (hey) with each node's threads pinned to one vCPU, alternated
with unpinned, on one running cluster of kvs (one 3-replica group) or etcd (3 members).
Layout: the leader on CPU 0, the entry follower (via the leader: the first follower) on CPU 1, the
other follower on CPU `--other`.

    python pin.py [--system kvs|etcd] [--via follower|leader] [--other 0|1] [--pairs 3] [--seconds 5]
"""
import argparse
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from harness import EtcdCluster, hey_command, one_group, parse_hey, shielded  # noqa: E402


def pin(pid, cpus):
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def kvs_group():
    """(url of each node by role, pid of each node): roles 'leader', 'follower-1', 'follower-2'."""
    with one_group("kvs-pin-") as (cluster, leader, pids):
        followers = [x for x in pids if x != leader]
        roles = {"leader": leader, "follower-1": followers[0], "follower-2": followers[1]}
        body = json.dumps({"value": "x" * 256})
        yield ({r: (f"http://{a}/kvs/keys/k", "PUT", body) for r, a in roles.items()},
               {r: pids[a] for r, a in roles.items()})


@contextlib.contextmanager
def etcd_group():
    etcd = EtcdCluster(tempfile.mkdtemp(prefix="etcd-pin-")).start()
    try:
        li = etcd.leader_index()
        order = {"leader": li, "follower-1": (li + 1) % 3, "follower-2": (li + 2) % 3}
        body = json.dumps({"key": base64.b64encode(b"k").decode(), "value": base64.b64encode(b"x" * 256).decode()})
        yield ({r: (f"{etcd.clients[i]}/v3/kv/put", "POST", body) for r, i in order.items()},
               {r: etcd.processes[i].pid for r, i in order.items()})
    finally:
        shielded(etcd.stop)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=("kvs", "etcd"), default="kvs")
    p.add_argument("--via", choices=("follower", "leader"), default="follower")
    p.add_argument("--other", type=int, choices=(0, 1), default=0)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    a = p.parse_args()
    with (kvs_group() if a.system == "kvs" else etcd_group()) as (requests_by_role, pids):
        layout = {pids["leader"]: {0}, pids["follower-1"]: {1}, pids["follower-2"]: {a.other}}
        url, method, body = requests_by_role["leader" if a.via == "leader" else "follower-1"]
        hey = hey_command(url, method, body, 1, a.seconds)
        subprocess.run(hey, capture_output=True, check=True, timeout=a.seconds + 60)      # warm-up
        print(f"{a.system} writes at 1 client via the {a.via}, other follower on CPU {a.other}: req/s, p50, p99")
        for _ in range(a.pairs):
            for pinned in (False, True):
                for pid, cpus in layout.items():
                    pin(pid, cpus if pinned else {0, 1})
                r = parse_hey(subprocess.run(hey, capture_output=True, text=True, check=True,
                                             timeout=a.seconds + 60).stdout)
                print(f"  {'pinned  ' if pinned else 'unpinned'} {r['ok_rps']:6.0f}  {r['p50_ms']:.1f}  "
                      f"{r['p99_ms']:.1f}", flush=True)


if __name__ == "__main__":
    main()
