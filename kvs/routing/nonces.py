"""NonceCache: the nonces of the signed node-to-node requests a node accepted, remembered for the window.

A signature (`kvs.routing.peers`) is valid for `window` seconds either side of
its timestamp, and covers a random nonce. A receiver that admits each nonce
once within that time refuses a captured request sent again, while a
legitimate retry (the same request id, a new signature) passes: the request id
is what makes a write exactly-once, the nonce what makes a message single-use.

Nonces are kept per second of their signature's timestamp: a second whose
signatures are older than the window is dropped whole, so memory holds only
the nonces that could still be replayed and every call does O(1) work
(amortised: at most one second is dropped per elapsed second). Only requests
whose signature was verified are admitted, so a sender without the secret
cannot fill the cache. `capacity` is a backstop against a flood of authentic
traffic: reaching it drops the oldest seconds and refuses signatures from them
from then on (the window narrows; no nonce is ever forgotten while a signature
carrying it could still be accepted).

One cache per node, shared by the event loop and the Flask worker threads: a
lock guards it.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

# 30 s of 30,000 forwarded requests/s (twice what the benchmarks drive through one node); a nonce and
# its set slot take about 120 bytes, so the cache stays near 120 MB at worst.
MAX_NONCES = 1_000_000


class NonceCache:
    def __init__(self, window: int, capacity: int = MAX_NONCES, since: int = 0):
        self._window = window
        self._capacity = capacity
        self._by_second: dict[int, set[str]] = {}
        # Signatures from before this second are refused: their nonces are forgotten. It never goes back, so
        # after the clock steps back, signatures older than where it was are refused until it gets there again.
        # It starts at `since`: a node passes the second it started, since the nonces it admitted before a
        # restart are gone (a request signed before then is refused; its sender's retry is signed anew).
        self._oldest = since
        self._size = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def admit(self, second: int, nonce: str, now: float) -> bool:
        """Record `nonce` of a verified signature made at `second`; False if it was seen before, or if
        `second` is older than what the cache still remembers (so it cannot tell)."""
        with self._lock:
            self._forget_before(int(now) - self._window)
            if self._size >= self._capacity:
                self._evict_oldest()
            if second < self._oldest:
                return False
            bucket = self._by_second.get(second)
            if bucket is None:
                bucket = self._by_second[second] = set()
            elif nonce in bucket:
                return False
            bucket.add(nonce)
            self._size += 1
            return True

    def _forget_before(self, second: int) -> None:
        if second <= self._oldest:
            return
        if second - self._oldest > len(self._by_second):
            # after an idle spell (or a clock step) scanning the few seconds held beats stepping through all
            for old in [s for s in self._by_second if s < second]:
                self._size -= len(self._by_second.pop(old))
        else:
            for old in range(self._oldest, second):
                bucket = self._by_second.pop(old, None)
                if bucket:
                    self._size -= len(bucket)
        self._oldest = second

    def _evict_oldest(self) -> None:
        """Drop whole seconds, oldest first, until there is room: the window narrows instead of
        opening, since signatures from a dropped second are refused from now on."""
        while self._size >= self._capacity and self._by_second:
            self._forget_before(min(self._by_second) + 1)
        log.warning("replay cache full (%d nonces): signatures older than second %d are refused",
                    self._capacity, self._oldest)
