"""How the CLI answers: the output formats, errors on stderr, and its exit codes.

    0  success                       5  unavailable (503: no leader, no quorum in time)
    1  any other failure             6  bad request (400, 405, 413)
    2  usage error (argparse)        7  conflict (409) or precondition failed (412)
    3  no endpoint answered          8  unauthorized (401: the admin token)
    4  not found (404)

`-o json` (the default) prints the answer's JSON, indented on a terminal and on
one line otherwise; `-o value` only what a script wants (a value, a version, a
count, one line per item, `key<TAB>value` for fetch-all; binary data in
base64); `-o table` a table (rich). An answer of 400 or more
goes to stderr, as JSON, and sets the exit code.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

OK, FAILED, USAGE, UNREACHABLE, NOT_FOUND, UNAVAILABLE, BAD_REQUEST, CONFLICT, UNAUTHORIZED = range(9)
FORMATS = ("json", "value", "table")

_BY_STATUS = {404: NOT_FOUND, 503: UNAVAILABLE, 400: BAD_REQUEST, 405: BAD_REQUEST, 413: BAD_REQUEST,
              409: CONFLICT, 412: CONFLICT, 401: UNAUTHORIZED}


def exit_code(status: int) -> int:
    return OK if status < 400 else _BY_STATUS.get(status, FAILED)


def emit(command: str, status: int, body: Any, fmt: str) -> int:
    """Print an answer in `fmt` (errors as JSON on stderr) and return the exit code."""
    if status >= 400:
        print(json.dumps(body), file=sys.stderr)
        return exit_code(status)
    if fmt == "value":
        _values(command, body)
    elif fmt == "table":
        _table(body)
    else:
        print(json.dumps(body, indent=2 if sys.stdout.isatty() else None, ensure_ascii=False))
    return OK


def unreachable(endpoints: list[str], error: str) -> int:
    print(f"kvs: no endpoint answered ({', '.join(endpoints)}): {error}", file=sys.stderr)
    return UNREACHABLE


def _data(obj: Any) -> Any:
    """A batch item's {"encoding", "data"} as what it stands for (bytes for binary data)."""
    if isinstance(obj, dict) and obj.get("encoding") == "binary":
        return base64.b64decode(obj.get("data", ""))
    if isinstance(obj, dict) and "data" in obj:
        return obj["data"]
    return obj


def _text(item: Any) -> str:
    """One field of a `-o value` line: binary data in base64 (a line per item stays a line)."""
    if isinstance(item, bytes):
        return base64.b64encode(item).decode("ascii")
    if isinstance(item, (dict, list)):
        return json.dumps(item, ensure_ascii=False)
    return "" if item is None else str(item).lower() if isinstance(item, bool) else str(item)


def _line(item: Any) -> None:
    print(_text(item))


def _values(command: str, body: Any) -> None:
    if command == "get":
        value = body.get("value")
        _line(base64.b64decode(value) if body.get("encoding") == "binary" else value)
    elif command in ("put", "delete"):
        _line(body.get("version", body.get("message")))
    elif command == "key-count":
        _line(body.get("key-count"))
    elif command == "shards":
        for shard in body.get("shards", []):
            _line(shard)
    elif command in ("get-many", "exists"):
        for item in body:
            _line(_data(item.get("value")))
    elif command == "fetch-all":
        for item in body:                   # key TAB value: a listing without its keys says nothing
            print(f"{_text(_data(item.get('key')))}\t{_text(_data(item.get('value')))}")
    elif command == "set-many":
        _line(body[0].get("keys_added") if body else 0)
    else:
        _line(body)


def _table(body: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = body if isinstance(body, list) else [body]
    table = Table(show_header=True)
    columns: list[str] = []
    for row in rows:
        for column in (row if isinstance(row, dict) else {"value": row}):
            if column not in columns:
                columns.append(column)
    for column in columns:
        table.add_column(column)
    for row in rows:
        row = row if isinstance(row, dict) else {"value": row}
        table.add_row(*[_cell(row.get(c)) for c in columns])
    Console().print(table)


def _cell(value: Any) -> str:
    value = _data(value)
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)
