"""The REST API's response vocabulary: exact status codes and bodies of the key requests.

Clients compare bodies exactly, so every body kvs returns for a data request
is built here and nowhere else.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from kvs.fsm.shard import Deleted, Mismatch, Written

@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def put_reply(result: Written) -> Reply:
    if result.replaced:
        return Reply(200, {"message": "Updated successfully", "replaced": True, "version": result.version})
    return Reply(201, {"message": "Added successfully", "replaced": False, "version": result.version})


def get_reply(found: tuple[str, int] | None) -> Reply:
    """`found` = (value, version), or None for a missing key."""
    if found is None:
        return Reply(404, {"doesExist": False, "error": "Key does not exist", "message": "Error in GET"})
    value, version = found
    if isinstance(value, bytes):            # written by seed 004's /set as binary: say so, in base64
        return Reply(200, {"doesExist": True, "message": "Retrieved successfully", "version": version,
                           "value": base64.b64encode(value).decode("ascii"), "encoding": "binary"})
    return Reply(200, {"doesExist": True, "message": "Retrieved successfully", "value": value, "version": version})


def delete_reply(result: Deleted) -> Reply:
    if result.existed:
        return Reply(200, {"doesExist": True, "message": "Deleted successfully"})
    return Reply(404, {"doesExist": False, "error": "Key does not exist", "message": "Error in DELETE"})


def mismatch_reply(result: Mismatch, method: str) -> Reply:
    """412: a conditional write (If-Match / If-None-Match) whose condition did not hold; nothing changed."""
    state = f"its version is {result.version}" if result.exists else "it does not exist"
    return Reply(412, {"doesExist": result.exists, "version": result.version, "message": f"Error in {method}",
                       "error": f"Precondition failed: {state}"})


def etag(version: int) -> str:
    """The ETag of a key's version (a strong validator: the version names one write)."""
    return f'"{version}"'
