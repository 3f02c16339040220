"""HostTrust: the hosts an unsecured cluster's node takes node-to-node requests from.

Without a cluster secret nothing authenticates a node-to-node request, so a node answers them (the
internal endpoints, forwarded key requests, large bodies) only from the hosts of the nodes it knows:
its VIEW, the active and pending epochs' views, the metadata members. Requests arrive from an IP
address while a view may name a node by host name (`localhost`, a Compose service name) or by an
IPv6 literal in brackets, so every host is compared as a canonical IP address, and names are
resolved.

Resolution (DNS, /etc/hosts) may block, so it never runs on the event loop that checks requests:
`refresh` runs at start and on every round of the node's supervisor thread, and looks a name up
again at most every RESOLVE_SECONDS (a name that stops resolving keeps its last addresses); `trusts`
only reads the set the last refresh built. A node added by a view change is trusted from the
supervisor round that adopts the change on (its requests are refused, and retried, until then).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Callable, Iterable

log = logging.getLogger(__name__)

RESOLVE_SECONDS = 30.0


def canonical_ip(host: str) -> str | None:
    """`host` (an IP address, IPv6 possibly in brackets) in canonical form; None if it is a name."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _resolve(name: str) -> set[str]:
    return {str(ipaddress.ip_address(info[4][0].split("%")[0]))
            for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}


class HostTrust:
    def __init__(self, addresses: Iterable[str] = (), resolve: Callable[[str], set[str]] = _resolve,
                 clock: Callable[[], float] = time.monotonic):
        self._resolve = resolve
        self._clock = clock
        self._names: dict[str, tuple[float, frozenset[str]]] = {}     # name -> (resolved at, its addresses)
        self._trusted: frozenset[str] = frozenset()
        self.refresh(addresses)

    def refresh(self, addresses: Iterable[str]) -> None:
        """Trust exactly the hosts of `addresses` ("host:port"); names resolved (supervisor thread only)."""
        trusted: set[str] = set()
        names: dict[str, tuple[float, frozenset[str]]] = {}
        for address in addresses:
            host = address.rsplit(":", 1)[0]
            ip = canonical_ip(host)
            if ip is not None:
                trusted.add(ip)
                continue
            names[host] = self._lookup(host)
            trusted.update(names[host][1])
        self._names = names              # names no longer in any view are forgotten
        self._trusted = frozenset(trusted)

    def _lookup(self, name: str) -> tuple[float, frozenset[str]]:
        now = self._clock()
        known = self._names.get(name)
        if known is not None and now - known[0] < RESOLVE_SECONDS:
            return known
        try:
            return now, frozenset(self._resolve(name))
        except (OSError, UnicodeError, ValueError) as exc:
            log.warning("cannot resolve %s (%s): its node-to-node requests are refused until it resolves",
                        name, exc)
            return now, known[1] if known is not None else frozenset()

    def trusts(self, host: str) -> bool:
        """Whether a request from `host` (an IP address, as the socket reports it) comes from a known node."""
        ip = canonical_ip(host)
        return ip is not None and ip in self._trusted
