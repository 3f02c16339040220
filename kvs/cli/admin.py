"""The CLI's view changes: view-change (and `view-change status`), add-member, remove-member, reshard.

A change runs on the coordinator while the command waits for its answer; on a
terminal a progress bar (rich) follows the coordinator's progress, elsewhere
one summary line goes to stderr at the end (no carriage-return frames in
files and pipes). Changes need the admin token (`--token` or KVS_ADMIN_TOKEN).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import kvs.cli.output as output
from kvs.cli.data import add_connection_options, call, endpoints


def view_change(args: argparse.Namespace) -> int:
    if args.view == "status":
        return call(args, lambda c: c._call("GET", "/kvs/view-change"))
    body = {"view": args.view}
    if args.repl_factor is not None:
        body["repl-factor"] = args.repl_factor
    return _change(args, "/kvs/view-change", body)


def add_member(args: argparse.Namespace) -> int:
    return _change(args, "/kvs/view-change/add-member", {"address": args.address, "shard-id": args.shard_id})


def remove_member(args: argparse.Namespace) -> int:
    return _change(args, "/kvs/view-change/remove-member", {"address": args.address})


def reshard(args: argparse.Namespace) -> int:
    return _change(args, "/kvs/reshard", {"shard-count": args.shard_count})


def _change(args: argparse.Namespace, path: str, body: dict) -> int:
    """PUT a change to the first endpoint that answers, following its progress until it answers."""
    import requests

    node = None
    for endpoint in endpoints(args):
        try:
            requests.get(f"http://{endpoint}/kvs/view-change", timeout=args.timeout)
            node = endpoint
            break
        except requests.RequestException:
            continue
    if node is None:
        return output.unreachable(endpoints(args), "no node answered")
    outcome: dict = {}

    def change() -> None:
        try:
            headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
            resp = requests.put(f"http://{node}{path}", json=body, headers=headers, timeout=600)
            outcome["status"], outcome["body"] = resp.status_code, resp.json()
        except (requests.RequestException, ValueError) as exc:
            outcome["status"], outcome["body"] = 0, {"error": str(exc)}

    worker = threading.Thread(target=change, daemon=True)
    worker.start()
    last = _follow(node, worker) if sys.stderr.isatty() else _wait(node, worker)
    if last is not None:
        print(f"view change: {last['phase']}, ranges {last['moves-done']}/{last['moves-total']}, "
              f"keys moved {last['keys-moved']}", file=sys.stderr)
    if outcome["status"] == 0:
        return output.unreachable([node], outcome["body"]["error"])
    return output.emit(args.command, outcome["status"], outcome["body"], args.output)


def _progress(node: str) -> dict | None:
    import requests

    try:
        return requests.get(f"http://{node}/kvs/view-change", timeout=2).json()["progress"]
    except (requests.RequestException, ValueError, KeyError):
        return None


def _wait(node: str, worker: threading.Thread) -> dict | None:
    last = None
    while worker.is_alive():
        last = _progress(node) or last
        worker.join(0.5)
    return _progress(node) or last


def _follow(node: str, worker: threading.Thread) -> dict | None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    last = None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                  transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("view change", total=1, detail="")
        while worker.is_alive():
            last = _progress(node) or last
            if last is not None:
                bar.update(task, total=max(1, last["moves-total"]), completed=last["moves-done"],
                           description=last["phase"] or "starting",
                           detail=f"ranges {last['moves-done']}/{last['moves-total']} keys moved {last['keys-moved']}")
            worker.join(0.2)
    return _progress(node) or last


def add_parsers(sub) -> None:
    def admin(name: str, text: str):
        p = sub.add_parser(name, help=text)
        p.add_argument("--token", default=os.environ.get("KVS_ADMIN_TOKEN"),
                       help="the cluster's admin token (KVS_ADMIN_TOKEN)")
        add_connection_options(p)
        return p

    vc = admin("view-change", "change the view of a running cluster; `view-change status` shows the one running")
    vc.add_argument("view", help='comma-separated addresses of the new view, or "status"')
    vc.add_argument("--repl-factor", type=int, help="replicas per shard (default: keep)")
    vc.set_defaults(run=view_change)
    am = admin("add-member", "add an idle node to a shard (in place: no key moves)")
    am.add_argument("address", help="host:port of the idle node")
    am.add_argument("--shard-id", required=True, help="the shard it joins")
    am.set_defaults(run=add_member)
    rm = admin("remove-member", "take a node (alive or dead) out of the view")
    rm.add_argument("address", help="host:port of the node that leaves")
    rm.set_defaults(run=remove_member)
    rs = admin("reshard", "the same nodes in another number of shards (keys move)")
    rs.add_argument("shard_count", type=int, metavar="SHARD_COUNT")
    rs.set_defaults(run=reshard)
