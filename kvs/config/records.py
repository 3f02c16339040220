"""A node's small JSON records in its DATA_DIR, written whole and read with care.

`epochs.json` (PUSHED_FILE): the epochs a coordinator or a metadata member
pushed to this node ({"active", "pending", "revision"}); `metadata.json`
(METADATA_FILE): its metadata-group membership ({"member", "peers"}).
`write_record` replaces the file by rename, so a kill leaves the old or the new
record; a write that fails (a full disk) leaves the old one and no `.tmp`.
`load_record` sets a record that is damaged, or that its validator refuses,
aside as `<name>.bad` (logged) rather than crash at every start: the node
learns its contents again from its peers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable

from kvs.config.epoch import ConfigEpoch

log = logging.getLogger(__name__)

PUSHED_FILE = "epochs.json"
METADATA_FILE = "metadata.json"


def valid_epoch(epoch: object) -> bool:
    try:
        ConfigEpoch.from_dict(epoch)
        return True
    except Exception:           # any shape error of a damaged file
        return False


def valid_pushed(record: object) -> bool:
    revision = record.get("revision", 0) if isinstance(record, dict) else None
    return (isinstance(record, dict) and (not record or valid_epoch(record.get("active")))
            and (record.get("pending") is None or valid_epoch(record["pending"]))
            and isinstance(revision, int) and not isinstance(revision, bool) and revision >= 0)


def valid_metadata(record: object) -> bool:
    return isinstance(record, dict) and isinstance(record.get("member", True), bool) and \
        isinstance(record.get("peers", []), list) and all(isinstance(p, str) for p in record.get("peers", []))


def write_record(data_dir: str, name: str, record: dict) -> None:
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, name)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise


def load_record(data_dir: str, name: str, valid: Callable[[object], bool]) -> dict:
    """The record `name` as written before, if `valid` accepts it; {} if there is none (or it was damaged)."""
    path = os.path.join(data_dir, name)
    try:
        with open(path) as f:
            record = json.load(f)
        if valid(record):
            return record
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError):
        pass
    log.error("%s is damaged; it is set aside as %s.bad and ignored (the node learns again from its "
              "peers)", path, name)
    os.replace(path, path + ".bad")
    return {}
