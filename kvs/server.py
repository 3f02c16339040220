"""NodeServer: one kvs node process, wired, started and stopped in one place.

    settings -> Node (groups, epochs) -> KeyRouter (key -> group -> replica, on the event loop)
             -> ViewChange (the coordinator) and its watchers -> Flask app (admin and internal API)
             -> HttpServer: key requests on the event loop, everything else on worker threads

The main thread runs the event loop (uvloop): the HTTP listener, the key
requests, and their batches to and from the Raft groups (`kvs.raft.loop`).
Every other background thread is started here and ends when the one
`stopping` event is set: the node's supervisor (which owns every Raft
replica), the takeover watcher, the epoch sync, the metadata membership.
SIGTERM and SIGINT stop it gracefully: every group this node leads first hands
its leadership to a caught-up follower (HANDOVER_SECONDS at most, while the
node still serves: a leader that just stops is a crash, and its clients wait
out an election), then the listener stops accepting and in-flight requests
finish (GRACE_SECONDS at most), a running view change gets a bounded time to
end (a metadata member takes over what it leaves), every thread is joined, the
supervisor closes the replicas, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Callable

from kvs.http.aio import HttpClient, HttpServer, new_event_loop
from kvs.http.common import PeerAuth, Services
from kvs.http.keys import FORWARDED_BODY_MARGIN, KEYS_PREFIX, KeyRequests, is_fast, refusal
from kvs.logs import access
from kvs.metrics import observe_request
from kvs.node.metrics import COLLECTOR
from kvs.http.public import INTERNAL_BODY_BYTES, create_app
from kvs.node import Node
from kvs.reconfig.coordinator import ViewChange
from kvs.reconfig.epoch_sync import EpochSync
from kvs.reconfig.membership import MetadataMembership
from kvs.reconfig.remote import Remote
from kvs.reconfig.retired_replicas import RetiredReplicas
from kvs.reconfig.shard_membership import ShardMembership
from kvs.reconfig.takeover import TakeoverWatcher
from kvs.routing.aio_peers import AsyncForwarder
from kvs.routing.keys import KeyRouter
from kvs.routing.peers import Forwarder
from kvs.routing.shards import ShardQueries
from kvs.settings import NodeSettings

log = logging.getLogger(__name__)

WSGI_THREADS = 32          # the admin and internal API (view-change copies, status, shard info)
GRACE_SECONDS = 5.0        # in-flight requests may finish within this at stop
HANDOVER_SECONDS = 5.0     # the groups this node leads must have new leaders within this at stop
JOIN_SECONDS = 15.0
CLIENT_POOL = 128           # idle keep-alive connections kept per peer


def _observe(method: str, path: str, status: int, seconds: float, request_id: str | None, peer: str | None) -> None:
    observe_request(method, path, status, seconds)
    access(method, path, status, seconds, request_id, peer)


class NodeServer:
    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self.stopping = threading.Event()
        self.loop = new_event_loop()
        self.node = Node(settings, loop=self.loop)
        forwarder = Forwarder(settings.secret, settings.bind_host)
        remote = Remote(forwarder)
        self.view_change = ViewChange(self.node, remote)
        # One per node: the key path and the Flask apps must share the memory of accepted nonces.
        peer_auth = PeerAuth(settings.secret, settings.address, self.node.trusts_host)
        self._services = Services(self.node, ShardQueries(self.node, forwarder), self.view_change, peer_auth)
        app = create_app(self._services)
        source_ip = settings.bind_host if settings.bind_host not in ("", "0.0.0.0", "::") else None
        self._client = HttpClient(source_ip=source_ip, max_idle_per_address=CLIENT_POOL)
        self.keys = KeyRouter(self.node, AsyncForwarder(self._client, settings.secret), self.loop)
        self.http = HttpServer(KeyRequests(settings, self.keys, peer_auth), app, fast_paths=is_fast,
                               max_body_bytes=settings.max_body_bytes, wsgi_threads=WSGI_THREADS,
                               refusal=refusal,
                               body_limits=[("/internal/", INTERNAL_BODY_BYTES),
                                            (KEYS_PREFIX, settings.max_body_bytes + FORWARDED_BODY_MARGIN)],
                               large_body_gate=peer_auth.may_be_peer, large_bodies_bytes=2 * INTERNAL_BODY_BYTES,
                               observe=_observe)
        COLLECTOR.watch(self.node, self.view_change.progress.to_dict)
        self._workers: list[tuple[str, Callable[[threading.Event], None]]] = [
            ("kvs-supervisor", self.node.supervise),
            ("kvs-takeover", TakeoverWatcher(self.node, self.view_change, remote).run),
            ("kvs-epoch-sync", EpochSync(self.node, remote).run),
            ("kvs-metadata-membership", MetadataMembership(self.node, remote).run),
            ("kvs-shard-membership", ShardMembership(self.node, remote).run),
            ("kvs-retired-replicas", RetiredReplicas(self.node, remote).run),
        ]
        self._threads: list[threading.Thread] = []

    def listen(self) -> None:
        """Bind the HTTP port (OSError if taken). Done before any replica starts, so a port clash fails
        fast and touches no data."""
        self.loop.run_until_complete(self.http.start(self.settings.bind_host, self.settings.http_port))

    def start(self) -> None:
        if not self.settings.secured:
            log.warning("KVS_SECRET is not set: Raft ports accept unauthenticated pickles and "
                        "node-to-node HTTP is not authenticated")
        if self.settings.raft_on_loop:
            log.warning("KVS_RAFT_ON_LOOP=on: shard groups tick on the event loop (experimental; "
                        "a snapshot install or an fsync now pauses this node's HTTP too)")
        if not self.settings.admin_token:
            log.warning("KVS_ADMIN_TOKEN is not set: anyone who reaches this node can change the cluster's view")
        for name, body in self._workers:
            thread = threading.Thread(target=body, args=(self.stopping,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def serve(self) -> None:
        """Run the event loop on this (the main) thread until SIGTERM or SIGINT, then stop everything."""
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, stop.set)
        log.info("serving %s on %s:%d", self.settings.address, self.settings.bind_host, self.settings.http_port)
        try:
            self.loop.run_until_complete(stop.wait())
            log.info("stopping")
            self._services.stopping.set()
            try:
                self.loop.run_until_complete(self._hand_over())
            except Exception:               # a failed hand-over must not skip the drain below
                log.exception("handing leadership over failed; stopping anyway")
            self.loop.run_until_complete(self.http.stop(GRACE_SECONDS))
        finally:
            self.stop()

    async def _hand_over(self) -> None:
        """Transfer the leadership of every group this node leads (that has another member), serving
        meanwhile; bounded by HANDOVER_SECONDS."""
        # Computed once: a group that a stopping peer hands to this node is not handed on (the whole cluster
        # stopping at once would pass leaderships around until the deadline).
        led = [g for g in self.node.all_groups() if g.failure is None and g.is_leader() and len(g.members()) > 1]
        deadline = time.monotonic() + HANDOVER_SECONDS
        while any(g.is_leader() for g in led) and time.monotonic() < deadline:
            # PySyncObj denies a transfer while no follower has the leader's whole log (writes keep coming):
            # asked again every round until one has it at that moment
            for group in led:
                if group.is_leader():
                    group.transfer_leadership()
            await asyncio.sleep(0.02)       # polling the tick threads' role, bounded by the deadline
        kept = [g.name for g in led if g.is_leader()]
        if kept:
            log.warning("stopping while still leading %s: no follower took over within %ss", ", ".join(kept),
                        HANDOVER_SECONDS)
        elif led:
            log.info("handed leadership of %s over", ", ".join(g.name for g in led))

    def _join_workers(self) -> None:
        for thread in self._threads:
            thread.join(JOIN_SECONDS)
            if thread.is_alive():
                log.warning("thread %s did not stop within %ss", thread.name, JOIN_SECONDS)

    def stop(self) -> None:
        self.stopping.set()
        self.node.wake()
        self.view_change.stop()
        if not self.settings.raft_on_loop or self.loop.is_closed() or self.loop.is_running():
            self._join_workers()
        else:
            # The loop keeps running while the supervisor closes the replicas: those that tick on it
            # (kvs.raft.loop_poller) keep answering their peers until the loop has let go of them.
            self.loop.run_until_complete(asyncio.to_thread(self._join_workers))
        self.keys.close()
        self._client.close()
        self.loop.close()
        log.info("%s stopped", self.settings.address)
