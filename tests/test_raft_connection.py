"""A Raft connection's read path (kvs.raft.transport._RaftConnection) on real sockets: every message
arrives once and in order however the bytes are cut, a closed or reset peer drops the connection (after
the messages it sent), connects that succeed or are refused end as they did, and a message costs one
recv and no SO_ERROR query once connected (each system call on the tick thread hands the GIL to the
event loop when it waits for it)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import time

import pytest
from pysyncobj.config import SyncObjConf
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection

from kvs.raft.transport import _RaftConnection
from kvs.testing.cluster import wait_until

RECV_BUFFER = SyncObjConf().recvBufferSize      # what every replica's connections use (kvs sets none)


class CountingSocket:
    """A socket whose recv and getsockopt calls are counted."""

    def __init__(self, sock: socket.socket):
        self._sock, self.recvs, self.sockopts = sock, 0, 0

    def recv(self, size: int) -> bytes:
        self.recvs += 1
        return self._sock.recv(size)

    def getsockopt(self, *args):
        self.sockopts += 1
        return self._sock.getsockopt(*args)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class Ends:
    """A connected pair: `reader` is a _RaftConnection on a poller (as a replica's), `writer` the raw
    socket of its peer."""

    def __init__(self, poller: str = "poll"):
        self.poller = createPoller(poller)
        self.messages: list = []
        self.disconnected = False
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.writer = socket.create_connection(listener.getsockname())
            theirs, _ = listener.accept()
        theirs.setblocking(False)
        self.reader = TcpConnection(self.poller, onMessageReceived=self.messages.append,
                                    onDisconnected=self._gone, socket=theirs, recvBufferSize=RECV_BUFFER)
        self.reader.__class__ = _RaftConnection      # as RaftTransport swaps every connection's class
        self.counting = CountingSocket(theirs)
        self.reader._TcpConnection__socket = self.counting

    def _gone(self) -> None:
        self.disconnected = True

    def pump(self, until, seconds: float = 10.0) -> None:
        wait_until(lambda: self.poller.poll(0.01) or until(), seconds, interval=0.0)

    def close(self) -> None:
        self.writer.close()
        if self.reader.state != CONNECTION_STATE.DISCONNECTED:
            self.reader.disconnect()


@pytest.fixture
def ends():
    pair = Ends()
    yield pair
    pair.close()


def pending(sock) -> int:
    """Bytes waiting in `sock`'s receive queue."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def frame(message) -> bytes:
    """A frame as a peer without a secret sends it (the reader has no encryptor)."""
    sender = object.__new__(_RaftConnection)
    TcpConnection.__init__(sender, createPoller("poll"))
    sender.__class__ = _RaftConnection
    sender._TcpConnection__trySendBuffer = lambda: None
    sender.send(message)
    return sender._TcpConnection__writeBuffer


def test_messages_cut_anywhere_arrive_once_and_in_order(ends):
    messages = [{"type": "append_entries", "n": i, "entries": [os.urandom(i * 997 % 5000)]} for i in range(40)]
    messages.append({"type": "append_entries", "n": 40, "entries": [os.urandom(200_000)]})  # 3 buffers' worth
    data = b"".join(frame(m) for m in messages)
    assert len(frame(messages[-1])) > 3 * RECV_BUFFER
    for start in range(0, len(data), 7919):                 # cut across frame boundaries and lengths
        ends.writer.sendall(data[start:start + 7919])
        ends.poller.poll(0)
    ends.pump(lambda: len(ends.messages) == len(messages))
    assert ends.messages == messages and not ends.disconnected


def test_what_fills_the_buffer_is_read_on_within_the_same_event(ends):
    messages = [{"type": "append_entries", "n": i, "entries": [os.urandom(50_000)]} for i in range(4)]
    ends.writer.sendall(frame({"type": "warm-up"}))
    ends.pump(lambda: len(ends.messages) == 1)
    ends.counting.recvs = 0
    ends.writer.sendall(b"".join(frame(m) for m in messages))
    wait_until(lambda: pending(ends.counting) > RECV_BUFFER, 10, interval=0.01)
    ends.poller.poll(1.0)   # one event: it reads on while a recv fills the buffer, then parses what it has
    assert ends.counting.recvs >= 2 and len(ends.messages) > 1
    ends.pump(lambda: len(ends.messages) == 1 + len(messages))
    assert ends.messages[1:] == messages and not ends.disconnected


def test_a_small_message_costs_one_recv_and_no_sockopt_once_connected(ends):
    ends.writer.sendall(frame({"type": "warm-up"}))     # the first event may still run PySyncObj's method
    ends.pump(lambda: len(ends.messages) == 1)
    ends.counting.recvs = ends.counting.sockopts = 0
    for n in range(20):
        ends.writer.sendall(frame({"type": "next_node_idx", "n": n}))
        ends.pump(lambda: len(ends.messages) == n + 2)
    assert ends.counting.recvs == 20 and ends.counting.sockopts == 0


def test_a_peer_that_closes_drops_the_connection_after_its_last_messages(ends):
    last = [{"type": "append_entries", "n": i, "entries": [os.urandom(30_000)]} for i in range(3)]
    ends.writer.sendall(b"".join(frame(m) for m in last))     # more than a buffer, then the FIN at once
    ends.writer.shutdown(socket.SHUT_WR)
    ends.pump(lambda: ends.disconnected)
    assert ends.messages == last


def test_a_peer_that_resets_drops_the_connection(ends):
    ends.writer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ends.writer.sendall(b"\x00\x10")                    # half a length: nothing to parse yet
    ends.pump(lambda: ends.counting.recvs >= 1)
    started = time.monotonic()
    ends.writer.close()                                 # linger 0: an RST, not a FIN
    ends.pump(lambda: ends.disconnected)
    assert ends.messages == [] and time.monotonic() - started < 5


class FailingSocket:
    """A socket whose recv fails with `code`."""

    def __init__(self, code: int):
        self.code, self.recvs = code, 0

    def recv(self, size: int) -> bytes:
        self.recvs += 1
        raise OSError(self.code, os.strerror(self.code))

    def close(self) -> None:
        pass


@pytest.mark.parametrize("code, drops", [(errno.ECONNRESET, True), (errno.EAGAIN, False)])
def test_a_recv_that_fails_drops_the_connection_unless_it_would_block(ends, code, drops):
    """With select (no POLLERR) a reset socket shows only as readable: its recv must end it."""
    real, ends.reader._TcpConnection__socket = ends.counting, FailingSocket(code)
    failing = ends.reader._TcpConnection__socket
    ends.reader._TcpConnection__tryReadBuffer()
    assert failing.recvs == 1 and ends.disconnected is drops
    real.close()


@pytest.mark.parametrize("poller", ["poll", "select"])
def test_a_connect_that_succeeds_connects_and_one_that_is_refused_ends(poller):
    events = createPoller(poller)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        outcomes: list[str] = []
        conn = TcpConnection(events, onConnected=lambda: outcomes.append("connected"),
                             onDisconnected=lambda: outcomes.append("disconnected"))
        conn.__class__ = _RaftConnection        # before connect, as RaftTransport.addNode swaps it
        assert conn.connect("127.0.0.1", port)
        wait_until(lambda: events.poll(0.01) or conn.state == CONNECTION_STATE.CONNECTED, 10, interval=0.0)
        accepted, _ = listener.accept()
        accepted.sendall(frame({"type": "hello"}))
        received: list = []
        conn.setOnMessageReceivedCallback(received.append)
        wait_until(lambda: events.poll(0.01) or received, 10, interval=0.0)
        assert outcomes == ["connected"] and received == [{"type": "hello"}]
        accepted.close()
        conn.disconnect()
    refused = TcpConnection(events, onConnected=lambda: outcomes.append("connected again"),
                            onDisconnected=lambda: outcomes.append("refused"))
    refused.__class__ = _RaftConnection
    if refused.connect("127.0.0.1", port):      # the listener is gone: refused (now or at the first event)
        wait_until(lambda: events.poll(0.01) or refused.state == CONNECTION_STATE.DISCONNECTED, 10, interval=0.0)
    assert refused.state == CONNECTION_STATE.DISCONNECTED and "connected again" not in outcomes
