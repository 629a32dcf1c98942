"""ASGI middleware in front of the API: a correlation id for every request, a body limit and a body timeout.

It is plain ASGI, below FastAPI, for two reasons: a body over the limit must
be refused before it is read whole (413, with the one-line error body every
answer has), which no route can do once FastAPI has read it; and the
request id must be set before anything logs. A body must arrive whole within
:data:`BODY_TIMEOUT` of the request's start (408), so a client that
announces a body and trickles it cannot hold a worker's memory and its
connection for ever (the headers have their own timeout, controller.server). ``mesh-controller --help``
reads :data:`DEFAULT_MAX_BODY` from here without importing a web framework.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from idmesh.logs import request_id

__all__ = ["DEFAULT_MAX_BODY", "BodyLimit"]

DEFAULT_MAX_BODY = 64 * 1024
BODY_TIMEOUT = 30.0
"""Seconds a request's whole body may take to arrive (a 4 MiB policy at 140 kB/s)."""


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a correlation id for every request (``X-Request-Id``,
    taken from the client or made here, echoed in the answer and in every log
    record written while serving it), and bodies over ``limit`` bytes refused
    with 413 before they are read whole. ``larger`` raises the limit for named
    paths (a policy file may be big).
    """

    def __init__(self, app: Any, limit: int = DEFAULT_MAX_BODY, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.default = limit
        self.larger = larger or {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # a correlation id for every request: the client's X-Request-Id, or a new one
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode(errors="replace")[:64]
        rid = given if given.replace("-", "").isalnum() else secrets.token_hex(8)
        token = request_id.set(rid)
        try:
            await self._limited(scope, receive, send, rid)
        finally:
            request_id.reset(token)

    async def _limited(self, scope: dict[str, Any], receive: Any, send: Any, rid: str) -> None:
        limit = max(self.default, self.larger.get(scope.get("path", ""), 0))
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                return await self._refuse(send, limit)
        seen = 0
        started = False
        whole = False  # the body has arrived: what is received afterwards (a disconnect) may take any time
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, whole
            if whole:
                return dict(await receive())
            try:
                async with asyncio.timeout(deadline - asyncio.get_running_loop().time()):
                    message: dict[str, Any] = await receive()
            except TimeoutError:
                raise _TooSlow from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
                whole = not message.get("more_body", False)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, limit)
        except _TooSlow:
            if not started:
                await _answer(send, 408, b'{"error":"request body not received within %d s"}' % BODY_TIMEOUT)

    @staticmethod
    async def _refuse(send: Any, limit: int) -> None:
        await _answer(send, 413, b'{"error":"request body too large (limit %d bytes)"}' % limit)


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
