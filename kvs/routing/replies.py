"""The REST API's response vocabulary: exact status codes and bodies of the key requests.

Clients compare bodies exactly, so every body kvs returns for a data request
is built here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvs.fsm.shard import Deleted, Written

@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def put_reply(result: Written) -> Reply:
    if result.replaced:
        return Reply(200, {"message": "Updated successfully", "replaced": True})
    return Reply(201, {"message": "Added successfully", "replaced": False})


def get_reply(value: str | None) -> Reply:
    if value is None:
        return Reply(404, {"doesExist": False, "error": "Key does not exist", "message": "Error in GET"})
    return Reply(200, {"doesExist": True, "message": "Retrieved successfully", "value": value})


def delete_reply(result: Deleted) -> Reply:
    if result.existed:
        return Reply(200, {"doesExist": True, "message": "Deleted successfully"})
    return Reply(404, {"doesExist": False, "error": "Key does not exist", "message": "Error in DELETE"})
