"""`kvs snapshot save FILE` and `kvs snapshot restore FILE`: a backup of every shard, and its load into a
cluster of any shape.

save: with no view change running, every shard's pairs are read as of one moment each (after a read
index, `GET /kvs/shards/<id>/backup`), all at one epoch: if the epoch changed or a change started
meanwhile, nothing is written and the command fails (run it again). The file is JSON lines: a header
({"format", "epoch", "shards": {id: pairs}, "pairs"}), then one [key, value, version] per pair (binary
data as {"b64": ...}); it is written to FILE.tmp and renamed, so a FILE is always whole.

restore: the pairs go in through the batch API (`PUT /set`, up to 500 pairs or 512 KiB a request), so
the new cluster may have any number of shards; each request has an Idempotency-Key made of the file's
digest and its batch number, so a restore run again after a failure applies nothing twice. Keys get
new versions in the new cluster (a version is a shard's revision counter).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import kvs.cli.output as output
from kvs.cli.data import add_connection_options, endpoints

FORMAT = "kvs-snapshot/1"
BATCH_PAIRS = 500
BATCH_BYTES = 512 << 10


class Failed(Exception):
    """The command cannot go on; its message says why (stderr)."""


def _get(args: argparse.Namespace, path: str, token: bool = False) -> dict:
    import requests

    headers = {"Authorization": f"Bearer {args.token}"} if token and args.token else {}
    last = "no endpoint"
    for endpoint in endpoints(args):
        try:
            resp = requests.get(f"http://{endpoint}{path}", headers=headers, timeout=args.timeout)
        except requests.RequestException as exc:
            last = f"{endpoint}: {exc}"
            continue
        if resp.status_code != 200:
            raise Failed(f"GET {path}: {resp.status_code} {resp.text[:300]}")
        return resp.json()
    raise Failed(f"no endpoint answered: {last}")


def save(args: argparse.Namespace) -> int:
    from kvs.fsm.commands import items_from_json, items_to_json

    try:
        before = _get(args, "/kvs/view-change")
        if before.get("phase") is not None:
            raise Failed(f"a view change is running (phase {before['phase']}); save once it is done")
        shards = _get(args, "/kvs/shards")["shards"]
        parts = {sid: _get(args, f"/kvs/shards/{sid}/backup", token=True) for sid in shards}
        after = _get(args, "/kvs/view-change")
        epochs = {before["epoch"], after["epoch"], *(p["epoch"] for p in parts.values())}
        if len(epochs) != 1 or after.get("phase") is not None:
            raise Failed("the configuration changed during the backup; run it again")
        rows = {sid: items_from_json(p["items"]) for sid, p in parts.items()}
    except (Failed, ValueError, KeyError, TypeError) as exc:
        print(f"kvs snapshot save: {exc}", file=sys.stderr)
        return output.FAILED
    header = {"format": FORMAT, "epoch": before["epoch"], "shards": {sid: len(r) for sid, r in rows.items()},
              "pairs": sum(len(r) for r in rows.values())}
    tmp = args.file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for sid in shards:
            for row in items_to_json(rows[sid]):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, args.file)
    return output.emit("snapshot", 200, header, args.output)


def restore(args: argparse.Namespace) -> int:
    import requests

    from kvs.client import KvsClient, data_object
    from kvs.fsm.commands import items_from_json

    digest = hashlib.sha256()
    try:
        with open(args.file, encoding="utf-8") as f:
            header = json.loads(f.readline())
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise Failed(f"{args.file} is not a kvs snapshot ({FORMAT})")
            lines = f.readlines()
        for line in lines:
            digest.update(line.encode())
        rows = items_from_json([json.loads(line) for line in lines if line.strip()])
    except (OSError, ValueError, Failed) as exc:
        print(f"kvs snapshot restore: {exc}", file=sys.stderr)
        return output.FAILED
    batches, batch, size = [], [], 0
    for key, value, _ in rows:
        item = (key, value)
        weight = len(json.dumps([data_object(key), data_object(value)]))
        if batch and (len(batch) >= BATCH_PAIRS or size + weight > BATCH_BYTES):
            batches.append(batch)
            batch, size = [], 0
        batch.append(item)
        size += weight
    if batch:
        batches.append(batch)
    restored = 0
    for n, pairs in enumerate(batches):
        request_id = f"restore-{digest.hexdigest()[:24]}-{n}"
        for endpoint in endpoints(args):
            try:
                status, body = KvsClient(endpoint, timeout=args.timeout).set_many(pairs, request_id=request_id)
                break
            except requests.RequestException:
                continue
        else:
            return output.unreachable(endpoints(args), f"batch {n} of {len(batches)} not sent")
        if status != 200 or body[0]["keys_failed"]:
            print(f"kvs snapshot restore: batch {n} of {len(batches)}: {status} {json.dumps(body)[:500]}; "
                  f"run the restore again (what was written is not written twice)", file=sys.stderr)
            return output.exit_code(status) if status != 200 else output.UNAVAILABLE
        restored += body[0]["keys_added"]
    return output.emit("snapshot", 200, {"restored": restored, "from-epoch": header.get("epoch"),
                                         "pairs": header.get("pairs")}, args.output)


def add_parsers(sub) -> None:
    snapshot = sub.add_parser("snapshot", help="back up every shard to a file, or load such a file into a cluster")
    snapshot_sub = snapshot.add_subparsers(dest="snapshot_command", required=True)
    for name, run, text in (("save", save, "write every shard's pairs, at one epoch, to FILE"),
                            ("restore", restore, "write FILE's pairs into the cluster (any number of shards)")):
        p = snapshot_sub.add_parser(name, help=text)
        p.add_argument("file", metavar="FILE")
        p.add_argument("--token", default=os.environ.get("KVS_ADMIN_TOKEN"),
                       help="the cluster's admin token (KVS_ADMIN_TOKEN): reading every shard is an admin task")
        add_connection_options(p)
        p.set_defaults(run=run)
