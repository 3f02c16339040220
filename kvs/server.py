"""NodeServer: one kvs node process, wired, started and stopped in one place.

    settings -> Node (groups, epochs) -> Router (key -> group -> replica)
             -> ViewChange (the coordinator) and its watchers -> Flask app -> waitress

Every background thread is started here and ends when the one `stopping`
event is set: the node's supervisor (which owns every Raft replica), the
takeover watcher, the epoch sync, the metadata membership. SIGTERM and SIGINT
set it: waitress stops accepting and lets in-flight requests finish (5 s at
most), a running view change gets a bounded time to end (a metadata member
takes over what it leaves), every thread is joined, the supervisor closes the
replicas, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

import waitress

from kvs.http.common import Services
from kvs.http.public import create_app
from kvs.node import Node
from kvs.reconfig.coordinator import ViewChange
from kvs.reconfig.epoch_sync import EpochSync
from kvs.reconfig.membership import MetadataMembership
from kvs.reconfig.remote import Remote
from kvs.reconfig.takeover import TakeoverWatcher
from kvs.routing.peers import Forwarder
from kvs.routing.router import Router
from kvs.settings import NodeSettings

log = logging.getLogger(__name__)

HTTP_THREADS = 48
JOIN_SECONDS = 15.0


class NodeServer:
    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self.stopping = threading.Event()
        self.node = Node(settings)
        forwarder = Forwarder(settings.secret, settings.bind_host)
        remote = Remote(forwarder)
        self.view_change = ViewChange(self.node, remote)
        self.app = create_app(Services(self.node, Router(self.node, forwarder), self.view_change))
        self._workers: list[tuple[str, Callable[[threading.Event], None]]] = [
            ("kvs-supervisor", self.node.supervise),
            ("kvs-takeover", TakeoverWatcher(self.node, self.view_change, remote).run),
            ("kvs-epoch-sync", EpochSync(self.node, remote).run),
            ("kvs-metadata-membership", MetadataMembership(self.node, remote).run),
        ]
        self._threads: list[threading.Thread] = []
        self._http = None

    def listen(self) -> None:
        """Bind the HTTP port (OSError if taken). Done before any replica starts, so a port clash fails
        fast and touches no data."""
        self._http = waitress.create_server(self.app, host=self.settings.bind_host, port=self.settings.http_port,
                                            threads=HTTP_THREADS, connection_limit=1000, ident="kvs")

    def start(self) -> None:
        if not self.settings.secured:
            log.warning("KVS_SECRET is not set: Raft ports accept unauthenticated pickles and "
                        "node-to-node HTTP is not authenticated")
        for name, body in self._workers:
            thread = threading.Thread(target=body, args=(self.stopping,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def serve(self) -> None:
        """Serve HTTP on this (the main) thread until SIGTERM or SIGINT, then stop everything."""
        def request_stop(signum: int, frame: object) -> None:
            log.info("signal %d: stopping", signum)
            raise SystemExit(0)         # waitress's loop ends on it and finishes in-flight requests

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        log.info("serving %s on %s:%d", self.settings.address, self.settings.bind_host, self.settings.http_port)
        try:
            self._http.run()
        finally:
            self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self.node.wake()
        self.view_change.stop()
        for thread in self._threads:
            thread.join(JOIN_SECONDS)
            if thread.is_alive():
                log.warning("thread %s did not stop within %ss", thread.name, JOIN_SECONDS)
        log.info("%s stopped", self.settings.address)
