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

from kvs.config.epoch import MAX_NUMBER, ConfigEpoch

log = logging.getLogger(__name__)

PUSHED_FILE = "epochs.json"
METADATA_FILE = "metadata.json"


def valid_epoch(epoch: object) -> bool:
    """Whether `ConfigEpoch.from_dict` takes `epoch` (every rule of `kvs.config.epoch._check_epoch`)."""
    try:
        ConfigEpoch.from_dict(epoch)
        return True
    except Exception:           # InvalidEpoch, or anything else a damaged file could cause: never raise
        return False


def valid_revision(revision: object) -> bool:
    return type(revision) is int and 0 <= revision < MAX_NUMBER


def valid_pushed(record: object) -> bool:
    """Whether `record` is a PUSHED_FILE record `EpochNews` could have written: {} (no news yet), or a valid
    active epoch, a valid pending one or none, and a revision 0 <= r < 2**63. False, never an exception,
    for any other JSON value."""
    if not isinstance(record, dict):
        return False
    if not record:
        return True
    pending = record.get("pending")
    return (valid_revision(record.get("revision", 0)) and valid_epoch(record.get("active"))
            and (pending is None or valid_epoch(pending)))


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
    try:
        os.replace(path, path + ".bad")
    except OSError as exc:      # it is ignored all the same (again at the next start): never crash on it
        log.error("could not set %s aside: %s", path, exc)
    return {}


def _number(epoch: object) -> int | None:
    """An epoch dict's number if it is a valid one (>= 1), else None."""
    number = epoch.get("number") if isinstance(epoch, dict) else None
    return number if type(number) is int and 1 <= number < MAX_NUMBER else None


class EpochNews:
    """The epochs this node was told of (PUSHED_FILE), newest news only, kept on disk.

    Older news than this node has is ignored: an older active epoch, or for the same active epoch a
    lower revision (a rolled-back plan from a lagging member, a late push)."""

    def __init__(self, data_dir: str):
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._record: dict = load_record(data_dir, PUSHED_FILE, valid_pushed)   # {"active", "pending", "revision"}

    def learn(self, active: dict, pending: dict | None, revision: int = 0) -> bool:
        """Take the news if it is newer than what is known; True if it was taken.

        Callers pass epochs `ConfigEpoch.from_dict` accepted (`kvs.reconfig.protocol`); news whose numbers
        or revision are not integers is refused here all the same, so that the comparisons below (and the
        supervisor's, on what is kept) can never raise."""
        if not (_number(active) and (pending is None or _number(pending)) and valid_revision(revision)):
            log.error("news of epochs without integer numbers and revision ignored")
            return False
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
