"""What every request passes before a route: API key, body limit, the request counter, a 500 safety net.

A plain ASGI middleware, not ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` reads the
client's messages in a task group of its own, which swallows ``http.disconnect``, so a route could never
see that its client left (and its queued work would run for nobody). Here the route's ``receive`` is the
server's own, or, for a body read ahead to count it, a replay of that body followed by the server's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.routing import get_route_path

log = logging.getLogger("dporm.server")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
CLIENT_GONE = 499  # nginx's code for a client that closed the connection before the answer


class _ClientGone(Exception):
    pass


class Admission:
    """``authorize(headers)`` returns an error response or None; ``error(code, message, kind)`` builds one.

    Every path but ``open_routes`` needs the API key (a route added later is protected unless listed).
    Paths are the app's own: without the ``root_path`` it is served under, or mounted at, in a larger app.

    ``endpoints()`` names the app's routes: other paths are counted as ``other`` (one label per unknown
    path would let any client grow the metrics without bound). POSTs to ``inference`` routes are timed.
    """

    def __init__(self, app, *, state, open_routes: set[str], authorize, error, endpoints, inference: tuple[str, ...]):
        self.app, self.state, self.open_routes = app, state, open_routes
        self.authorize, self.error, self.endpoints, self.inference = authorize, error, endpoints, inference

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 0

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            response = None
            if get_route_path(scope) not in self.open_routes:
                response = self.authorize(_headers(scope))  # 401 before the body is read
            if response is None:
                response, receive = await self._limit_body(scope, receive)
            if response is not None:
                await response(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        except (_ClientGone, ClientDisconnect):  # the client left while sending its body: nobody to answer
            status = status or CLIENT_GONE
        except Exception as e:  # a bug, not the client's fault: still the error schema, and counted
            log.exception("unhandled error on %s", scope["path"])
            if status:
                raise  # the answer has started: nothing sane to add to it
            failed = self.error(500, f"internal error ({type(e).__name__})", "internal_error")
            await failed(scope, receive, counting_send)
        finally:
            path = get_route_path(scope)
            endpoint = path if path in self.endpoints() else "other"
            metrics = self.state.metrics
            metrics.requests.labels(endpoint, str(status or CLIENT_GONE)).inc()
            if scope["method"] == "POST" and endpoint in self.inference:
                metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)

    async def _limit_body(self, scope, receive: Receive) -> tuple[JSONResponse | None, Receive]:
        """The body read ahead within ``--request-timeout`` (else 504: a client trickling its body holds no
        connection for ever); 413 for a body over the limit, by its Content-Length or counted while reading."""
        limit, timeout = self.state.limits.max_body_bytes, self.state.limits.request_timeout
        too_large = self.error(413, f"request body over {limit} bytes", "request_too_large")
        headers = _headers(scope)
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers  # with a Content-Length too, the body still comes chunked: count it
        if length is not None and not chunked and length.isdigit() and int(length) > limit:
            return too_large, receive
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None, receive
        deadline = time.perf_counter() + timeout
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.perf_counter(), 0.0))
            except TimeoutError:
                late = self.error(504, f"the request body did not arrive within {timeout:g} s", "timeout_error")
                return late, receive
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return too_large, receive
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # the server's own: disconnects stay visible to the route
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
