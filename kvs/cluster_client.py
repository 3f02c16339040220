"""Client: the library a Python program uses to talk to a kvs cluster.

    from kvs import Client
    kv = Client(["10.0.0.2:13800", "10.0.0.3:13800"])
    version = kv.put("k", "v")
    value = kv.get("k")                       # KeyNotFound if it does not exist
    kv.put("k", "w", if_match=version)        # PreconditionFailed if another write came first
    kv.set_many({"a": "1", b"\\x00": b"\\xff"}); kv.get_many(["a", "b"]); kv.shards(); kv.key_count()

It learns the cluster's routing (`GET /kvs/routing`: the epoch's ring and each
shard's replicas and leader), hashes each key to its shard as the nodes do, and
sends the request straight to that shard's leader (or a replica while the
leader is unknown), so no node has to forward it. Every answer names the
shard's leader (X-Kvs-Leader), which the next request of that shard follows.
A node that does not answer, or a 503 (an election, a view change), makes it
refresh the routing and try again, with the same Idempotency-Key for a write,
until `timeout` seconds have passed; so a write is applied once however many
attempts it took. Connections are pooled (one requests.Session per client).
Errors are typed: KeyNotFound, PreconditionFailed (a Conflict), Conflict,
BadRequest, Unauthorized, Unavailable (the outcome of a write is unknown).
"""

from __future__ import annotations

import base64
import itertools
import time
import urllib.request
import uuid
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import quote

import requests

from kvs.client import data_object, data_value, key_path
from kvs.config.ring import HashRing

CONNECT_SECONDS = 1.0              # one connection attempt
RETRY_PAUSE = 0.05                 # after every node of a shard failed once (doubles up to 1 s)
LEADER_HINT = "X-Kvs-Leader"


class KvsError(Exception):
    """An answer the cluster gave, or none (Unavailable); `status` and `body` as received."""

    def __init__(self, message: str, status: int = 0, body: Any = None):
        super().__init__(message)
        self.status, self.body = status, body


class KeyNotFound(KvsError):
    pass


class Conflict(KvsError):
    pass


class PreconditionFailed(Conflict):
    """A compare-and-set whose condition did not hold; `version` is the key's current one (0: absent)."""

    @property
    def version(self) -> int:
        return (self.body or {}).get("version", 0)


class BadRequest(KvsError):
    pass


class Unauthorized(KvsError):
    pass


class Unavailable(KvsError):
    """No answer in time: for a write, the outcome is unknown (retrying with the same key is safe)."""


_ERRORS = {404: KeyNotFound, 412: PreconditionFailed, 409: Conflict, 400: BadRequest, 413: BadRequest,
           405: BadRequest, 401: Unauthorized}


class Client:
    def __init__(self, endpoints: Iterable[str], timeout: float = 10.0):
        self._endpoints = list(endpoints)
        if not self._endpoints:
            raise ValueError("give at least one host:port")
        self.timeout = timeout
        self._session = requests.Session()
        if not urllib.request.getproxies():
            # requests looks for proxy settings in the environment on every request (about 15 % of a
            # request's CPU); with none configured there is nothing to find. (This also skips .netrc
            # and the CA bundle variables, which plain-HTTP nodes never use.)
            self._session.trust_env = False
        self._ring: HashRing | None = None
        self._replicas: dict[str, list[str]] = {}
        self._leaders: dict[str, str] = {}
        self._spread = itertools.count()

    # -- keys -------------------------------------------------------------------------------------------

    def get(self, key: str) -> str | bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[str | bytes, int]:
        body = self._key("GET", key)
        value = base64.b64decode(body["value"]) if body.get("encoding") == "binary" else body["value"]
        return value, body.get("version", 0)

    def put(self, key: str, value: str, if_match: int | None = None, if_none_match: bool = False) -> int:
        """Write `key`; its new version. `if_match` / `if_none_match` make it a compare-and-set."""
        headers = {}
        if if_match is not None:
            headers["If-Match"] = f'"{int(if_match)}"'
        if if_none_match:
            headers["If-None-Match"] = "*"
        return self._key("PUT", key, {"value": value}, headers)["version"]

    def delete(self, key: str, if_match: int | None = None) -> None:
        self._key("DELETE", key, None, {"If-Match": f'"{int(if_match)}"'} if if_match is not None else {})

    # -- batches (each shard's part atomic; the batch as a whole not) --------------------------------

    def set_many(self, pairs: Mapping | Iterable[tuple]) -> dict:
        """{"keys_added": n, "keys_failed": [...]} of the whole batch."""
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        body = [{"key": data_object(k), "value": data_object(v)} for k, v in items]
        return self._any("PUT", "/set", body, {"Idempotency-Key": uuid.uuid4().hex})[0]

    def get_many(self, keys: Iterable) -> dict:
        """{key: value} of the keys that exist."""
        answers = self._any("POST", "/fetch", [data_object(k) for k in keys])
        return {data_value(a["key"]): data_value(a["value"]) for a in answers if a.get("value") is not None}

    def shards(self) -> list[str]:
        return self._any("GET", "/kvs/shards")["shards"]

    def key_count(self, shard_id: str | None = None) -> int:
        """Keys of one shard, or of the whole cluster."""
        ids = [shard_id] if shard_id is not None else self.shards()
        return sum(self._any("GET", f"/kvs/shards/{quote(s, safe='')}")["key-count"] for s in ids)

    def close(self) -> None:
        self._session.close()

    # -- routing ----------------------------------------------------------------------------------------

    def _key(self, method: str, key: str, body: dict | None = None, headers: dict | None = None) -> dict:
        headers = dict(headers or {})
        if method != "GET":
            headers["Idempotency-Key"] = uuid.uuid4().hex      # every attempt of this write: applied once
        path = key_path(key)
        deadline = time.monotonic() + self.timeout
        pause = RETRY_PAUSE
        while True:
            if self._ring is None:
                self._refresh(deadline)
            shard = self._ring.group_for(key) if self._ring is not None else None
            for node in self._candidates(shard):
                answer = self._send(node, method, path, body, headers, deadline, shard)
                if answer is not None:
                    return answer
            if time.monotonic() >= deadline:
                raise Unavailable(f"{method} {key!r}: no replica of its shard answered within {self.timeout}s")
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))  # a pause between rounds, bounded
            pause = min(pause * 2, 1.0)
            self._ring = None                                   # an election or a view change: ask again

    def _candidates(self, shard: str | None) -> Iterator[str]:
        """The nodes to try, in order; lazily, as the first (the shard's leader) usually answers."""
        if shard is None:
            yield from list(self._endpoints)
            return
        leader = self._leaders.get(shard)
        if leader:
            yield leader
        replicas = list(self._replicas.get(shard) or self._endpoints)
        start = next(self._spread) % len(replicas)              # spread reads over replicas meanwhile
        ordered = [r for r in replicas[start:] + replicas[:start] if r != leader]
        yield from ordered
        # last, the addresses the client was given: behind NAT or published ports (Docker) the nodes'
        # own addresses may be unreachable from here, and any node forwards
        yield from [e for e in self._endpoints if e not in ordered and e != leader]

    def _send(self, node: str, method: str, path: str, body: Any, headers: dict, deadline: float,
              shard: str | None) -> dict | None:
        """The answer's body, an exception for an answer that is final, None to try elsewhere."""
        try:
            remaining = max(0.05, min(self.timeout, deadline - time.monotonic()))
            # connecting gets CONNECT_SECONDS: an address that drops SYNs must not take the whole deadline
            resp = self._session.request(method, f"http://{node}{path}", json=body, headers=headers,
                                         timeout=(min(CONNECT_SECONDS, remaining), remaining))
        except requests.RequestException:
            if shard is not None and self._leaders.get(shard) == node:
                del self._leaders[shard]
            return None
        leader = resp.headers.get(LEADER_HINT)
        if shard is not None and leader:
            self._leaders[shard] = leader
        if resp.status_code == 503:
            return None
        try:
            data = resp.json()
        except ValueError:
            data = {"raw": resp.text}
        if resp.status_code >= 400:
            error = _ERRORS.get(resp.status_code, KvsError)
            raise error(data.get("error", str(resp.status_code)) if isinstance(data, dict) else str(data),
                        resp.status_code, data)
        return data

    def _any(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> Any:
        deadline = time.monotonic() + self.timeout
        while True:
            for node in self._endpoints:
                answer = self._send(node, method, path, body, headers or {}, deadline, None)
                if answer is not None:
                    return answer
            if time.monotonic() >= deadline:
                raise Unavailable(f"{method} {path}: no node answered within {self.timeout}s")
            time.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))   # bounded pause between rounds

    def _refresh(self, deadline: float) -> None:
        try:
            routing = self._any("GET", "/kvs/routing")
        except KvsError:
            return                                              # no routing yet: any endpoint forwards
        self._ring = HashRing.from_dict(routing["ring"])
        self._replicas = {sid: s["replicas"] for sid, s in routing["shards"].items()}
        self._leaders = {sid: s["leader"] for sid, s in routing["shards"].items() if s.get("leader")}
