"""Replica: PySyncObj's SyncObj driving one pure state machine, with low-latency commits.

PySyncObj 0.3.17 (pinned) commits on timer ticks: a command waits in a queue
for the tick thread to wake (`autoTickPeriod`), then for the next batch of
AppendEntries (`appendEntriesPeriod`), so a write takes ~100 ms with the
defaults. Its unbatched mode is fast but makes followers truncate and rewrite
already-acknowledged entries. This subclass keeps batching on and removes the
waiting instead, with three documented changes that touch PySyncObj internals
(name-mangled attributes of SyncObj; re-check them when upgrading):

1. Wake-up: submitting a command writes to a pipe the tick thread polls, so the
   command enters the log at once instead of at the next tick.
2. Immediate replication: at the end of every tick, if the leader's log or
   commit index moved since it last sent AppendEntries, it sends them now. One
   message per follower covers everything queued in that tick (batching), and
   followers learn commit indexes without waiting for a heartbeat.
3. No nextIndex regression: on a successful AppendEntries reply PySyncObj sets
   the follower's nextIndex back to the acknowledged position even when newer
   entries are already in flight, so it re-sends them with an older
   prevLogIndex and the follower truncates and re-appends entries it had
   acknowledged. We keep nextIndex at the furthest point already sent; a
   follower that really lacks entries answers with `reset`, which still works.

The replicated method `_apply` is the only entry to the state machine; it
delegates to `state.apply`, which is pure and never raises.

Reads use the ReadIndex protocol (`kvs.raft.read_index`), whose messages
travel on PySyncObj's transport beside its own and are handled here before
PySyncObj sees them; its rounds start on each tick (`read_index` wakes the
tick thread).

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
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

from kvs.raft.read_index import MESSAGE_TYPES as READ_INDEX_MESSAGES
from kvs.raft.read_index import ReadIndex


_SYN_RETRIES = 2
_USER_TIMEOUT_MS = 5000


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
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is None:
            return
        conn.__class__ = _RaftConnection
        bind = self._syncObj.conf.bindAddress
        host = bind.rsplit(":", 1)[0] if bind else None
        if host and host not in ("0.0.0.0", "::"):
            conn.source_ip = host


class Replica(SyncObj):
    def __init__(self, self_address: str, peers: list[str], state: Any, conf: SyncObjConf,
                 on_applied: Callable[[], None] | None = None):
        self._state = state
        self._on_applied = on_applied
        self._sent_log_index = 0
        self._sent_commit_index = 0
        self._wakeup: PipeNotifier | None = None
        self._read_index = ReadIndex(self)          # before the tick thread starts: messages may come at once
        super().__init__(self_address, peers, conf, transportClass=RaftTransport)
        self._wakeup = PipeNotifier(self._poller)
        self.addOnTickCallback(self._replicate_now)
        self.addOnTickCallback(self._read_index.on_tick)

    @replicated
    def _apply(self, command: Any) -> Any:
        result = self._state.apply(command)
        if self._on_applied is not None:
            self._on_applied()
        return result

    def submit(self, command: Any, callback: Callable[[Any, int], None]) -> None:
        """Propose `command`; `callback(result, fail_reason)` runs on the tick thread."""
        self._apply(command, callback=callback)

    def read_index(self, callback: Callable[[bool], None]) -> None:
        """Ask for a linearizable read (kvs.raft.read_index); `callback(ok)` runs on the tick thread once
        this replica's state may be read (True), or when it may not now (False: retry)."""
        self._read_index.request(callback)
        if self._wakeup is not None:
            self._wakeup.notify()

    def fail_reads(self) -> None:
        """After the tick thread has ended: every waiting read is told False."""
        self._read_index.fail_all()

    # -- change 1: wake the tick thread -----------------------------------------

    def _applyCommand(self, command: Any, callback: Any, commandType: Any = None) -> None:
        super()._applyCommand(command, callback, commandType)
        if self._wakeup is not None:
            self._wakeup.notify()

    # -- change 2: replicate at the end of the tick ------------------------------

    def _replicate_now(self) -> None:
        if not self._isLeader():
            return
        last_index = self._SyncObj__raftLog[-1][1]
        commit_index = self.raftCommitIndex
        if last_index != self._sent_log_index or commit_index != self._sent_commit_index:
            self._SyncObj__sendAppendEntries()
            self._sent_log_index = last_index
            self._sent_commit_index = commit_index

    # -- change 3: never move nextIndex backwards on success ---------------------

    def _SyncObj__onMessageReceived(self, node: Any, message: dict) -> None:
        if message.get("type") in READ_INDEX_MESSAGES:
            self._read_index.on_message(node, message)      # ours alone: PySyncObj never sees them
            return
        furthest_sent = None
        if message.get("type") == "next_node_idx" and message.get("success") and not message.get("reset"):
            furthest_sent = self._SyncObj__raftNextIndex.get(node)
        SyncObj._SyncObj__onMessageReceived(self, node, message)
        if furthest_sent is not None:
            next_index = self._SyncObj__raftNextIndex
            if node in next_index and next_index[node] < furthest_sent:
                next_index[node] = furthest_sent
