"""Installed as a node's sitecustomize by probe.py: logs every garbage collection over 5 ms to stderr (the
node's log), with the tracked object count after a full one, and once the most common tracked types."""
import gc, sys, time, collections
_t = {"dumped": False}
def _cb(phase, info):
    if phase == "start":
        _t["s"] = time.perf_counter()
    else:
        d = time.perf_counter() - _t.get("s", time.perf_counter())
        if d > 0.005:
            objs = gc.get_objects() if info['generation'] == 2 else []
            sys.stderr.write(f"GCLOG {time.strftime('%H:%M:%S')} gen{info['generation']} {d*1000:.1f} ms collected {info['collected']} tracked {len(objs)}\n")
            if len(objs) > 100000 and not _t["dumped"]:
                _t["dumped"] = True
                c = collections.Counter(type(o).__name__ for o in objs)
                sys.stderr.write("GCTYPES " + repr(c.most_common(12)) + "\n")
                tl = [o for o in objs if type(o) is tuple][:5]
                sys.stderr.write("GCTUPLES " + repr([repr(t)[:150] for t in tl]) + "\n")
                ls = [o for o in objs if type(o) is list][:5]
                sys.stderr.write("GCLISTS " + repr([repr(t)[:150] for t in ls]) + "\n")
            sys.stderr.flush()
gc.callbacks.append(_cb)
