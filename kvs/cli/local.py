"""The CLI's node commands: `serve` (one node), `health` (the container's check), `local up` / `local down`
(a cluster of local processes, for trying kvs out)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import time

RUN_FILE = "kvs-local.json"                     # in the data directory: the pids `local down` stops
# the last `local up`'s data directory: per user, not in the shared /tmp
LAST_FILE = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or os.path.expanduser("~/.cache"), "kvs", "local-last")


def serve(args: argparse.Namespace) -> int:
    """Run one node until SIGTERM or SIGINT (kvs.server)."""
    from kvs.errors import KvsError
    from kvs.server import NodeServer
    from kvs.settings import NodeSettings

    try:
        settings = NodeSettings.load(args)
    except KvsError as exc:
        print(f"kvs serve: {exc.message}", file=sys.stderr)
        return 2
    server = NodeServer(settings)
    # What exists now (modules, classes, the apps, the node before any group) lives as long as the
    # process: kept out of every later collection, so that a full one does not walk its ~45,000 objects
    # while every request of the node waits (benchmarks/README.md, "The view change, 2026-12-05").
    # Groups come later (the supervisor builds them) and stay collectable: a retired one is freed.
    gc.collect()
    gc.freeze()
    try:
        server.listen()
    except OSError as exc:
        print(f"kvs serve: cannot listen on {settings.bind_host}:{settings.http_port}: {exc}", file=sys.stderr)
        return 1
    server.start()
    server.serve()
    return 0


def health(args: argparse.Namespace) -> int:
    """Exit 0 if this container's node answers /readyz (or, with --live, /livez: the Docker
    HEALTHCHECK) with 200."""
    import requests

    from kvs.settings import parse_address

    port = parse_address(os.environ.get("ADDRESS", "127.0.0.1:13800"))[1]
    try:
        resp = requests.get(f"http://127.0.0.1:{port}/{'livez' if args.live else 'readyz'}", timeout=2)
    except requests.RequestException as exc:
        print(f"unreachable: {exc}", file=sys.stderr)
        return 1
    print(resp.text)
    return 0 if resp.status_code == 200 else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _taken(base_port: int, nodes: int) -> list[tuple[int, str]]:
    """The ports a local cluster needs (HTTP, and the Raft ports of slots 0 and 1) that are in use."""
    from kvs.settings import DEFAULT_RAFT_PORT_OFFSET

    taken = []
    for port in range(base_port, base_port + nodes):
        for p in (port, port + DEFAULT_RAFT_PORT_OFFSET, port + 2 * DEFAULT_RAFT_PORT_OFFSET):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", p))
                except OSError as exc:
                    taken.append((p, exc.strerror or str(exc)))
    return taken


def local_up(args: argparse.Namespace) -> int:
    try:
        from kvs.testing.cluster import LocalCluster
    except ImportError:
        print("kvs local: the local-cluster launcher (kvs.testing) is a development tool and is not "
              "installed here (the Docker image leaves it out)", file=sys.stderr)
        return 2
    taken = _taken(args.base_port, args.shards * args.replicas)
    if taken:
        port, why = taken[0]
        print(f"kvs local up: port {port} on 127.0.0.1 is not free ({why}); another kvs (`kvs local down`) or "
              f"another program holds it; choose other ports with --base-port", file=sys.stderr)
        return 1
    data_root = args.data_dir or tempfile.mkdtemp(prefix="kvs-local-")
    secret = args.secret or os.environ.get("KVS_SECRET") or secrets.token_hex(16)
    token = os.environ.get("KVS_ADMIN_TOKEN") or secrets.token_hex(16)
    cluster = LocalCluster(args.shards, args.replicas, data_root, base_port=args.base_port, secret=secret,
                           env={"KVS_ADMIN_TOKEN": token})
    signal.signal(signal.SIGTERM, _interrupt)     # `kill` (and `kvs local down`) stops the nodes too, like Ctrl-C
    cluster.start()
    run_file = os.path.join(data_root, RUN_FILE)
    try:
        pids = [os.getpid()] + [n.process.pid for n in cluster.nodes.values()]
        with open(run_file, "w") as f:     # pid and start time: a pid used again later is not ours
            json.dump({"launcher": _identity(os.getpid()), "nodes": [_identity(p) for p in pids[1:]]}, f)
        os.makedirs(os.path.dirname(LAST_FILE), exist_ok=True)
        with open(LAST_FILE, "w") as f:
            f.write(data_root)
        cluster.wait_healthy(timeout=60)
        print(f"kvs: {args.shards} shard(s) x {args.replicas} replica(s) up")
        for shard in range(1, args.shards + 1):
            print(f"  shard {shard}: " + "  ".join(f"http://{a}" for a in cluster.replicas_of(str(shard))))
        print(f"  data and logs: {data_root} (kept after the stop)")
        print(f"  secret: {secret} (KVS_SECRET of every node; in their environment only)")
        print(f"  view changes need the admin token: export KVS_ADMIN_TOKEN={token}")
        print(f"  try: kvs put hello world --node {cluster.view[0]}")
        print("Ctrl-C here, or `kvs local down` from another terminal, stops every node.", flush=True)
        for node in cluster.nodes.values():
            node.process.wait()
    except KeyboardInterrupt:
        pass
    except TimeoutError as exc:
        print(f"kvs: cluster did not become healthy: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        if os.path.exists(run_file):
            os.unlink(run_file)
    return 0


def local_down(args: argparse.Namespace) -> int:
    """Stop the cluster a `kvs local up` runs (its data directory's, or the last one started)."""
    data_root = args.data_dir
    if data_root is None and os.path.exists(LAST_FILE):
        with open(LAST_FILE) as f:
            data_root = f.read().strip()
    run_file = os.path.join(data_root or "", RUN_FILE)
    if not data_root or not os.path.exists(run_file):
        print("kvs local down: no running `kvs local up` found (give its --data-dir)", file=sys.stderr)
        return 1
    with open(run_file) as f:
        record = json.load(f)
    # the launcher stops its nodes (SIGTERM each) and exits; nodes whose launcher died are stopped here
    targets = [p for p in [record["launcher"], *record["nodes"]] if _alive(p)]
    signalled = [record["launcher"]] if _alive(record["launcher"]) else targets
    for pid, _ in signalled:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in targets) and time.monotonic() < deadline:
        time.sleep(0.1)                         # polling processes that are not our children, bounded
    left = [p[0] for p in targets if _alive(p)]
    if left:
        print(f"kvs local down: still running after 60 s: {left}", file=sys.stderr)
        return 1
    print(f"kvs: stopped the cluster of {data_root}")
    return 0


def _identity(pid: int) -> list | None:
    """[pid, its start time in clock ticks since boot] (/proc/<pid>/stat, field 22); None for a process
    that has exited and waits for its parent to reap it (a zombie)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else [pid, int(fields[19])]


def _alive(identity: list) -> bool:
    """Whether the process that was recorded still runs (the same pid and the same start time)."""
    try:
        return _identity(identity[0]) == list(identity)
    except (OSError, ValueError, IndexError):
        return False


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="run one node (settings from flags or ADDRESS, VIEW, REPL_FACTOR, ...)")
    p.add_argument("--address", help="host:port of this node's HTTP API (ADDRESS)")
    p.add_argument("--view", help="comma-separated addresses of every node (VIEW)")
    p.add_argument("--repl-factor", type=int, help="replicas per shard (REPL_FACTOR)")
    p.add_argument("--data-dir", help="Raft journals and snapshots (DATA_DIR)")
    p.add_argument("--secret", help="cluster secret (KVS_SECRET); prefer the environment variable")
    p.add_argument("--raft-port-offset", type=int, help="Raft port = HTTP port + offset x (slot+1)")
    p.add_argument("--listen", help="interface the HTTP server binds (KVS_LISTEN)")
    p.set_defaults(run=serve)

    h = sub.add_parser("health", help="check this node's /readyz, or /livez with --live (port from ADDRESS)")
    h.add_argument("--live", action="store_true",
                   help="liveness only (the Docker HEALTHCHECK: a node without a leader for a moment, or idle, "
                        "is live)")
    h.set_defaults(run=health)

    local = sub.add_parser("local", help="run a cluster of local processes")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    up = local_sub.add_parser("up", help="start a cluster on 127.0.0.1 until Ctrl-C or `kvs local down`")
    up.add_argument("--shards", type=int, default=2)
    up.add_argument("--replicas", type=int, default=3)
    up.add_argument("--base-port", type=int, default=13800)
    up.add_argument("--data-dir", help="where nodes keep data and logs (default: a new temp dir)")
    up.add_argument("--secret", help="cluster secret (default: KVS_SECRET or a random one)")
    up.set_defaults(run=local_up)
    down = local_sub.add_parser("down", help="stop the cluster of `kvs local up` (the last one, or --data-dir's)")
    down.add_argument("--data-dir", help="the data directory `local up` printed")
    down.set_defaults(run=local_down)
