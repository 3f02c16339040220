"""KvsClient: a small blocking client of the REST API, for the CLI, tests and tools.

Every call has a timeout and returns `(status, body)`; connection failures
raise `requests.RequestException`, which callers treat as "outcome unknown".
"""

from __future__ import annotations

import base64
from urllib.parse import quote

import requests


def key_path(key: str) -> str:
    """/kvs/keys/<key>, percent-encoded so that every key arrives as itself: "." and ".." are sent as
    %2E and %2E%2E, which HTTP libraries (requests, urllib3) keep as a segment of the path, where a
    bare "." or ".." is removed as a dot segment (the request would reach /kvs/keys/ or /kvs/)."""
    return "/kvs/keys/" + ("%2E" * len(key) if key in (".", "..") else quote(key, safe=""))


DEFAULT_TIMEOUT = 10.0


class KvsClient:
    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT, session: requests.Session | None = None):
        self.address = address
        self.timeout = timeout
        self._session = session or requests.Session()

    def _call(self, method: str, path: str, body: dict | list | None = None,
              headers: dict | None = None) -> tuple[int, dict]:
        resp = self._session.request(method, f"http://{self.address}{path}", json=body, headers=headers,
                                     timeout=self.timeout)
        try:
            data = resp.json()
        except ValueError:
            data = {"raw": resp.text}
        return resp.status_code, data

    def put(self, key: str, value: str, request_id: str | None = None, if_match: int | str | None = None,
            if_none_match: bool = False) -> tuple[int, dict]:
        """PUT a key. `if_match` (a version from a GET's "version", or "*": the key exists) or `if_none_match`
        (create only) make it a compare-and-set: 412 with the current "version" when the condition fails."""
        headers = _headers(request_id, if_match, if_none_match)
        return self._call("PUT", key_path(key), {"value": value, "causal-context": {}}, headers)

    def get(self, key: str) -> tuple[int, dict]:
        """GET a key; a 200 body carries its "value" and "version"."""
        return self._call("GET", key_path(key), {"causal-context": {}})

    def delete(self, key: str, request_id: str | None = None, if_match: int | str | None = None) -> tuple[int, dict]:
        headers = _headers(request_id, if_match, False)
        return self._call("DELETE", key_path(key), {"causal-context": {}}, headers)

    # -- seed 004's batches: keys and values are str or bytes --------------------------------------------

    def set_many(self, pairs, request_id: str | None = None) -> tuple[int, object]:
        """PUT /set: `pairs` a mapping or (key, value) pairs; answers [{"keys_added", "keys_failed"}]. Each
        shard's part is atomic and exactly-once per `request_id`; the batch across shards is not."""
        items = pairs.items() if hasattr(pairs, "items") else pairs
        body = [{"key": data_object(k), "value": data_object(v)} for k, v in items]
        return self._call("PUT", "/set", body, _headers(request_id, None, False))

    def get_many(self, keys) -> tuple[int, object]:
        """POST /fetch: [{"key", "value"}] in the order asked ("value" null and an "error" if missing)."""
        return self._call("POST", "/fetch", [data_object(k) for k in keys])

    def exists_many(self, keys) -> tuple[int, object]:
        """POST /query: [{"key", "value": true | false}]."""
        return self._call("POST", "/query", [data_object(k) for k in keys])

    def fetch_all(self) -> tuple[int, object]:
        """GET /fetch: every pair of the store (streamed by the node; read whole here)."""
        return self._call("GET", "/fetch")

    def key_count(self) -> tuple[int, dict]:
        return self._call("GET", "/kvs/key-count")

    def shards(self) -> tuple[int, dict]:
        return self._call("GET", "/kvs/shards")

    def shard(self, shard_id: str) -> tuple[int, dict]:
        return self._call("GET", f"/kvs/shards/{quote(shard_id, safe='')}")

    def status(self) -> tuple[int, dict]:
        return self._call("GET", "/kvs/status")

    def health(self) -> tuple[int, dict]:
        return self._call("GET", "/health")


def _headers(request_id: str | None, if_match: int | str | None, if_none_match: bool) -> dict | None:
    headers = {}
    if request_id:
        headers["Idempotency-Key"] = request_id
    if if_match is not None:
        headers["If-Match"] = "*" if if_match == "*" else f'"{int(if_match)}"'
    if if_none_match:
        headers["If-None-Match"] = "*"
    return headers or None


def data_object(data: str | bytes) -> dict:
    """A key or value as seed 004 writes it: {"encoding": "string" | "binary", "data": ...}."""
    if isinstance(data, bytes):
        return {"encoding": "binary", "data": base64.b64encode(data).decode("ascii")}
    return {"encoding": "string", "data": data}


def data_value(obj: dict) -> str | bytes:
    """Inverse of data_object."""
    return base64.b64decode(obj["data"]) if obj["encoding"] == "binary" else obj["data"]
