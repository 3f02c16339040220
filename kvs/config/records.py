"""A node's small JSON records in its DATA_DIR (epochs.json, metadata.json): written whole, read with care.

`write_record` replaces the file by rename, so a kill leaves the old or the new
record; a write that fails (a full disk) leaves the old one and no `.tmp`.
`load_record` sets a damaged record aside as `<name>.bad` (logged) rather than
crash at every start: the node learns its contents again from its peers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable

log = logging.getLogger(__name__)


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
