"""Host names for PySyncObj's connections, resolved without blocking the thread that connects.

PySyncObj resolves a peer's host on every connect attempt (`TCPNode.ip` → `globalDnsResolver()`),
with `socket.getaddrinfo`, on the thread that ticks the replica. On a tick thread a slow DNS server
delays that group only; on the node's event loop (`KVS_RAFT_ON_LOOP=on`) it would stop the node's
HTTP and every group on the loop for as long as the lookup takes, which has no bound worth
trusting. So, once `install()` has run (a node whose groups tick on the loop):
- an IP address is its own answer, at once, as it was (most views name IPs);
- a name answers from a cache (PySyncObj's `dnsCacheTime` and `dnsFailCacheTime`, as before); a
  stale entry is refreshed on the resolver's one lookup thread, and the caller gets the stale
  answer meanwhile;
- a name never looked up is looked up at once off an event loop (a constructor binding its
  address, a tick thread), as before; on a loop it is looked up on that thread too, and the caller
  gets None meanwhile, which PySyncObj takes for "cannot connect now" and retries after
  `connectionRetryTime`;
- `prime(hosts)` resolves on the calling thread, for a replica's peers before its loop takes it, so
  its first connects do not wait for a retry.

The lookup thread is a daemon started at the first lookup; it lives as long as the process, as
PySyncObj's resolver does, and holds nothing that needs closing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import queue
import random
import socket
import threading
import time
from typing import Callable, Iterable

import pysyncobj.dns_resolver

log = logging.getLogger(__name__)


def _lookup(host: str, family: int | None) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as exc:          # socket.gaierror is an OSError
        log.warning("cannot resolve %s: %s", host, exc)
        return []
    preferred = sorted({info[4][0] for info in infos if family is None or info[0] == family})
    return preferred or sorted({info[4][0] for info in infos})


def _on_event_loop() -> bool:
    return asyncio._get_running_loop() is not None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class BackgroundResolver:
    """PySyncObj's DnsCachingResolver interface (`resolve`, `setTimeouts`, `setPreferredAddrFamily`);
    `resolve` never blocks."""

    def __init__(self, cache_seconds: float = 600.0, fail_cache_seconds: float = 30.0,
                 lookup: Callable[[str, int | None], list[str]] = _lookup):
        self._lookup = lookup
        self._cache_seconds = cache_seconds
        self._fail_cache_seconds = fail_cache_seconds
        self._family: int | None = socket.AF_INET
        self._lock = threading.Lock()
        # host -> (looked up at, addresses, whether that lookup succeeded)
        self._cache: dict[str, tuple[float, list[str], bool]] = {}
        self._queued: set[str] = set()
        self._requests: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # -- PySyncObj's interface ------------------------------------------------------------

    def setTimeouts(self, cacheTime: float, failCacheTime: float) -> None:
        self._cache_seconds, self._fail_cache_seconds = cacheTime, failCacheTime

    def setPreferredAddrFamily(self, preferredAddrFamily: object) -> None:
        # As PySyncObj: None, "ipv4", "ipv6" (which it, too, maps to AF_INET) or a family constant.
        if preferredAddrFamily is None:
            self._family = None
        elif preferredAddrFamily in ("ipv4", "ipv6"):
            self._family = socket.AF_INET
        else:
            self._family = preferredAddrFamily      # type: ignore[assignment]

    def resolve(self, hostname: str) -> str | None:
        """An address of `hostname` now: an IP itself, else a cached one (refreshed in the background
        when stale), or None while nothing is known."""
        if _is_ip(hostname):
            return hostname
        on_loop = _on_event_loop()
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(hostname)
            stale = entry is None or now - entry[0] > (self._cache_seconds if entry[2] else self._fail_cache_seconds)
            if stale and (entry is not None or on_loop):
                self._request(hostname)
        if entry is None and not on_loop:
            self._store(hostname, self._lookup(hostname, self._family))
            entry = self._cache[hostname]
        ips = entry[1] if entry is not None else []
        return random.choice(ips) if ips else None

    # -- ours ------------------------------------------------------------------------------

    def prime(self, hosts: Iterable[str]) -> None:
        """Resolve the names among `hosts` that the cache lacks, on this thread (before a loop takes
        the replica that connects to them)."""
        for host in hosts:
            if _is_ip(host):
                continue
            with self._lock:
                entry = self._cache.get(host)
                if entry is not None and entry[2]:
                    continue
            self._store(host, self._lookup(host, self._family))

    def _request(self, host: str) -> None:
        # Under the lock.
        if host in self._queued:
            return
        self._queued.add(host)
        self._requests.put(host)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="raft-dns", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            host = self._requests.get()
            try:
                ips = self._lookup(host, self._family)
            except Exception:           # _lookup catches what getaddrinfo raises; an injected one may not
                log.exception("resolving %s failed", host)
                ips = []
            self._store(host, ips, done=True)

    def _store(self, host: str, ips: list[str], done: bool = False) -> None:
        with self._lock:
            previous = self._cache.get(host, (0.0, [], False))[1]
            # A failed lookup keeps the last addresses, as PySyncObj does, and is retried sooner.
            self._cache[host] = (time.monotonic(), ips or previous, bool(ips))
            if done:
                self._queued.discard(host)      # with the answer stored: no second lookup meanwhile


_installed: BackgroundResolver | None = None
_install_lock = threading.Lock()


def install() -> BackgroundResolver:
    """Make PySyncObj's global resolver a BackgroundResolver (once per process); return it."""
    global _installed
    with _install_lock:
        if _installed is None:
            current = pysyncobj.dns_resolver._g_resolver
            _installed = BackgroundResolver()
            if current is not None:
                # Keep the timeouts a SyncObj already set (it calls setTimeouts at construction).
                _installed.setTimeouts(current._DnsCachingResolver__cacheTime,
                                       current._DnsCachingResolver__failCacheTime)
            pysyncobj.dns_resolver._g_resolver = _installed
        return _installed
