"""The CLI's data commands: keys, batches, shards, key counts, status, through any of the endpoints.

Each command tries the endpoints in order (`--endpoints a,b,c`, or `--node`, or
KVS_ENDPOINTS, or KVS_NODE) until one answers; a write carries one
Idempotency-Key for all its attempts, so one that reached a node before it
stopped answering is still applied once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from typing import Callable

import kvs.cli.output as output

DEFAULT_ENDPOINT = "127.0.0.1:13800"


def endpoints(args: argparse.Namespace) -> list[str]:
    given = args.endpoints or args.node or os.environ.get("KVS_ENDPOINTS") or os.environ.get("KVS_NODE")
    found = [e.strip() for e in (given or DEFAULT_ENDPOINT).split(",") if e.strip()]
    return found or [DEFAULT_ENDPOINT]


def call(args: argparse.Namespace, request: Callable) -> int:
    """`request(client)` on each endpoint in turn until one answers; print its answer."""
    import requests

    from kvs.client import KvsClient

    last = "no endpoint"
    for endpoint in endpoints(args):
        try:
            status, body = request(KvsClient(endpoint, timeout=args.timeout))
        except requests.exceptions.ChunkedEncodingError as exc:
            # the node broke the answer off (a listing during a view change): not a short answer
            print(f"kvs: {endpoint} broke its answer off midway ({exc}); try again", file=sys.stderr)
            return output.UNAVAILABLE
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader, ValueError) as exc:
            print(f"kvs: {exc}", file=sys.stderr)
            return output.USAGE
        except requests.RequestException as exc:
            last = f"{endpoint}: {exc}"
            continue
        return output.emit(args.command, status, body, args.output)
    return output.unreachable(endpoints(args), last)


def key_command(args: argparse.Namespace) -> int:
    request_id = getattr(args, "request_id", None) or uuid.uuid4().hex       # one id for every attempt
    command = args.command
    if command == "put":
        return call(args, lambda c: c.put(args.key, args.value, request_id=request_id, if_match=args.if_match,
                                          if_none_match=args.if_none_match))
    if command == "get":
        return call(args, lambda c: c.get(args.key))
    if command == "delete":
        return call(args, lambda c: c.delete(args.key, request_id=request_id, if_match=args.if_match))
    if command == "set-many":
        pairs = _pairs(args.pairs, args.source)
        return call(args, lambda c: c.set_many(pairs, request_id=request_id))
    if command == "get-many":
        return call(args, lambda c: c.get_many(args.keys))
    if command == "exists":
        return call(args, lambda c: c.exists_many(args.keys))
    if command == "fetch-all":
        return call(args, lambda c: c.fetch_all())
    if command == "shards":
        return call(args, lambda c: c.shards())
    if command == "key-count":
        return call(args, lambda c: c.key_count() if args.shard_id is None else c.shard(args.shard_id))
    return call(args, lambda c: c.status())


def _pairs(pairs: list[str], source: str | None) -> list:
    """KEY=VALUE arguments (strings), then the pairs of a JSON file of {"key", "value"} items in the
    batch API's form (- for stdin), which may be binary."""
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


def _version_or_any(text: str) -> int | str:
    if text == "*":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError("a version is a non-negative integer (or * for any)")
    return int(text)


def add_connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoints", help="host:port of nodes to try in order, comma-separated (KVS_ENDPOINTS)")
    p.add_argument("--node", help="host:port of one node (KVS_NODE; default 127.0.0.1:13800)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per attempt (default 10)")
    p.add_argument("-o", "--output", choices=output.FORMATS, default="json",
                   help="json (default; indented on a terminal), value (what a script wants), table")


def add_parsers(sub) -> None:
    commands = [
        ("put", "write a key", ("key", "value")), ("get", "read a key", ("key",)),
        ("delete", "delete a key", ("key",)), ("status", "the node's status", ()),
        ("shards", "the shards of the cluster", ()),
        ("key-count", "keys on the node's shard, or --shard-id's", ()),
        ("set-many", "write pairs in one batch (PUT /set): KEY=VALUE ... and/or --from FILE", ()),
        ("get-many", "read keys in one batch (POST /fetch)", ()), ("exists", "which keys exist (POST /query)", ()),
        ("fetch-all", "every pair of the store (GET /fetch)", ()),
    ]
    for name, text, positional in commands:
        c = sub.add_parser(name, help=text)
        for arg in positional:
            c.add_argument(arg)
        if name in ("put", "delete"):
            c.add_argument("--if-match", metavar="VERSION", type=_version_or_any,
                           help="compare-and-set: only if the key is at this version (from get's \"version\"), "
                                "or * (only if it exists); exit 7 otherwise")
        if name == "put":
            c.add_argument("--if-none-match", action="store_true", help="create only: exit 7 if the key exists")
        if name == "set-many":
            c.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
            c.add_argument("--from", dest="source", metavar="FILE",
                           help='a JSON list of {"key": {"encoding", "data"}, "value": {...}} (- for stdin)')
        if name in ("put", "delete", "set-many"):
            c.add_argument("--request-id", help="Idempotency-Key (default: a new one for this command)")
        if name in ("get-many", "exists"):
            c.add_argument("keys", nargs="+", metavar="KEY")
        if name == "key-count":
            c.add_argument("--shard-id", help="a shard's key count instead of the node's own shard's")
        add_connection_options(c)
        c.set_defaults(run=key_command)
