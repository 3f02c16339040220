"""Streamed response bodies (`Response.stream`, such as `GET /fetch` of a whole store).

The head goes first (chunked on HTTP/1.1; on 1.0 the connection ends the
body), then each piece as the handler's iterator yields it. While the client
does not read (the transport paused writing), the iterator is not asked for
more; a client that reads nothing for the server's idle timeout is dropped.
An error midway aborts the connection: the client sees a broken body, never
a short one that parses.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kvs.http.aio.messages import Request, Response, encode_stream_head

log = logging.getLogger(__name__)


async def write_streamed(conn: Any, request: Request, response: Response, keep_alive: bool) -> bool:
    """Head and body of a streamed response on `conn` (a `kvs.http.aio.connection.Connection`); True once
    the body is complete, False if the connection was lost or must be aborted."""
    chunked = request.version == "1.1"
    stream = response.stream
    try:
        conn.transport.write(encode_stream_head(response, request.version, keep_alive, conn.server.ident))
        async for piece in stream:
            if conn.lost:
                return False
            if piece:
                conn.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                conn.last_activity = conn.loop.time()
            if not await drained(conn):
                log.warning("%s %s: the client read nothing for %ss; connection dropped", request.method,
                            request.path, conn.server.idle_timeout)
                return False
    except Exception:
        log.exception("streaming %s %s failed midway", request.method, request.path)
        return False
    finally:
        await stream.aclose()
    if chunked and not conn.lost:
        conn.transport.write(b"0\r\n\r\n")
    return not conn.lost


async def drained(conn: Any) -> bool:
    """Wait while the client does not read; False if it read nothing for the idle timeout. Only this wait's
    timeout counts as the client's: a TimeoutError from the handler's iterator is the handler's failure."""
    while conn.write_paused and not conn.lost:
        try:
            await asyncio.wait_for(conn.writable(), conn.server.idle_timeout)
        except asyncio.TimeoutError:
            return False
    return True
