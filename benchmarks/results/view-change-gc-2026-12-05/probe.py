"""Diagnostic (measurement only): during a 2 -> 3 view change of view_change.py's setup, fixed-rate streams
(100/s each) straight to each source node, no forwarding: GET and PUT of a key it owns that stays; per
stream the p99 before and during the change and when the slow ones (> 20 ms) were due. Every node
logs each garbage collection over 5 ms (gc_log_sitecustomize.py, installed as its sitecustomize) in
its log under the cluster's directory; with DUMP=1, py-spy dumps of both sources every ~25 ms for 16 s
(dumper.sh; stall-dumps.txt is one such run, cut to the stalls).  Usage: [DUMP=1] python probe.py"""
import asyncio, collections, json, os, secrets, shutil, sys, tempfile, threading, time
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, os.path.join(REPO, "benchmarks")); sys.path.insert(0, REPO)
import requests
import view_change as vc
from kvs.http.aio.client import HttpClient
from kvs.testing.cluster import LocalCluster, find_free_base_port
from kvs.config.ring import HashRing

async def stream(address, method, key, rate, stop, out):
    client = HttpClient(max_idle_per_address=64)
    pending = set()
    async def one(due):
        try:
            body = json.dumps({"value": "v"}).encode() if method == "PUT" else b""
            st, _, _ = await client.request(address, method, f"/kvs/keys/{key}", {"Content-Type": "application/json"}, body, time.monotonic() + 30)
        except Exception:
            st = 0
        out.append((due, time.monotonic() - due, st))
    due = time.monotonic()
    while not stop.is_set():
        w = due - time.monotonic()
        if w > 0: await asyncio.sleep(w)
        t = asyncio.ensure_future(one(due)); pending.add(t); t.add_done_callback(pending.discard)
        due += 1 / rate
    if pending: await asyncio.wait(pending)
    client.close()

root = tempfile.mkdtemp(prefix="kvs-vc-probe-")
base = find_free_base_port(4)
site = tempfile.mkdtemp(prefix="kvs-gc-log-")
shutil.copy(os.path.join(HERE, "gc_log_sitecustomize.py"), os.path.join(site, "sitecustomize.py"))
cluster = LocalCluster(2, 1, root, base_port=base, secret=secrets.token_hex(8),
                       env={"PYTHONPATH": os.pathsep.join([site, os.path.abspath(REPO)])})
try:
    cluster.start(); cluster.wait_healthy(timeout=60)
    idle = cluster.add_idle_node(base + 2)
    n1, n2 = cluster.view[0], cluster.view[1]
    vc.load(n1, 100000, "x" * 100)
    old, new = HashRing(["1", "2"]), HashRing(["1", "2", "3"])
    stay = [k for k in (f"hot-{i}" for i in range(2000)) if old.group_for(k) == new.group_for(k)]
    k1 = next(k for k in stay if old.group_for(k) == "1"); k2 = next(k for k in stay if old.group_for(k) == "2")
    streams = {"n1 GET": (n1, "GET", k1), "n1 PUT": (n1, "PUT", k1), "n2 GET": (n2, "GET", k2), "n2 PUT": (n2, "PUT", k2)}
    outs = {s: [] for s in streams}
    stop = threading.Event()
    def run():
        loop = asyncio.new_event_loop(); asyncio.set_event_loop(loop)
        loop.run_until_complete(asyncio.gather(*(stream(a, m, k, 100, stop, outs[s]) for s, (a, m, k) in streams.items())))
    th = threading.Thread(target=run); th.start()
    time.sleep(3)
    dumpers = []
    if os.environ.get("DUMP"):          # DUMP=1: py-spy dump of both sources every ~25 ms (dumper.sh)
        import subprocess
        for ad, nd in cluster.nodes.items():
            if ad in (n1, n2):
                dumpers.append(subprocess.Popen([os.path.join(HERE, "dumper.sh"), str(nd.process.pid),
                                                 os.path.join(root, f"dump-{ad.split(':')[1]}.txt"), "16"]))
    t0 = time.monotonic()
    r = requests.put(f"http://{n1}/kvs/view-change", json={"view": ",".join(cluster.view + [idle])}, timeout=600)
    took = time.monotonic() - t0
    time.sleep(1); stop.set(); th.join(60)
    for d in dumpers:
        d.wait(60)
    print("logs in", os.path.join(root, "logs"))
    print("change", r.status_code, round(took, 1), "s", "started", time.strftime("%H:%M:%S", time.localtime(time.time() - (time.monotonic() - t0))))
    for s, ops in outs.items():
        before = [l for d, l, st in ops if d < t0]; during = [l for d, l, st in ops if t0 <= d < t0 + took]
        slow = collections.Counter(int((d - t0) * 2) / 2 for d, l, st in ops if t0 <= d < t0 + took and l > 0.02)
        print(f"{s}: before p99 {vc.percentile(before, 99)*1000:.1f} ms, during p50 {vc.percentile(during, 50)*1000:.1f} p99 {vc.percentile(during, 99)*1000:.1f} max {max(during)*1000:.0f} ms; slow>20ms by 0.5 s: {sorted(slow.items())}")
finally:
    cluster.stop()
