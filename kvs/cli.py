"""Command line: `kvs serve`, `kvs local up`, view changes, and a small client (`put`, `get`, `delete`, `status`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import tempfile



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
    try:
        server.listen()
    except OSError as exc:
        print(f"kvs serve: cannot listen on {settings.bind_host}:{settings.http_port}: {exc}", file=sys.stderr)
        return 1
    server.start()
    server.serve()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def local_up(args: argparse.Namespace) -> int:
    try:
        from kvs.testing.cluster import LocalCluster
    except ImportError:
        print("kvs local: the local-cluster launcher (kvs.testing) is a development tool and is not "
              "installed here (the Docker image leaves it out)", file=sys.stderr)
        return 2

    data_root = args.data_dir or tempfile.mkdtemp(prefix="kvs-local-")
    secret = args.secret or os.environ.get("KVS_SECRET") or secrets.token_hex(16)
    token = os.environ.get("KVS_ADMIN_TOKEN") or secrets.token_hex(16)
    cluster = LocalCluster(args.shards, args.replicas, data_root, base_port=args.base_port, secret=secret,
                           env={"KVS_ADMIN_TOKEN": token})
    signal.signal(signal.SIGTERM, _interrupt)     # `kill` stops the nodes too, like Ctrl-C
    cluster.start()
    try:
        cluster.wait_healthy(timeout=60)
        print(f"kvs: {args.shards} shard(s) x {args.replicas} replica(s) up; data and logs in {data_root}")
        for shard in range(1, args.shards + 1):
            print(f"  shard {shard}: " + "  ".join(f"http://{a}" for a in cluster.replicas_of(str(shard))))
        print(f"  try: python -m kvs put hello world --node {cluster.view[0]}")
        print(f"  view changes need the admin token: export KVS_ADMIN_TOKEN={token}")
        print("Ctrl-C stops every node.", flush=True)
        for node in cluster.nodes.values():
            node.process.wait()
    except KeyboardInterrupt:
        pass
    except TimeoutError as exc:
        print(f"kvs: cluster did not become healthy: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    return 0


def _version_or_any(text: str) -> int | str:
    if text == "*":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError("a version is a non-negative integer (or * for any)")
    return int(text)


def client_command(args: argparse.Namespace) -> int:
    import requests

    from kvs.client import KvsClient

    client = KvsClient(args.node)
    try:
        if args.command == "put":
            status, body = client.put(args.key, args.value, if_match=args.if_match, if_none_match=args.if_none_match)
        elif args.command == "get":
            status, body = client.get(args.key)
        elif args.command == "delete":
            status, body = client.delete(args.key, if_match=args.if_match)
        elif args.command == "set-many":
            status, body = client.set_many(_pairs(args.pairs, args.source), request_id=args.request_id)
        elif args.command == "get-many":
            status, body = client.get_many(args.keys)
        elif args.command == "exists":
            status, body = client.exists_many(args.keys)
        elif args.command == "fetch-all":
            status, body = client.fetch_all()
        else:
            status, body = client.status()
    except requests.RequestException as exc:
        print(f"kvs: cannot reach {args.node}: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(body, indent=2))
    return 0 if status < 400 else 1


def _pairs(pairs: list[str], source: str | None) -> list:
    """KEY=VALUE arguments (strings), then the pairs of a seed-004 JSON file (- for stdin), which may be binary."""
    from kvs.client import data_value

    out = []
    for text in pairs:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise SystemExit(f"kvs: {text!r} is not KEY=VALUE")
        out.append((key, value))
    if source:
        try:
            if source == "-":
                items = json.load(sys.stdin)
            else:
                with open(source, encoding="utf-8") as f:
                    items = json.load(f)
            out.extend((data_value(item["key"]), data_value(item["value"])) for item in items)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"kvs: cannot read pairs from {source}: {exc}") from None
    return out


def view_change(args: argparse.Namespace) -> int:
    """PUT /kvs/view-change, showing the coordinator's progress until it answers."""
    body = {"view": args.view}
    if args.repl_factor is not None:
        body["repl-factor"] = args.repl_factor
    return _change_with_progress(args.node, "/kvs/view-change", body, args.token)


def add_member(args: argparse.Namespace) -> int:
    """PUT /kvs/view-change/add-member: an idle node joins a shard (a view change, with its progress)."""
    return _change_with_progress(args.node, "/kvs/view-change/add-member",
                                 {"address": args.address, "shard-id": args.shard_id}, args.token)


def remove_member(args: argparse.Namespace) -> int:
    """PUT /kvs/view-change/remove-member: a node leaves the view (a view change, with its progress)."""
    return _change_with_progress(args.node, "/kvs/view-change/remove-member", {"address": args.address}, args.token)


def _change_with_progress(node: str, path: str, body: dict, token: str | None = None) -> int:
    """PUT a view change to `node`, drawing the coordinator's progress bar until it answers."""
    import threading

    import requests

    outcome: dict = {}

    def change() -> None:
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            resp = requests.put(f"http://{node}{path}", json=body, headers=headers, timeout=600)
            outcome["status"], outcome["body"] = resp.status_code, resp.json()
        except (requests.RequestException, ValueError) as exc:
            outcome["status"], outcome["body"] = 0, {"error": str(exc)}

    worker = threading.Thread(target=change, daemon=True)
    worker.start()
    while worker.is_alive():
        try:
            p = requests.get(f"http://{node}/kvs/view-change", timeout=2).json()["progress"]
            done = p["moves-done"] / p["moves-total"] if p["moves-total"] else 0.0
            bar = "#" * int(30 * done)
            print(f"\r[{bar:<30}] {p['phase']:<12} ranges {p['moves-done']}/{p['moves-total']} "
                  f"keys moved {p['keys-moved']}", end="", file=sys.stderr, flush=True)
        except (requests.RequestException, ValueError, KeyError):
            pass
        worker.join(0.2)
    print(file=sys.stderr)
    print(json.dumps(outcome["body"], indent=2))
    return 0 if outcome["status"] == 200 else 1


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvs", description="A sharded, replicated key-value store.")
    sub = parser.add_subparsers(dest="command", required=True)

    default_node = os.environ.get("KVS_NODE", "127.0.0.1:13800")
    p = sub.add_parser("serve", help="run one node (settings from flags or ADDRESS, VIEW, REPL_FACTOR, ...)")
    p.add_argument("--address", help="host:port of this node's HTTP API (ADDRESS)")
    p.add_argument("--view", help="comma-separated addresses of every node (VIEW)")
    p.add_argument("--repl-factor", type=int, help="replicas per shard (REPL_FACTOR)")
    p.add_argument("--data-dir", help="Raft journals and snapshots (DATA_DIR)")
    p.add_argument("--secret", help="cluster secret (KVS_SECRET); prefer the environment variable")
    p.add_argument("--raft-port-offset", type=int, help="Raft port = HTTP port + offset x (slot+1)")
    p.add_argument("--listen", help="interface the HTTP server binds (KVS_LISTEN)")
    p.set_defaults(run=serve)

    vc = sub.add_parser("view-change", help="change the view of a running cluster, with a progress bar")
    vc.add_argument("view", help="comma-separated addresses of the new view")
    vc.add_argument("--repl-factor", type=int, help="replicas per shard (default: keep)")
    vc.add_argument("--node", default=default_node, help="host:port of any node of the current view")
    vc.add_argument("--token", default=os.environ.get("KVS_ADMIN_TOKEN"),
                        help="the cluster's admin token (KVS_ADMIN_TOKEN)")
    vc.set_defaults(run=view_change)

    am = sub.add_parser("add-member", help="add an idle node to a shard (a view change), with a progress bar")
    am.add_argument("address", help="host:port of the idle node")
    am.add_argument("--shard-id", required=True, help="the shard it joins")
    am.add_argument("--node", default=default_node, help="host:port of any node of the current view")
    am.add_argument("--token", default=os.environ.get("KVS_ADMIN_TOKEN"),
                        help="the cluster's admin token (KVS_ADMIN_TOKEN)")
    am.set_defaults(run=add_member)

    rm = sub.add_parser("remove-member", help="take a node out of the view (a view change), with a progress bar")
    rm.add_argument("address", help="host:port of the node that leaves")
    rm.add_argument("--node", default=default_node, help="host:port of any node of the current view")
    rm.add_argument("--token", default=os.environ.get("KVS_ADMIN_TOKEN"),
                        help="the cluster's admin token (KVS_ADMIN_TOKEN)")
    rm.set_defaults(run=remove_member)

    h = sub.add_parser("health", help="check this node's /readyz, or /livez with --live (port from ADDRESS)")
    h.add_argument("--live", action="store_true",
                   help="liveness only (the Docker HEALTHCHECK: a node without a leader for a moment, or idle, "
                        "is live)")
    h.set_defaults(run=health)

    local = sub.add_parser("local", help="run a cluster of local processes")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    up = local_sub.add_parser("up", help="start a cluster on 127.0.0.1 until Ctrl-C")
    up.add_argument("--shards", type=int, default=2)
    up.add_argument("--replicas", type=int, default=3)
    up.add_argument("--base-port", type=int, default=13800)
    up.add_argument("--data-dir", help="where nodes keep data and logs (default: a new temp dir)")
    up.add_argument("--secret", help="cluster secret (default: KVS_SECRET or a random one)")
    up.set_defaults(run=local_up)

    for name, extra in (("put", ("key", "value")), ("get", ("key",)), ("delete", ("key",)), ("status", ())):
        c = sub.add_parser(name, help=f"{name} through a running node")
        for arg in extra:
            c.add_argument(arg)
        c.add_argument("--node", default=default_node, help="host:port of any node (KVS_NODE)")
        if name in ("put", "delete"):
            c.add_argument("--if-match", metavar="VERSION", type=_version_or_any,
                           help="compare-and-set: only if the key is at this version (from get's \"version\"), "
                                "or * (only if it exists); 412 otherwise")
        if name == "put":
            c.add_argument("--if-none-match", action="store_true", help="create only: 412 if the key exists")
        c.set_defaults(run=client_command)

    batches = (("set-many", "write pairs in one batch (PUT /set): KEY=VALUE ... and/or --from a seed-004 JSON file"),
               ("get-many", "read keys in one batch (POST /fetch)"), ("exists", "which keys exist (POST /query)"),
               ("fetch-all", "every pair of the store (GET /fetch)"))
    for name, text in batches:
        c = sub.add_parser(name, help=text)
        if name == "set-many":
            c.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
            c.add_argument("--from", dest="source", metavar="FILE",
                           help='a JSON list of {"key": {"encoding", "data"}, "value": {...}} (- for stdin)')
            c.add_argument("--request-id", help="Idempotency-Key: a retry with it is applied once per pair")
        elif name != "fetch-all":
            c.add_argument("keys", nargs="+", metavar="KEY")
        c.add_argument("--node", default=default_node, help="host:port of any node (KVS_NODE)")
        c.set_defaults(run=client_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("KVS_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return args.run(args)
