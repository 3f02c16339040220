"""HTTP/1.1 on an asyncio event loop: a server whose chosen requests are served on the loop itself
(the rest by a WSGI application on threads), and a pooled keep-alive client for node-to-node requests.

Generic transport pieces with no knowledge of kvs's routes or of Raft:
`server.HttpServer`, `client.HttpClient`, and the `messages` they exchange.
"""

from kvs.http.aio.client import HttpClient
from kvs.http.aio.messages import Headers, Request, Response, wsgi_path
from kvs.http.aio.server import HttpServer, new_event_loop

__all__ = ["Headers", "HttpClient", "HttpServer", "Request", "Response", "new_event_loop", "wsgi_path"]
