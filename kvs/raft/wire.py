"""How a Raft message becomes bytes on a connection: PySyncObj's format made cheap, and wire version 2.

PySyncObj 0.3.17 frames every message as a 4-byte length and `zlib.compress(pickle, 3)`, encrypted
with Fernet when the cluster has a secret. Measured per message (a one-write AppendEntries of ~600
bytes): zlib ~40-80 µs, most of it setting up the compressor; Fernet ~18 µs to encrypt and ~30 µs to
decrypt; protocol 2 pickles every bytes object (each log entry) as a call of `_codecs.encode`. A
write costs the leader four such messages per follower, and each is on the write's path. So:

* **Stored zlib** (`compress`): a message under `STORED_LIMIT` bytes becomes a zlib stream of one
  stored (uncompressed) block, ~1 µs. Every zlib decoder reads it, PySyncObj's too: this part needs
  no agreement with the peer. Larger messages (snapshot chunks, catch-up) are still compressed.
* **Wire version 2** (`SessionCipher`), on clusters with a secret, between two kvs nodes that both
  speak it: AES-256-GCM (~2 µs) instead of Fernet, pickle protocol 5 (bytes as bytes), no zlib for
  small messages. PySyncObj's handshake has each side of a connection send a random key (which the
  other then includes in every message: its replay guard). A direction's session key is derived
  from the cluster secret, both random keys and the direction (receiver first), so every connection
  has keys of its own even when one side's handshake message is replayed (the other side's key is
  fresh), and the two directions never share one. Each message carries a counter that must be
  exactly the next one (TCP keeps order; anything else is a replay or a forgery and drops the
  connection); the counter is the GCM nonce, never repeated for a key. Version 2 starts once both
  random keys are known: the responder's message announcing its key is in PySyncObj's format.
* **Negotiation**: a node that speaks version 2 starts its random key with `CAPABLE`. A peer's key
  with that prefix means the peer reads version 2, so messages to it use it; any other key (an older
  kvs, plain PySyncObj) keeps PySyncObj's format, which every version reads. A node that also
  answers forwarded writes (`kvs.raft.forwarding`) starts it with `FORWARDS`, which begins with
  `CAPABLE`, so a node that knows only `CAPABLE` reads it as before. The first handshake
  message of a connection (sent before any key is known) is always PySyncObj's format. A rolling
  upgrade therefore mixes versions freely.

Every frame is hostile until authenticated: a version-2 frame is opened (AEAD) before anything is
unpickled, and every unpickling goes through `kvs.raft.codec`'s restricted unpickler.
"""

from __future__ import annotations

import functools
import pickle
import struct
import zlib
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from kvs.raft import codec

# Before a secured connection's handshake only a random key may come (a few hundred bytes). After it
# there is no limit: PySyncObj puts a whole entry in an AppendEntries unless it is the batch's only
# one, and an entry (a batch of up to 512 writes of up to a body limit each) can be large.
HANDSHAKE_FRAME_LIMIT = 4096
STORED_LIMIT = 0xFFFF          # the largest stored block zlib has; larger messages are compressed
CAPABLE = b"kvs-wire-2:"       # the prefix of a random key whose owner reads version 2
FORWARDS = CAPABLE + b"fwd:"   # ... and also answers kvs_forward (kvs.raft.forwarding)
VERSION_2 = b"\x02"            # a version-2 frame's first byte (a Fernet token's is b"g", base64 of 0x80)
_HEADER = struct.Struct(">cQ")             # version byte, message counter
_PICKLED, _COMPRESSED = b"\x00", b"\x01"     # a version-2 plaintext's first byte
_MASTER_SALT = b"kvs raft wire 2 master"
_SESSION_INFO = b"kvs raft wire 2 session"


class WireError(Exception):
    """A frame that does not decode: the connection is dropped."""


def compress(data: bytes) -> bytes:
    """A zlib stream of `data` that any zlib decoder reads: stored, uncompressed, when small."""
    size = len(data)
    if size > STORED_LIMIT:
        return zlib.compress(data, 1)
    # RFC 1950 header (deflate, 32 KiB window, no dictionary, check bits), one final stored block
    # (RFC 1951: BFINAL=1, BTYPE=00, LEN, NLEN), then the Adler-32 of the data.
    return b"\x78\x01\x01" + struct.pack("<HH", size, size ^ 0xFFFF) + data + struct.pack(">I", zlib.adler32(data))


def decompress(data: bytes) -> bytes:
    """What `compress` (or PySyncObj's zlib level 3) made, back."""
    return zlib.decompress(data)


@functools.lru_cache(maxsize=8)
def _master_key(secret: str) -> bytes:
    # A slow derivation, once per process and secret (every group of a node shares it).
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=_MASTER_SALT, iterations=100_000)
    return kdf.derive(secret.encode())


def prepare(secret: str) -> None:
    """Derive the secret's master key now (~35 ms), not on the tick thread at a first connection."""
    _master_key(secret)


def session_key(secret: str, receiver_key: bytes, sender_key: bytes) -> bytes:
    """The key of one direction of one connection: from the owner of `sender_key` to the owner of
    `receiver_key` (the random keys of PySyncObj's handshake)."""
    info = _SESSION_INFO + struct.pack(">H", len(receiver_key)) + receiver_key + sender_key
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(_master_key(secret))


class SessionCipher:
    """Seals or opens the version-2 frames of one direction of one connection, in order. Used by one
    thread only (a connection's owner, the replica's tick thread): a counter shared by two threads
    could repeat a nonce."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)
        self._counter = 0

    def seal(self, message: Any) -> bytes:
        pickled = pickle.dumps(message, protocol=5)
        plain = _PICKLED + pickled if len(pickled) <= STORED_LIMIT else _COMPRESSED + zlib.compress(pickled, 1)
        header = _HEADER.pack(VERSION_2, self._counter)
        nonce = bytes(4) + header[1:]
        self._counter += 1
        return header + self._aead.encrypt(nonce, plain, header)

    def open(self, frame: bytes) -> Any:
        if len(frame) < _HEADER.size + 16:
            raise WireError("short version-2 frame")
        header = frame[:_HEADER.size]
        version, counter = _HEADER.unpack(header)
        if counter != self._counter:
            raise WireError(f"message {counter} where {self._counter} was due: a replay or a forgery")
        try:
            plain = self._aead.decrypt(bytes(4) + header[1:], frame[_HEADER.size:], header)
        except Exception as exc:        # cryptography's InvalidTag
            raise WireError("a version-2 frame that does not authenticate") from exc
        self._counter += 1
        kind, body = plain[:1], plain[1:]
        if kind == _COMPRESSED:
            body = zlib.decompress(body)
        elif kind != _PICKLED:
            raise WireError("unknown version-2 payload")
        try:
            return codec.loads(body)
        except Exception as exc:
            raise WireError(f"a version-2 payload that does not unpickle: {exc}") from exc
