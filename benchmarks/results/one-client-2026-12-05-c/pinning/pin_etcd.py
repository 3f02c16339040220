"""Measurement only: etcd's write at 1 client with each member's threads pinned as pin.py pins kvs."""
import argparse, base64, json, os, subprocess, sys, tempfile
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from harness import EtcdCluster, hey_command, parse_hey, shielded

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
etcd = EtcdCluster(tempfile.mkdtemp(prefix="etcd-pin-")).start()
try:
    li = etcd.leader_index()
    fi = [(li + 1) % 3, (li + 2) % 3]
    entry = li if a.via == "leader" else fi[0]
    pids = [pr.pid for pr in etcd.processes]
    layout = {pids[li]: {0}, pids[fi[0]]: {1}, pids[fi[1]]: {a.other}}
    body = json.dumps({"key": base64.b64encode(b"k").decode(), "value": base64.b64encode(b"x" * 256).decode()})
    hey = hey_command(f"{etcd.clients[entry]}/v3/kv/put", "POST", body, 1, a.seconds)
    subprocess.run(hey, capture_output=True, check=True, timeout=a.seconds + 60)
    print(f"etcd writes at 1 client via the {a.via}, other follower on CPU {a.other}: req/s, p50, p99")
    for _ in range(a.pairs):
        for pinned in (False, True):
            for pid, cpus in layout.items():
                pin(pid, cpus if pinned else {0, 1})
            out = subprocess.run(hey, capture_output=True, text=True, check=True, timeout=a.seconds + 60).stdout
            r = parse_hey(out)
            print(f"  {'pinned  ' if pinned else 'unpinned'} {r['ok_rps']:6.0f}  {r['p50_ms']:.1f}  {r['p99_ms']:.1f}", flush=True)
finally:
    shielded(etcd.stop)
