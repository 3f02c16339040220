"""Ad-hoc timeline of forwarded writes from latency_trace's events (docs/design/one-client-latency.md,
"Commit on the leader's word"). Usage: python timeline.py ROOT BENCHMARKS_DIR: traces a 3-replica group
at 1 client via a follower into ROOT (with --hops events) unless ROOT exists, then prints each event's
time after the request was parsed (µs, p50 / p90), taking the first such event of each write."""
import sys, os, statistics, glob
sys.path.insert(0, sys.argv[2])
import latency_trace as lt
root = sys.argv[1]
if not os.path.exists(root):
    lt.trace_kvs(root, "v"*256, 6, "on", "follower", True)
# parse
events = []
import json
files = glob.glob(os.path.join(root, "traces", "*"))
# identify leader: who logs send:append_entries most
per = {}
for p in files:
    ev = lt.load(p, os.path.basename(p))
    per[os.path.basename(p)] = ev
leader = max(per, key=lambda k: sum(1 for e in per[k] if e[2]=="send:append_entries"))
entry = max((k for k in per if k != leader), key=lambda k: sum(1 for e in per[k] if e[2]=="http_in"))
for k, ev in per.items():
    who = "L" if k == leader else "E" if k == entry else "O"
    events += [(t, who, lab) for t, _, lab in ev]
events.sort()
spans, cur = [], None
for t, who, lab in events:
    if who == "E" and lab == "http_in": cur = [(t, who, lab)]
    elif cur is not None:
        cur.append((t, who, lab))
        if who == "E" and lab == "http_out": spans.append(cur); cur = None
marks = [("E","send:kvs_forward"),("L","recv:kvs_forward"),("L","append"),("L","send:append_entries"),
         ("E","recv:append_entries"),("E","append"),("E","fsynced"),("E","send:next_node_idx"),
         ("L","fsynced"),("L","send:kvs_forward_placed"),("E","polled+"),("E","decode+"),("E","recv:kvs_forward_placed"),
         ("O","recv:append_entries"),("O","fsynced"),("L","recv:next_node_idx"),
         ("E","callback"),("E","forward_resumed"),("E","http_out")]
rows = {m: [] for m in marks}
for s in spans:
    t0 = s[0][0]
    if not any(l == "recv:kvs_forward_placed" for _, _, l in s): continue
    for m in marks:
        if m[1].endswith("+"):
            ack = next((t for t, w, l in s if (w, l) == ("E","send:next_node_idx")), None)
            t = next((t for t, w, l in s if ack and t > ack and (w, l) == (m[0], m[1][:-1])), None)
        else:
            t = next((t for t, w, l in s if (w, l) == m), None)
        if t is not None: rows[m].append((t - t0)/1000)
tot = sorted((s[-1][0]-s[0][0])/1000 for s in spans if any(l == "send:kvs_forward" for _, w, l in s))
print(len(spans), "spans; all forwarded writes: p50 %.0f p90 %.0f" % (statistics.median(tot), tot[int(.9*(len(tot)-1))]))
for m in marks:
    v = sorted(rows[m])
    if v: print(f"{m[0]} {m[1]:28s} n={len(v):5d} p50 {statistics.median(v):7.0f} p90 {v[int(.9*(len(v)-1))]:7.0f}")
