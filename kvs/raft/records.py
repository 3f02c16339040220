"""The journal's record format: one checksummed record per Raft log entry, and the scan that reads them back.

record = header + command; header = command length, crc32, index, term (`<IIQQ`).
The checksum covers the command, the index and the term, so a torn record, a
record half overwritten, or the zeros of a preallocated tail (an all-zero
header never checks: the crc of index 0, term 0 and no command is not 0) all
end the scan. Pure functions: no files, no clocks.
"""

from __future__ import annotations

import struct
import zlib

HEADER = struct.Struct("<IIQQ")

Entry = tuple  # (command: bytes, index: int, term: int), as PySyncObj uses them


def checksum(command: bytes, index: int, term: int) -> int:
    return zlib.crc32(command, zlib.crc32(struct.pack("<QQ", index, term)))


def encode(command: bytes, index: int, term: int) -> bytes:
    return HEADER.pack(len(command), checksum(command, index, term), index, term) + command


def scan(blob: bytes) -> tuple[list[Entry], list[int], int]:
    """The entries of `blob` up to the first record that does not check, their offsets, and where they end.

    A whole record that does not follow its predecessor (index + 1, a term not
    lower) ends the scan too: it can only be a later unsynced write whose page
    reached the disk when an earlier one's did not, and keeping it would bring
    it back behind the appends that come next."""
    entries: list[Entry] = []
    offsets: list[int] = []
    offset = 0
    while offset + HEADER.size <= len(blob):
        length, crc, index, term = HEADER.unpack_from(blob, offset)
        start = offset + HEADER.size
        command = blob[start:start + length]
        if len(command) != length or checksum(command, index, term) != crc:
            break
        if entries and (index != entries[-1][1] + 1 or term < entries[-1][2]):
            break
        entries.append((command, index, term))
        offsets.append(offset)
        offset = start + length
    return entries, offsets, offset


def only_zeros_after(blob: bytes, offset: int) -> bool:
    """Whether everything from `offset` on is zero bytes (a preallocated tail, not a torn one)."""
    return blob.count(0, offset) == len(blob) - offset
