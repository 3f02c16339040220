"""Node settings, read once at start from the environment and the command line.

The seeds' container contract is kept: ADDRESS (host:port of this node's HTTP
API, port 13800 by default), VIEW (comma-separated addresses of all nodes) and
REPL_FACTOR. kvs adds DATA_DIR (Raft journals and snapshots) and KVS_SECRET
(cluster secret). A command-line flag wins over the environment variable.
KVS_FSYNC (`on`, the default, or `off`) chooses whether the Raft journal is
fsynced before a write is acknowledged; `off` is for tests and benchmarks
only: acknowledged writes then survive a killed process, not a power failure.
KVS_RAFT_ON_LOOP (`off`, the default, or `on`; EXPERIMENTAL) makes the shard
groups' Raft replicas tick on the node's event loop (`kvs.raft.loop_poller`).

Raft ports are derived from the HTTP port: the replica a node runs in its
k-th group slot listens on ``http_port + raft_port_offset * (k + 1)``; slot 0
is the metadata group. With the default offset of 1000, nodes that share an IP
and whose HTTP ports lie within a window narrower than 1000 (13800, 13801,
...) can never collide, whatever groups they host. The offset is a cluster-wide
setting (KVS_RAFT_PORT_OFFSET): every node must use the same value.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

from kvs.errors import BadRequest

DEFAULT_PORT = 13800
DEFAULT_RAFT_PORT_OFFSET = 1000
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_COMPACTION_ENTRIES = 20_000     # Raft log entries between snapshots (KVS_COMPACTION_ENTRIES)
REQUEST_TIMEOUT_SECONDS = 5.0
METADATA_SLOT = 0


MAX_VIEW_NODES = 1024           # a view change naming more nodes is refused before any work
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]{2,45}\]")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_address(text: str) -> tuple[str, int]:
    """Split 'host:port' (port defaults to 13800); raise BadRequest unless it is exactly a host name,
    an IPv4 address or a bracketed IPv6 address, and a port: nothing a URL could smuggle in."""
    if not isinstance(text, str):
        raise BadRequest("an address must be a 'host:port' string")
    text = text.strip()
    if not text:
        raise BadRequest("empty address")
    if len(text) > 260:
        raise BadRequest(f"malformed address {text[:40]!r}...: longer than a host name and a port")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    if not _HOST.fullmatch(host) or len(host) > 253 or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise BadRequest(f"malformed address {text[:80]!r}: expected host:port")
    return host, int(port)


def normalize_address(text: str) -> str:
    host, port = parse_address(text)
    return f"{host}:{port}"


def parse_view(text: str) -> tuple[str, ...]:
    """Parse a comma-separated VIEW, keeping order (at most MAX_VIEW_NODES). A node named twice (also
    as "host" and "host:13800") is refused: the view's length decides the shard count, and a view that
    is not what its writer meant must not be read as something else."""
    if text.count(",") >= MAX_VIEW_NODES:
        raise BadRequest(f"a view has at most {MAX_VIEW_NODES} nodes")
    seen: dict[str, None] = {}
    for part in text.split(","):
        if part.strip():
            address = normalize_address(part)
            if address in seen:
                raise BadRequest(f"the view names {address} twice")
            seen[address] = None
    return tuple(seen)


@functools.lru_cache(maxsize=4096)     # on every key request's path (`Node.leader_address`): parsing is the cost
def raft_address(http_address: str, slot: int, offset: int) -> str:
    """The Raft address of the replica in `slot` of the node at `http_address`."""
    host, port = parse_address(http_address)
    raft_port = port + offset * (slot + 1)
    if raft_port > 65535:
        raise BadRequest(f"raft port {raft_port} for {http_address} slot {slot} is out of range")
    return f"{host}:{raft_port}"


def http_address(raft_address_: str, slot: int, offset: int) -> str:
    """The inverse of `raft_address`: the HTTP address of the node whose `slot` replica listens there."""
    host, port = raft_address_.rsplit(":", 1)
    return f"{host}:{int(port) - offset * (slot + 1)}"


@dataclass(frozen=True)
class NodeSettings:
    address: str
    view: tuple[str, ...]
    repl_factor: int
    data_dir: str
    secret: str | None = None
    admin_token: str | None = None         # KVS_ADMIN_TOKEN: view changes need "Authorization: Bearer <it>"
    raft_port_offset: int = DEFAULT_RAFT_PORT_OFFSET
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout: float = REQUEST_TIMEOUT_SECONDS
    compaction_entries: int = DEFAULT_COMPACTION_ENTRIES
    listen_host: str = field(default="")
    fsync: bool = True          # KVS_FSYNC: fsync the Raft journal before acknowledging
    raft_on_loop: bool = False  # KVS_RAFT_ON_LOOP: shard groups tick on the event loop (experimental)

    @property
    def http_port(self) -> int:
        return parse_address(self.address)[1]

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def bind_host(self) -> str:
        """Where the HTTP server listens: loopback addresses stay on loopback."""
        if self.listen_host:
            return self.listen_host
        return self.host if self.host.startswith("127.") or self.host == "localhost" else "0.0.0.0"

    @property
    def is_member(self) -> bool:
        return self.address in self.view

    @property
    def secured(self) -> bool:
        return bool(self.secret)

    def raft_address(self, http_address: str, slot: int) -> str:
        return raft_address(http_address, slot, self.raft_port_offset)

    def http_address(self, raft_address_: str, slot: int) -> str:
        return http_address(raft_address_, slot, self.raft_port_offset)

    @classmethod
    def load(cls, args: object | None = None, environ: dict | None = None) -> "NodeSettings":
        """Build settings from argparse results (attributes may be None) over the environment."""
        env = os.environ if environ is None else environ

        def pick(attr: str, var: str, default: object = None) -> object:
            value = getattr(args, attr, None) if args is not None else None
            if value is None or value == "":
                value = env.get(var)
            return default if value is None or value == "" else value

        address = normalize_address(str(pick("address", "ADDRESS", f"127.0.0.1:{DEFAULT_PORT}")))
        view = parse_view(str(pick("view", "VIEW", "")))
        try:
            repl_factor = int(pick("repl_factor", "REPL_FACTOR", 1))
            offset = int(pick("raft_port_offset", "KVS_RAFT_PORT_OFFSET", DEFAULT_RAFT_PORT_OFFSET))
            max_body = int(pick("max_body_bytes", "KVS_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))
            compaction = int(pick("compaction_entries", "KVS_COMPACTION_ENTRIES", DEFAULT_COMPACTION_ENTRIES))
        except ValueError as exc:
            raise BadRequest(f"invalid numeric setting: {exc}") from None
        if compaction < 2:
            raise BadRequest("KVS_COMPACTION_ENTRIES must be at least 2")
        if repl_factor < 1:
            raise BadRequest("REPL_FACTOR must be at least 1")
        if view and len(view) % repl_factor:
            raise BadRequest(f"VIEW has {len(view)} nodes, not a multiple of REPL_FACTOR={repl_factor}")
        data_dir = str(pick("data_dir", "DATA_DIR", os.path.join("data", address.replace(":", "_"))))
        secret = pick("secret", "KVS_SECRET", None)
        admin_token = pick("admin_token", "KVS_ADMIN_TOKEN", None)
        fsync = str(pick("fsync", "KVS_FSYNC", "on")).strip().lower()
        on_loop = str(pick("raft_on_loop", "KVS_RAFT_ON_LOOP", "off")).strip().lower()
        for name, value in (("KVS_FSYNC", fsync), ("KVS_RAFT_ON_LOOP", on_loop)):
            if value not in ("on", "off"):
                raise BadRequest(f"{name} must be 'on' or 'off', not {value!r}")
        return cls(
            address=address,
            view=view,
            repl_factor=repl_factor,
            data_dir=data_dir,
            secret=str(secret) if secret else None,
            admin_token=str(admin_token) if admin_token else None,
            raft_port_offset=offset,
            max_body_bytes=max_body,
            compaction_entries=compaction,
            listen_host=str(pick("listen", "KVS_LISTEN", "")),
            fsync=fsync == "on",
            raft_on_loop=on_loop == "on",
        )
