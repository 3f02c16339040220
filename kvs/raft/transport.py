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

One group per address: every Raft message carries the name of the group that sent it
(`GROUP_FIELD`), and a replica ignores messages of another group. Two groups must never share an
address (`kvs.node` closes a node's stale groups before starting new ones), but a replica that
outlived its group elsewhere (a node that learns late that a plan was rolled back, a member
replaying its metadata log) could otherwise make a new group's replicas take its log, with the same
secret. Untagged messages (from a previous version) are accepted.

Framing and encryption (`_RaftConnection.send` / `_TcpConnection__processParseMessage`, the same
two places as in PySyncObj's TcpConnection, incoming connections included): stored zlib for small
messages and, between kvs nodes on a cluster with a secret, wire version 2; see `kvs.raft.wire`.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import Any

import pysyncobj.pickle
from pysyncobj.monotonic import monotonic
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.transport import TCPTransport

from kvs.raft import codec, wire

log = logging.getLogger(__name__)

_SYN_RETRIES = 2
_USER_TIMEOUT_MS = 5000

# Raft messages that reflect (acknowledge) this replica's log: sent only once the journal is synced.
_SYNC_BEFORE_SENDING = frozenset({"next_node_idx", "request_vote", "response_vote"})

# Every Raft message names its group; a replica drops another group's (see "One group per address" above).
GROUP_FIELD = "g"


_LENGTH = struct.Struct("i")        # PySyncObj's frame length (native int, as it packs it)


class _RaftConnection(TcpConnection):
    """A TcpConnection (made one by a class swap right after PySyncObj creates it) with kvs's framing."""

    source_ip: str | None = None
    secret: str | None = None       # the cluster secret: version-2 session keys derive from it
    key_prefix = wire.FORWARDS      # what our handshake key announces (see recvRandKey)
    _recv_rand_key: Any = None
    _peer_closed = False            # the peer closed its side; set by a read, cleared by disconnect
    _sending: tuple[tuple[bytes, bytes], wire.SessionCipher] | None = None
    _receiving: tuple[tuple[bytes, bytes], wire.SessionCipher] | None = None

    # PySyncObj sets its handshake's random key here (os.urandom(32)) right before sending it; ours
    # starts with `key_prefix`, wire.FORWARDS, which tells a peer that we read version 2 and answer
    # forwarded writes (it begins with wire.CAPABLE, all that a peer of an earlier version checks). A
    # data descriptor: it takes precedence over the attribute TcpConnection.__init__ put in the
    # instance before the class swap.
    @property
    def recvRandKey(self) -> Any:
        return self._recv_rand_key

    @recvRandKey.setter
    def recvRandKey(self, value: Any) -> None:
        self._recv_rand_key = self.key_prefix + value if isinstance(value, bytes) and value else value

    def _session_keys(self) -> tuple[bytes, bytes] | None:
        """(the peer's random key, ours) once both are known and the peer reads version 2."""
        theirs, ours = self.sendRandKey, self._recv_rand_key
        if (self.encryptor is not None and isinstance(theirs, bytes) and theirs.startswith(wire.CAPABLE)
                and isinstance(ours, bytes) and ours):
            return theirs, ours
        return None

    def send(self, message: Any) -> None:
        keys = self._session_keys()
        # Our handshake key itself goes in PySyncObj's format: the peer needs it to derive the keys.
        if keys is not None and message is not self._recv_rand_key:
            data = self._cipher("_sending", keys).seal(message)
        else:
            # PySyncObj's format (any peer reads it), with stored zlib instead of compression level 3.
            rand_key = self.sendRandKey
            if rand_key:
                message = (rand_key, message)
            data = wire.compress(pysyncobj.pickle.dumps(message))
            if self.encryptor is not None:
                data = self.encryptor.encrypt_at_time(data, int(monotonic()))
        self._TcpConnection__writeBuffer += _LENGTH.pack(len(data)) + data
        self._TcpConnection__trySendBuffer()

    def _TcpConnection__processParseMessage(self) -> Any:
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < 4:
            return None
        size = _LENGTH.unpack_from(buffer)[0]
        try:
            if size < 0 or size > self._frame_limit():
                raise wire.WireError(f"a frame of {size} bytes")
            if len(buffer) - 4 < size:
                return None
            message = self._decode(buffer[4:4 + size])
        except Exception as exc:
            # As PySyncObj does (silently there): drop the connection; the peer reconnects if it can.
            log.debug("dropping a Raft connection: %s", exc)
            self.disconnect()
            return None
        self._TcpConnection__readBuffer = buffer[4 + size:]
        return message

    def _TcpConnection__processConnection(self, descr: int, eventType: int) -> None:
        # PySyncObj's, but for one system call: it asks SO_ERROR on every event, where only a connect
        # that completes (or a socket that turns writable) needs it; a connected socket in error
        # reports POLLERR, or fails its recv. An outgoing connection subscribes this method from its
        # first event (it connects after the class swap); an incoming one was subscribed with
        # PySyncObj's before the swap, and its first event, writable as a new socket is, subscribes
        # this one (PySyncObj's method reads through `_TcpConnection__tryReadBuffer` below meanwhile).
        # Every poller kvs runs is level-triggered (poll, select, the loop's epoll without EPOLLET),
        # which the short-read rule below relies on.
        poller = self._TcpConnection__poller
        if descr != self._TcpConnection__fileno:
            poller.unsubscribe(descr)
            return
        if eventType & POLL_EVENT_TYPE.ERROR:
            self.disconnect()
            return
        self._TcpConnection__processConnectionTimeout()
        if self.state == CONNECTION_STATE.DISCONNECTED:
            return
        connecting = self._TcpConnection__state == CONNECTION_STATE.CONNECTING
        if (connecting or eventType & POLL_EVENT_TYPE.WRITE) \
                and self._TcpConnection__socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()
            return
        if connecting and eventType & (POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE):
            on_connected = self._TcpConnection__onConnected
            if on_connected is not None:
                on_connected()
            if self._TcpConnection__state == CONNECTION_STATE.DISCONNECTED:
                return
            self._TcpConnection__state = CONNECTION_STATE.CONNECTED
            self._TcpConnection__lastReadTime = monotonic()
            return
        if eventType & POLL_EVENT_TYPE.WRITE:
            self._TcpConnection__trySendBuffer()
            if self._TcpConnection__state == CONNECTION_STATE.DISCONNECTED:
                return
            event = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
            if self._TcpConnection__writeBuffer:
                event |= POLL_EVENT_TYPE.WRITE
            poller.subscribe(descr, self._TcpConnection__processConnection, event)
        if eventType & POLL_EVENT_TYPE.READ:
            self._TcpConnection__tryReadBuffer()
            if self._TcpConnection__state == CONNECTION_STATE.DISCONNECTED:
                return
            while True:
                message = self._TcpConnection__processParseMessage()
                if message is None:
                    break
                on_message = self._TcpConnection__onMessageReceived
                if on_message is not None:
                    on_message(message)
                if self._TcpConnection__state == CONNECTION_STATE.DISCONNECTED:
                    return
            if self._peer_closed:
                self.disconnect()       # after the complete frames it sent before closing

    def _TcpConnection__tryReadBuffer(self) -> None:
        # PySyncObj reads until EAGAIN and asks SO_ERROR after every recv: four system calls for one
        # message, each of which hands the GIL over when another thread wants it (at one client the
        # event loop does, answering the request while the leader reads the second acknowledgement).
        # A recv that does not fill the buffer has drained the socket (poll is level-triggered: what
        # arrives after it is reported again), and a socket in error fails the recv itself.
        sock, size = self._TcpConnection__socket, self._TcpConnection__recvBufferSize
        while True:
            try:
                incoming = sock.recv(size)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    self.disconnect()
                break
            if not incoming:
                self._peer_closed = True    # the caller parses what came before, then disconnects
                break
            self._TcpConnection__readBuffer += incoming
            if len(incoming) < size:
                break
        self._TcpConnection__lastReadTime = monotonic()

    def _frame_limit(self) -> int:
        # Before a secured connection's handshake only a random key may come: a stranger does not
        # get to make the tick thread buffer megabytes (see wire.HANDSHAKE_FRAME_LIMIT).
        if self.encryptor is not None and not (self.sendRandKey and self._recv_rand_key):
            return wire.HANDSHAKE_FRAME_LIMIT
        return 0x7FFFFFFF

    def _decode(self, frame: bytes) -> Any:
        keys = self._session_keys()
        if keys is not None:
            # Version 2 agreed: each side decodes its last frame of PySyncObj's format before it stores
            # the peer's key, so anything else now is a replay (that format has no counter).
            if frame[:1] != wire.VERSION_2:
                raise wire.WireError("a frame of PySyncObj's format after version 2 was agreed")
            return self._cipher("_receiving", keys).open(frame)
        if self.encryptor is not None and frame[:1] == wire.VERSION_2:
            raise wire.WireError("a version-2 frame before the handshake")
        if self.encryptor is not None:
            timestamp = self.encryptor.extract_timestamp(frame)
            if timestamp < self.recvLastTimestamp:
                raise wire.WireError("a frame older than the previous one")
            self.recvLastTimestamp = timestamp
            frame = self.encryptor.decrypt(frame)
        message = codec.loads(wire.decompress(frame))
        if self.recvRandKey:
            rand_key, message = message
            if rand_key != self.recvRandKey:
                raise wire.WireError("a frame of another connection")
        return message

    def _cipher(self, slot: str, keys: tuple[bytes, bytes]) -> wire.SessionCipher:
        """The session cipher of one direction, new whenever a handshake chose new random keys."""
        current = getattr(self, slot)
        if current is None or current[0] != keys:
            theirs, ours = keys
            receiver, sender = (theirs, ours) if slot == "_sending" else (ours, theirs)
            current = (keys, wire.SessionCipher(wire.session_key(self.secret or "", receiver, sender)))
            setattr(self, slot, current)
        return current[1]

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

    def disconnect(self) -> None:
        super().disconnect()
        self._sending = self._receiving = None      # the next handshake chooses new keys anyway
        self._peer_closed = False


class RaftTransport(TCPTransport):
    """TCPTransport whose outgoing connections give up quickly and bind to the node's own IP."""

    connection_class = _RaftConnection      # what PySyncObj's connections become (a test's may differ)

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any):
        if syncObj.conf.password:
            wire.prepare(syncObj.conf.password)     # here, not on the tick thread at a first connection
        # Without a tick thread (a replica on the event loop), SyncObj's constructor spins until the
        # port is bound; reported ready meanwhile, the bind happens (and is retried) at its ticks.
        self.constructing = getattr(syncObj.conf.pollerType, "binds_at_first_tick", False)
        super().__init__(syncObj, selfNode, otherNodes)

    @property
    def ready(self) -> bool:
        return self._ready or self.constructing

    def answers_forwards(self, node: Any) -> bool:
        """True if `node` announced in the handshake of its current connection that it answers forwarded
        writes (`wire.FORWARDS`); False if it did not or is not known yet (no secret, hence no handshake
        keys; not connected; a node of an earlier version, which may answer them all the same)."""
        conn = self._connections.get(node)
        key = getattr(conn, "sendRandKey", None)
        return isinstance(key, bytes) and key.startswith(wire.FORWARDS)

    def addNode(self, node: Any) -> None:
        if node in self._connections:
            return          # connected already (a learner's planned peer, then its membership entry)
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is None:
            return
        conn.__class__ = self.connection_class
        conn.secret = self._syncObj.conf.password
        bind = self._syncObj.conf.bindAddress
        host = bind.rsplit(":", 1)[0] if bind else None
        if host and host not in ("0.0.0.0", "::"):
            conn.source_ip = host

    def _onNewIncomingConnection(self, conn: Any) -> None:
        conn.__class__ = self.connection_class     # before its first message is parsed
        conn.secret = self._syncObj.conf.password
        super()._onNewIncomingConnection(conn)

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
