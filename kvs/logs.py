"""Logging of a node and of the `kvs` command: text or one JSON object per line, and the access log.

    KVS_LOG_LEVEL    DEBUG, INFO (default), WARNING, ERROR
    KVS_LOG_FORMAT   text (default) or json: {"ts", "level", "logger", "message", ...} per line, with
                     "request_id", "method", "path", "status", "ms" on access lines, "exc" for a traceback
    KVS_ACCESS_LOG   on: one line per HTTP request on the logger "kvs.access" (method, path, status,
                     duration, request id); off by default: at thousands of requests a second it costs
                     about a tenth of a core

The request id of an access line is the one the request was served with (its
Idempotency-Key, or the id the node gave it) and is echoed in the reply's
X-Request-Id header; a forwarded hop carries it, so the lines of every node
that served one request share it.
"""

from __future__ import annotations

import json
import logging
import os
import time

ACCESS = logging.getLogger("kvs.access")
REQUEST_ID_HEADER = "X-Request-Id"
_ACCESS_FIELDS = ("request_id", "method", "path", "status", "ms", "peer")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for field in _ACCESS_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure() -> None:
    """Set up the root logger from the environment (once per process)."""
    handler = logging.StreamHandler()
    if os.environ.get("KVS_LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("KVS_LOG_LEVEL", "INFO").upper())
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)
    ACCESS.disabled = os.environ.get("KVS_ACCESS_LOG", "off").lower() not in ("on", "1", "true", "yes")


def access(method: str, path: str, status: int, seconds: float, request_id: str | None, peer: str | None) -> None:
    """One access line (when KVS_ACCESS_LOG is on)."""
    if ACCESS.disabled:
        return
    ms = round(seconds * 1000, 3)
    ACCESS.info("%s %s %d %.3fms id=%s", method, path, status, ms, request_id or "-",
                extra={"request_id": request_id, "method": method, "path": path, "status": status, "ms": ms,
                       "peer": peer})
