"""A Raft connection's read path (kvs.raft.transport._RaftConnection) on real sockets: every message
arrives once and in order however the bytes are cut, a closed or reset peer drops the connection, and
a message costs one recv and no SO_ERROR query once connected (each system call on the tick thread
hands the GIL to the event loop when it waits for it)."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection

from kvs.raft.transport import _RaftConnection
from kvs.testing.cluster import wait_until

RECV_BUFFER = 2 ** 13           # PySyncObj's default, as every replica configures it


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

    def __init__(self):
        self.poller = createPoller("poll")
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


def frame(message) -> bytes:
    """A frame as a peer without a secret sends it (the reader has no encryptor)."""
    sender = object.__new__(_RaftConnection)
    TcpConnection.__init__(sender, createPoller("poll"))
    sender.__class__ = _RaftConnection
    sender._TcpConnection__trySendBuffer = lambda: None
    sender.send(message)
    return sender._TcpConnection__writeBuffer


def test_messages_cut_anywhere_arrive_once_and_in_order(ends):
    messages = [{"type": "append_entries", "n": i, "entries": [b"x" * (i * 997 % 5000)]} for i in range(40)]
    messages.append({"type": "append_entries", "n": 40, "entries": [b"y" * 200_000]})   # 25 buffers' worth
    data = b"".join(frame(m) for m in messages)
    for start in range(0, len(data), 7919):                 # cut across frame boundaries and lengths
        ends.writer.sendall(data[start:start + 7919])
        ends.poller.poll(0)
    ends.pump(lambda: len(ends.messages) == len(messages))
    assert ends.messages == messages and not ends.disconnected


def test_a_small_message_costs_one_recv_and_no_sockopt_once_connected(ends):
    ends.writer.sendall(frame({"type": "warm-up"}))     # the first event may still run PySyncObj's method
    ends.pump(lambda: len(ends.messages) == 1)
    ends.counting.recvs = ends.counting.sockopts = 0
    for n in range(20):
        ends.writer.sendall(frame({"type": "next_node_idx", "n": n}))
        ends.pump(lambda: len(ends.messages) == n + 2)
    assert ends.counting.recvs == 20 and ends.counting.sockopts == 0


def test_a_peer_that_closes_drops_the_connection_after_its_last_message(ends):
    ends.writer.sendall(frame({"type": "last"}))
    ends.writer.shutdown(socket.SHUT_WR)
    ends.pump(lambda: ends.disconnected)
    assert ends.messages == [{"type": "last"}]


def test_a_peer_that_resets_drops_the_connection(ends):
    ends.writer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ends.writer.sendall(b"\x00\x10")                    # half a length: nothing to parse yet
    ends.pump(lambda: ends.counting.recvs >= 1)
    started = time.monotonic()
    ends.writer.close()                                 # linger 0: an RST, not a FIN
    ends.pump(lambda: ends.disconnected)
    assert ends.messages == [] and time.monotonic() - started < 5
