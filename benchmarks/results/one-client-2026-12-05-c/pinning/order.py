"""Measurement only: hey at 1 client via one follower, then the other, alternated on one cluster."""
import json, os, subprocess, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from harness import hey_command, one_group, parse_hey
with one_group("kvs-order-") as (cluster, leader, pids):
    fs = [x for x in pids if x != leader]
    body = json.dumps({"value": "x" * 256})
    for f in fs:
        subprocess.run(hey_command(f"http://{f}/kvs/keys/k", "PUT", body, 1, 3), capture_output=True, check=True)
    for _ in range(4):
        for f in fs:
            out = subprocess.run(hey_command(f"http://{f}/kvs/keys/k", "PUT", body, 1, 5), capture_output=True, text=True, check=True).stdout
            r = parse_hey(out)
            print(f"  via {f} {r['ok_rps']:6.0f}  {r['p50_ms']:.1f}  {r['p99_ms']:.1f}", flush=True)
