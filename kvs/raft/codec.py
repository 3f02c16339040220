"""The restricted unpickler: every pickle kvs reads goes through it, from the network and from disk.

PySyncObj speaks pickle on its Raft port (zlib-compressed, encrypted only when the cluster has a
secret) and pickles commands into its log; kvs pickles snapshots and the journal's term and vote.
A plain `pickle.loads` of bytes from the network runs whatever code the bytes name. Here only the
globals that kvs and PySyncObj really put in their pickles are admitted: bytes (protocol 2 spells
them `_codecs.encode(text, "latin1")`), sets, PySyncObj's node objects, and the shard state machine's
result records (under their old module path too, so data
written before the package layout changed still loads). Anything else is refused with
`UnpicklingError` (PySyncObj then drops the connection); plain data (dicts, lists, tuples, str,
bytes, numbers, None, bools) needs no global at all.

`install()` puts `loads`/`load` in place of `pysyncobj.pickle`'s, which PySyncObj's transport,
log and serializer call; `kvs.raft.storage` and `kvs.raft.journal` use them directly.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections import OrderedDict
from typing import Any, BinaryIO

import pysyncobj.pickle
from pysyncobj.node import Node, TCPNode

from kvs.fsm.base import Invalid
from kvs.fsm.shard import Deleted, Mismatch, NotOwned, Written

log = logging.getLogger(__name__)

def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 2 (PySyncObj's) pickles every bytes object as `_codecs.encode(text, "latin1")`:
    admitted with that one encoding only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """Protocol 2 pickles b"" as a call of `bytes` with no argument: that call only (bytes(n) would
    allocate n bytes)."""
    if args:
        raise pickle.UnpicklingError("bytes() with arguments is not allowed")
    return b""


_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _empty_bytes, ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("collections", "OrderedDict"): OrderedDict,
    ("pysyncobj.node", "TCPNode"): TCPNode, ("pysyncobj.node", "Node"): Node,
}
for _cls in (Written, Deleted, NotOwned, Mismatch):
    _ALLOWED[("kvs.fsm.shard", _cls.__name__)] = _cls
    _ALLOWED[("kvs.raft.shard_state", _cls.__name__)] = _cls        # before the layout change
_ALLOWED[("kvs.fsm.base", "Invalid")] = Invalid
_ALLOWED[("kvs.raft.state_machine", "Invalid")] = Invalid


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            log.error("refused to unpickle %s.%s: not a type kvs or PySyncObj sends", module, name)
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return found


def loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load(f: BinaryIO) -> Any:
    return RestrictedUnpickler(f).load()


def install() -> None:
    """Make PySyncObj unpickle through `loads`/`load` (idempotent)."""
    pysyncobj.pickle.loads = loads
    pysyncobj.pickle.load = load
