"""The Raft wire (kvs.raft.wire, kvs.raft.transport): frames any zlib decoder reads, version-2 frames
that authenticate, come in order and only once, and replicas of both wire versions in one group."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import zlib

import pytest
from pysyncobj.encryptor import getEncryptor
from pysyncobj.transport import TCPTransport

import kvs.raft.replica
from kvs.fsm.shard import ShardState
from kvs.raft import codec, storage, wire
from kvs.raft.group import RaftGroup, RaftTiming
from kvs.raft.transport import RaftTransport, _RaftConnection
from kvs.testing.cluster import find_free_base_port, wait_until


@pytest.mark.parametrize("size", [0, 1, 600, wire.STORED_LIMIT, wire.STORED_LIMIT + 1, 300_000])
def test_every_frame_body_is_a_zlib_stream_any_decoder_reads(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    framed = wire.compress(data)
    assert zlib.decompress(framed) == data              # what PySyncObj 0.3.17 itself calls
    assert wire.decompress(framed) == data
    if size <= wire.STORED_LIMIT:
        assert len(framed) == size + 11                 # stored: no compressor was run
    else:
        assert len(framed) < size                       # large messages are still compressed


def _pair() -> tuple[wire.SessionCipher, wire.SessionCipher]:
    key = wire.session_key("the cluster secret", wire.CAPABLE + b"r" * 32, wire.CAPABLE + b"s" * 32)
    return wire.SessionCipher(key), wire.SessionCipher(key)


def test_a_version_2_frame_opens_to_the_message_it_sealed():
    sender, receiver = _pair()
    messages = [{"type": "append_entries", "entries": [(b"\x00\xff" * 100, 7, 2)], "term": 2},
                {"type": "next_node_idx", "success": True}, b"x" * 200_000, "k\u00e9y"]
    for message in messages:
        assert receiver.open(sender.seal(message)) == message


def test_a_replayed_a_reordered_or_a_tampered_version_2_frame_is_refused():
    sender, receiver = _pair()
    first, second = sender.seal({"n": 1}), sender.seal({"n": 2})
    with pytest.raises(wire.WireError, match="replay or a forgery"):
        receiver.open(second)                           # before the first: out of order
    assert receiver.open(first) == {"n": 1}
    with pytest.raises(wire.WireError, match="replay or a forgery"):
        receiver.open(first)                            # again
    tampered = bytearray(second)
    tampered[-1] ^= 1
    with pytest.raises(wire.WireError, match="does not authenticate"):
        receiver.open(bytes(tampered))
    assert receiver.open(second) == {"n": 2}


def test_a_frame_sealed_for_another_connection_direction_or_secret_does_not_open():
    a, b, c = (wire.CAPABLE + bytes([n]) * 32 for n in b"abc")
    sealed = wire.SessionCipher(wire.session_key("secret", a, b)).seal({"n": 1})
    for key in (wire.session_key("secret", a, c),          # the same receiver key, another connection
                wire.session_key("secret", b, a),          # the other direction of the same connection
                wire.session_key("other", a, b)):          # another cluster
        with pytest.raises(wire.WireError, match="does not authenticate"):
            wire.SessionCipher(key).open(sealed)


def test_a_version_2_payload_is_unpickled_only_through_the_restricted_unpickler():
    sender, receiver = _pair()
    sealed = sender.seal(RaftTransport)                 # a global no Raft message names
    with pytest.raises(wire.WireError, match="does not unpickle"):
        receiver.open(sealed)


# -- real replicas in one process: a group mixing both wire versions --------------------------------

SECRET = "wire-test-secret"
QUICK = RaftTiming(compaction_entries=10**9, compaction_seconds=10**9)


class _StockWireTransport(RaftTransport):
    """PySyncObj's own TcpConnection on both sides, as a kvs node from before wire version 2 had
    (zlib level 3, Fernet, a random key without the version-2 prefix)."""

    def addNode(self, node):
        if node not in self._connections:
            TCPTransport.addNode(self, node)

    def _onNewIncomingConnection(self, conn):
        TCPTransport._onNewIncomingConnection(self, conn)


def _connections(group: RaftGroup) -> list:
    return list(group._replica._SyncObj__transport._connections.values())


@pytest.mark.parametrize("old_index", [0, 2])      # PySyncObj connects from the higher address: both roles
def test_replicas_of_both_wire_versions_replicate_to_each_other_and_new_pairs_speak_version_2(
        tmp_path, monkeypatch, old_index):
    storage.install()
    base = find_free_base_port(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    groups = []
    try:
        for i, address in enumerate(addresses):
            if i == old_index:
                monkeypatch.setattr(kvs.raft.replica, "RaftTransport", _StockWireTransport)
            groups.append(RaftGroup("wire", address, addresses, ShardState(), str(tmp_path / f"r{i}"), SECRET,
                                    QUICK))
            monkeypatch.undo()
        old = groups[old_index]
        new = [g for g in groups if g is not old]
        # Whoever leads, the old replica's links carry both formats' traffic both ways: AppendEntries
        # out of a leader, acknowledgements back; a hand-over in the middle changes who sends what.
        for n in range(2):
            leader = wait_until(lambda: next((g for g in groups if g.is_leader()), None), 20, message="a leader")
            for k in range(10):
                leader.execute(("put", f"id-{n}-{k}", f"k{n}-{k}", "v" * 300), time.monotonic() + 10)
            if n == 0:
                leader.transfer_leadership()
                wait_until(lambda: not leader.is_leader(), 20, message="the leadership handed over")
        wait_until(lambda: all(g.read(lambda s: s.key_count(), time.monotonic() + 10) == 20 for g in groups), 20,
                   message="every replica has every write")
        between_new = [c for g in new for c in _connections(g)
                       if isinstance(c.sendRandKey, bytes) and c.sendRandKey.startswith(wire.CAPABLE)]
        assert between_new and all(c._sending is not None and c._receiving is not None for c in between_new), \
            "the two new replicas send and receive version 2"
        assert all(not isinstance(c, _RaftConnection) for c in _connections(old))
        to_old = [c for g in new for c in _connections(g) if c not in between_new]
        assert to_old and all(c._sending is None and c._receiving is None for c in to_old)
    finally:
        for g in groups:
            g.close()


class _Peer:
    """One connection to a replica's Raft port that does PySyncObj's handshake itself, as a version-2
    node would (the test knows the secret), then speaks version 2 or sends what it likes."""

    def __init__(self, address: str, secret: str = SECRET, my_key: bytes | None = None):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.fernet = getEncryptor(secret)
        self.mine = my_key or wire.CAPABLE + os.urandom(32)
        self.first_frame = self.fernet.encrypt_at_time(wire.compress(pickle.dumps(self.mine, 2)), 1)
        self.send_frame(self.first_frame)
        echoed, self.theirs = codec.loads(zlib.decompress(self.fernet.decrypt(self.recv_frame())))
        assert echoed == self.mine and self.theirs.startswith(wire.CAPABLE)
        self.tx = wire.SessionCipher(wire.session_key(secret, self.theirs, self.mine))
        self.rx = wire.SessionCipher(wire.session_key(secret, self.mine, self.theirs))

    def send_frame(self, frame: bytes) -> None:
        self.sock.sendall(struct.pack("i", len(frame)) + frame)

    def recv_frame(self) -> bytes:
        size = struct.unpack("i", self._recv_exactly(4))[0]
        return self._recv_exactly(size)

    def _recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the replica hung up"
            data += chunk
        return data

    def hung_up(self, within: float = 5.0) -> bool:
        """Whether the replica closes the connection within `within` seconds (reading whatever it
        sends meanwhile: a leader keeps sending a read-only peer its heartbeats). Its idle timeout
        is 30 s here (`secured_group`), so only the frames sent can make it hang up that soon."""
        deadline = time.monotonic() + within
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                pass
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def secured_group(tmp_path):
    storage.install()
    base = find_free_base_port(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    # Idle connections are not dropped for 30 s here: a replica that hangs up on a peer's frame does so
    # because of the frame (the peer's socket gives up after 10 s).
    patient = RaftTiming(compaction_entries=10**9, compaction_seconds=10**9, connection_timeout=30)
    groups = [RaftGroup("wire", a, addresses, ShardState(), str(tmp_path / f"r{i}"), SECRET, patient)
              for i, a in enumerate(addresses)]
    try:
        leader = wait_until(lambda: next((g for g in groups if g.is_leader()), None), 20, message="a leader")
        leader.execute(("put", "id-0", "k", "v"), time.monotonic() + 10)
        yield leader
    finally:
        for g in groups:
            g.close()


def test_a_replayed_handshake_gets_keys_of_its_own_and_the_log_arrives_in_version_2(secured_group):
    """A recorded first message of a connection, replayed on a new one: the replica answers with a new
    random key of its own, so the new connection's session keys differ (AES-GCM never sees a key and
    nonce twice) and a frame of one connection does not open on the other."""
    first = _Peer(secured_group.self_address)
    replay = _Peer(secured_group.self_address, my_key=first.mine)
    try:
        assert first.theirs != replay.theirs
        frames = []
        for peer in (first, replay):
            peer.send_frame(peer.tx.seal("readonly"))       # a read-only peer: the leader sends it the log
            frame = peer.recv_frame()
            assert frame[:1] == wire.VERSION_2
            message = peer.rx.open(frame)
            assert message["type"] == "append_entries" and message["g"] == "wire"
            frames.append(frame)
        with pytest.raises(wire.WireError, match="does not authenticate"):
            wire.SessionCipher(wire.session_key(SECRET, first.mine, first.theirs)).open(frames[1])
    finally:
        first.close()
        replay.close()


@pytest.mark.parametrize("fault", ["tampered", "replayed", "reordered", "before-the-handshake"])
def test_a_tampered_replayed_or_reordered_version_2_frame_drops_the_connection(secured_group, fault):
    peer = _Peer(secured_group.self_address)
    try:
        hello = peer.tx.seal("readonly")
        # Messages the replica ignores (an unknown type): only the frame itself can make it hang up.
        harmless = [peer.tx.seal({"type": "nothing", "g": "wire"}) for _ in range(2)]
        if fault == "tampered":
            frame = bytearray(hello)
            frame[-1] ^= 1
            peer.send_frame(bytes(frame))
        elif fault == "replayed":
            for frame in (hello, harmless[0], harmless[0]):
                peer.send_frame(frame)
        elif fault == "reordered":
            for frame in (hello, harmless[1], harmless[0]):
                peer.send_frame(frame)
        else:
            peer.close()
            peer.sock = socket.create_connection(tuple(_host_port(secured_group.self_address)), timeout=10)
            peer.send_frame(hello)
        assert peer.hung_up()
        secured_group.execute(("put", "id-1", "k1", "v"), time.monotonic() + 10)     # the group goes on
    finally:
        peer.close()


def test_once_version_2_is_agreed_a_frame_of_pysyncobj_s_format_is_a_replay():
    """The responder's key announcement (PySyncObj's format, wrapped with the initiator's key) is
    authentic and of this connection: sent again later it must not be accepted (that format has no
    counter). Only the decoding, on a connection object without a socket."""
    conn = object.__new__(_RaftConnection)
    conn.encryptor, conn.secret, conn.recvLastTimestamp = getEncryptor(SECRET), SECRET, 0
    conn.recvRandKey = os.urandom(32)                  # as PySyncObj sets it (ours gets the prefix)
    conn.sendRandKey = wire.CAPABLE + os.urandom(32)   # the responder's announced key
    announcement = conn.encryptor.encrypt_at_time(
        wire.compress(pickle.dumps((conn.recvRandKey, conn.sendRandKey), 2)), 1)
    with pytest.raises(wire.WireError, match="after version 2 was agreed"):
        conn._decode(announcement)
    responder = wire.SessionCipher(wire.session_key(SECRET, conn.recvRandKey, conn.sendRandKey))
    assert conn._decode(responder.seal({"type": "x"})) == {"type": "x"}


def test_before_the_handshake_a_large_frame_is_refused_without_reading_it(secured_group):
    host, port = _host_port(secured_group.self_address)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(struct.pack("i", 1 << 20) + b"x" * 8192)     # announces 1 MiB; sends 8 KiB
        while sock.recv(65536):
            pass                                # the replica hangs up (else the 10 s timeout raises)
    secured_group.execute(("put", "id-2", "k2", "v"), time.monotonic() + 10)


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)
