"""The OpenAPI 3.1 description of the public API, served at `GET /openapi.json`.

Written by hand next to the routes it describes (`kvs.http.keys`, `kvs.http.batches`,
`kvs.http.public`); `tests/test_openapi.py` validates live answers against it and runs
schemathesis over it on a real cluster, so a route and its description cannot drift apart
unnoticed. Node-to-node routes (/internal/...) are not part of it.
"""

from __future__ import annotations

_ERROR = {"type": "object", "required": ["error", "message"],
          "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}
_DATA = {"type": "object", "required": ["encoding", "data"],
         "properties": {"encoding": {"enum": ["string", "binary"]}, "data": {"type": "string"}}}
_SHARDS_REPLY = {"type": "object", "required": ["message", "shards"], "properties": {
    "message": {"type": "string"},
    "shards": {"type": "array", "items": {"type": "object", "required": ["shard-id", "key-count", "replicas"],
                                          "properties": {"shard-id": {"type": "string"},
                                                         "key-count": {"type": "integer"},
                                                         "replicas": {"type": "array", "items": {"type": "string"}},
                                                         "address": {"type": "string"}}}}}}
_STATUS = {"type": "object", "required": ["status", "reason"],
           "properties": {"status": {"enum": ["ok", "unavailable"]}, "reason": {"type": "string"}}}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _answers(ok: dict | None = None, **errors: str) -> dict:
    """Responses: `ok` per success status, and kvs's error body for the error statuses named (e503="...")."""
    responses = {code: {"description": "success", **_json(schema)} for code, schema in (ok or {}).items()}
    for code, text in errors.items():
        responses[code[1:]] = {"description": text, **_json(_ERROR)}
    return responses


_KEY = [{"name": "key", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}]
_CONDITIONS = [{"name": "If-Match", "in": "header", "required": False,
                "schema": {"type": "string", "pattern": '^(\\*|"[0-9]{1,18}"|[0-9]{1,18})$'}},
               {"name": "If-None-Match", "in": "header", "required": False, "schema": {"enum": ["*"]}}]
_IDEMPOTENCY = [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}]
_WRITTEN = {"type": "object", "required": ["message", "replaced", "version"],
            "properties": {"message": {"type": "string"}, "replaced": {"type": "boolean"},
                           "version": {"type": "integer"}, "address": {"type": "string"},
                           "causal-context": {"type": "object"}}}
_FOUND = {"type": "object", "required": ["doesExist", "message", "value", "version"],
          "properties": {"doesExist": {"const": True}, "message": {"type": "string"}, "value": {"type": "string"},
                         "version": {"type": "integer"}, "encoding": {"const": "binary"},
                         "address": {"type": "string"}, "causal-context": {"type": "object"}}}
_CHANGE_ERRORS = dict(e400="malformed or impossible change", e401="admin token missing or wrong",
                      e409="a change is running",
                      e503="the change failed and was rolled back, or the node could not read the committed "
                           "configuration (not a metadata member, or cut off)")

SPEC: dict = {
    "openapi": "3.1.0",
    "info": {"title": "kvs", "version": "1",
             "description": "A sharded, replicated key-value store: every node accepts every request."},
    "paths": {
        "/kvs/keys/{key}": {
            "parameters": _KEY,
            "get": {"summary": "Read a key (linearizable)",
                    "responses": _answers({"200": _FOUND}, e400="malformed request", e404="the key does not exist",
                                          e503="no quorum in time")},
            "put": {"summary": "Write a key; If-Match / If-None-Match make it a compare-and-set",
                    "parameters": _CONDITIONS + _IDEMPOTENCY,
                    "requestBody": {"required": True, **_json({"type": "object", "required": ["value"], "properties": {
                        "value": {"type": "string"}, "causal-context": {"type": "object"}}})},
                    "responses": _answers({"200": _WRITTEN, "201": _WRITTEN}, e400="malformed request or key too long",
                                          e412="the condition does not hold", e413="body over the limit",
                                          e503="no quorum in time; the outcome is unknown")},
            "delete": {"summary": "Delete a key", "parameters": _CONDITIONS + _IDEMPOTENCY,
                       "responses": _answers({"200": {"type": "object"}}, e400="malformed request",
                                             e404="the key does not exist", e412="the condition does not hold",
                                             e503="no quorum in time; the outcome is unknown")},
        },
        "/set": {"put": {
            "summary": "Write pairs; each shard's part is atomic, the batch across shards is not",
            "parameters": _IDEMPOTENCY,
            "requestBody": {"required": True, **_json({"type": "array", "maxItems": 1000, "items": {
                "type": "object", "required": ["key", "value"], "properties": {"key": _DATA, "value": _DATA}}})},
            "responses": _answers({"200": {"type": "array", "items": {
                "type": "object", "required": ["keys_added", "keys_failed"],
                "properties": {"keys_added": {"type": "integer"}, "keys_failed": {"type": "array", "items": {
                    "type": "object", "required": ["key", "error"]}}}}}},
                e400="malformed item", e413="more than 1000 pairs, or the body over the limit")}},
        "/fetch": {
            "post": {"summary": "Read keys",
                     "requestBody": {"required": True, **_json({"type": "array", "maxItems": 1000, "items": _DATA})},
                     "responses": _answers({"200": {"type": "array", "items": {
                         "type": "object", "required": ["key", "value"]}}}, e400="malformed item",
                         e413="more than 1000 keys")},
            "get": {"summary": "Every pair of the store, streamed",
                    "responses": _answers({"200": {"type": "array", "items": {
                        "type": "object", "required": ["key", "value"],
                        "properties": {"key": _DATA, "value": _DATA}}}}, e503="a shard cannot answer")}},
        "/query": {"post": {
            "summary": "Which keys exist",
            "requestBody": {"required": True, **_json({"type": "array", "maxItems": 1000, "items": _DATA})},
            "responses": _answers({"200": {"type": "array", "items": {"type": "object", "required": ["key", "value"]}}},
                                  e400="malformed item", e413="more than 1000 keys")}},
        "/kvs/key-count": {"get": {"summary": "Keys of this node's shard", "responses": _answers(
            {"200": {"type": "object", "required": ["key-count", "shard-id"]}}, e503="no shard here, or no quorum")}},
        "/kvs/shards": {"get": {"summary": "The shard ids", "responses": _answers(
            {"200": {"type": "object", "required": ["shards"],
                     "properties": {"shards": {"type": "array", "items": {"type": "string"}}}}})}},
        "/kvs/shards/{shard}": {
            "parameters": [{"name": "shard", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"summary": "A shard's key count and replicas", "responses": _answers(
                {"200": {"type": "object", "required": ["shard-id", "key-count", "replicas"]}},
                e404="no such shard", e503="no replica answered")}},
        "/kvs/view-change": {
            "get": {"summary": "The change in progress", "responses": _answers(
                {"200": {"type": "object", "required": ["epoch", "phase", "plan", "progress"]}})},
            "put": {"summary": "Change the view (admin)",
                    "requestBody": {"required": True, **_json({"type": "object", "required": ["view"], "properties": {
                        "view": {"type": "string"}, "repl-factor": {"type": "integer"}}})},
                    "responses": _answers({"200": _SHARDS_REPLY}, **_CHANGE_ERRORS)}},
        "/kvs/view-change/add-member": {"put": {
            "summary": "An idle node joins a shard (admin)",
            "requestBody": {"required": True, **_json({"type": "object", "required": ["address", "shard-id"]})},
            "responses": _answers({"200": _SHARDS_REPLY}, **_CHANGE_ERRORS)}},
        "/kvs/view-change/remove-member": {"put": {
            "summary": "A node leaves the view (admin)",
            "requestBody": {"required": True, **_json({"type": "object", "required": ["address"]})},
            "responses": _answers({"200": _SHARDS_REPLY}, **_CHANGE_ERRORS)}},
        "/kvs/reshard": {"put": {
            "summary": "The same nodes in another number of shards (admin)",
            "requestBody": {"required": True, **_json({"type": "object", "required": ["shard-count"]})},
            "responses": _answers({"200": _SHARDS_REPLY}, **_CHANGE_ERRORS)}},
        "/kvs/routing": {"get": {"summary": "What a cluster-aware client routes by", "responses": _answers(
            {"200": {"type": "object", "required": ["epoch", "ring", "shards"]}}, e503="no configuration yet")}},
        "/kvs/status": {"get": {"summary": "This node's status", "responses": _answers(
            {"200": {"type": "object", "required": ["epoch", "groups"]}})}},
        "/health": {"get": {"summary": "Ready (as /readyz)", "responses": {
            "200": {"description": "ready", **_json(_STATUS)}, "503": {"description": "not ready", **_json(_STATUS)}}}},
        "/readyz": {"get": {"summary": "Ready: configuration known, every hosted group has a leader", "responses": {
            "200": {"description": "ready", **_json(_STATUS)}, "503": {"description": "not ready", **_json(_STATUS)}}}},
        "/livez": {"get": {"summary": "Live: the node serves", "responses": {
            "200": {"description": "live", **_json(_STATUS)}, "503": {"description": "restart it", **_json(_STATUS)}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    },
}
