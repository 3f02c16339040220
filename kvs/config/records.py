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
import threading
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


class EpochNews:
    """The epochs this node was told of (PUSHED_FILE), newest news only, kept on disk.

    Older news than this node has is ignored: an older active epoch, or for the same active epoch a
    lower revision (a rolled-back plan from a lagging member, a late push)."""

    def __init__(self, data_dir: str):
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._record: dict = load_record(data_dir, PUSHED_FILE, valid_pushed)   # {"active", "pending", "revision"}

    def learn(self, active: dict, pending: dict | None, revision: int = 0) -> bool:
        """Take the news if it is newer than what is known; True if it was taken."""
        with self._lock:
            known = self._record.get("active")
            if known is not None and active["number"] < known["number"]:
                return False
            newer_epoch = known is None or active["number"] > known["number"]
            if not newer_epoch and revision < self._record.get("revision", 0):
                return False
            self._record = {"active": active, "pending": pending, "revision": revision}
            write_record(self._data_dir, PUSHED_FILE, self._record)
            return True

    @property
    def active(self) -> dict | None:
        return self._record.get("active")

    @property
    def pending(self) -> dict | None:
        return self._record.get("pending")

    @property
    def revision(self) -> int:
        return self._record.get("revision", 0)
