"""RaftTransport: PySyncObj's TCP transport with quick give-ups, the node's own source IP, a journal
sync before any acknowledgement leaves, and every message tagged with its group.

Outgoing Raft connections (`RaftTransport`):
- leave from the node's own IP when it binds one: the kernel would otherwise
  pick the route's source address (127.0.0.1 for every 127.0.0.x peer, the
  primary address on a multi-homed host), and per-node packet filters could
  not tell nodes apart;
- give up a connect after two SYN retries (about 3 s) and unacknowledged data
  after `_USER_TIMEOUT_MS`: PySyncObj checks its connection timeout only when
  a socket shows activity, so a connect sent into a partition stayed in
  SYN_SENT until the kernel's default (about 2 minutes) and the peer stayed
  unreachable that long after the partition healed. A failed connect is
  retried every `connectionRetryTime`.

Acknowledgements: a replica's answer to AppendEntries (`next_node_idx`) and its
votes leave only once its journal is synced (see "Durability" in
`kvs.raft.replica`); `send` is the one place every Raft message passes.
A replica that halted on a disk fault sends nothing.

Group tags: see "One group per address" in `kvs.raft.replica`.
"""

from __future__ import annotations

import socket
from typing import Any

from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

_SYN_RETRIES = 2
_USER_TIMEOUT_MS = 5000

# Raft messages that reflect (acknowledge) this replica's log: sent only once the journal is synced.
_SYNC_BEFORE_SENDING = frozenset({"next_node_idx", "request_vote", "response_vote"})

# Every Raft message names its group; a replica drops another group's (see "One group per address").
GROUP_FIELD = "g"


class _RaftConnection(TcpConnection):
    source_ip: str | None = None

    def setSockoptKeepalive(self) -> None:
        # TcpConnection.connect calls this between creating its socket and connecting it.
        super().setSockoptKeepalive()
        sock = self._TcpConnection__socket
        if sock is None:
            return
        if hasattr(socket, "TCP_SYNCNT"):           # Linux
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, _SYN_RETRIES)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _USER_TIMEOUT_MS)
        if self.source_ip and sock.getsockname()[1] == 0:
            sock.bind((self.source_ip, 0))


class RaftTransport(TCPTransport):
    """TCPTransport whose outgoing connections give up quickly and bind to the node's own IP."""

    def addNode(self, node: Any) -> None:
        if node in self._connections:
            return          # connected already (a learner's planned peer, then its membership entry)
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is None:
            return
        conn.__class__ = _RaftConnection
        bind = self._syncObj.conf.bindAddress
        host = bind.rsplit(":", 1)[0] if bind else None
        if host and host not in ("0.0.0.0", "::"):
            conn.source_ip = host

    # -- durability: no acknowledgement leaves before the journal is synced ------

    def send(self, node: Any, message: Any) -> bool:
        """Every Raft message goes through here (`SyncObj.__transport.send`); see "Durability" above."""
        if getattr(self._syncObj, "journal_failure", None) is not None:
            return False            # a halted replica says nothing (see "Disk faults")
        if isinstance(message, dict):
            if message.get("type") in _SYNC_BEFORE_SENDING:
                sync = getattr(self._syncObj, "_sync_journal", None)
                if sync is not None:
                    sync()
            group = getattr(self._syncObj, "group", "")
            if group:
                message[GROUP_FIELD] = group        # see "One group per address" above
        return super().send(node, message)
