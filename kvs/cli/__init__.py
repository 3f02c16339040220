"""The `kvs` command: nodes (`serve`, `health`, `local up|down`), data (`put`, `get`, batches, `shards`,
`key-count`, `status`) and view changes, with etcdctl's conventions: errors on stderr, distinct exit
codes (`kvs.cli.output`), `-o json|value|table`, `--endpoints`, `--timeout`."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from kvs.cli import admin, backup, data, local
from kvs.logs import configure as configure_logging


def _version() -> str:
    try:
        return version("kvs")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvs", description="A sharded, replicated key-value store.")
    parser.add_argument("--version", action="version", version=f"kvs {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    local.add_parsers(sub)
    data.add_parsers(sub)
    admin.add_parsers(sub)
    backup.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    return args.run(args)
