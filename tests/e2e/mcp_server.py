"""A real MCP server (the ``mcp`` SDK, streamable HTTP) as the upstream behind the identity-aware proxy in e2e tests.

``python tests/e2e/mcp_server.py --port PORT --log FILE [--ca CA_PEM --audience AUD]``

Listens on ``127.0.0.1:PORT`` (``--host`` for another address) and prints ``ready`` once it accepts connections;
exits cleanly on SIGTERM.

* ``/mcp``: stateless streamable HTTP with JSON responses, tools ``query(sql)`` and ``drop_table(name)``.
  DNS-rebinding protection is off: requests arrive through the proxy with an overlay ``Host``.
* ``GET /stream``: five ``chunk N\\n`` chunks 0.2 s apart; ``GET|POST /hello``: a short text. A plain HTTP upstream.

Every HTTP request, whatever its path, appends one JSON line to FILE when it arrives: ``method``, ``path``, each of
the ``Idmesh-*`` headers below (all its values joined by ``", "``, or null), ``rpc_method`` and ``tool`` (the JSON-RPC
method of the body and the name a ``tools/call`` names, else null), and with ``--ca`` also ``assertion_valid`` (checked
with :func:`idmesh.assertion.verify_assertion`, as a service behind ``meshctl serve`` would) and ``assertion_claims``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from idmesh.assertion import InvalidAssertion, verify_assertion

HEADERS = ("Idmesh-Principal", "Idmesh-Agent", "Idmesh-Scopes", "Idmesh-Node", "Idmesh-Authorized-By",
           "Idmesh-Assertion")

mcp = MCPServer("idmesh-e2e-upstream", log_level="WARNING")


@mcp.tool()
def query(sql: str) -> str:
    """Run a (pretend) read-only SQL query."""
    return f"rows for: {sql}"


@mcp.tool()
def drop_table(name: str) -> str:
    """Drop a (pretend) table."""
    return f"dropped {name}"


async def hello(request: Request) -> Response:
    body = await request.body()
    return PlainTextResponse(f"hello {request.method} {len(body)}\n")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for n in range(5):
            if n:
                await asyncio.sleep(0.2)
            yield f"chunk {n}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


mcp.custom_route("/hello", methods=["GET", "POST"])(hello)  # a call: the SDK's decorator is untyped
mcp.custom_route("/stream", methods=["GET"])(stream)


def _rpc(body: bytes) -> dict[str, Any]:
    """The JSON-RPC ``method`` of a request body, and for ``tools/call`` the tool's name (else nulls)."""
    try:
        message = json.loads(body)
        method, params = message.get("method"), message.get("params") or {}
        return {"rpc_method": method, "tool": params.get("name") if method == "tools/call" else None}
    except (ValueError, AttributeError):
        return {"rpc_method": None, "tool": None}


class RequestLog:
    """ASGI middleware: one JSON line per HTTP request, written as the request arrives."""

    def __init__(self, app: ASGIApp, log: Path, ca: bytes | None, audience: str | None) -> None:
        self.app, self.log, self.ca, self.audience = app, log, ca, audience

    def _assertion(self, token: str | None) -> dict[str, Any]:
        if token is None or self.ca is None or self.audience is None:
            return {"assertion_valid": False, "assertion_claims": None}
        try:
            claims = verify_assertion(token, self.ca, self.audience)
        except InvalidAssertion as e:
            return {"assertion_valid": False, "assertion_claims": None, "assertion_error": str(e)}
        return {"assertion_valid": True, "assertion_claims": claims}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            values: dict[str, list[str]] = {}
            for key, value in scope["headers"]:
                values.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
            entry: dict[str, Any] = {"method": scope["method"], "path": scope["path"]}
            for name in HEADERS:
                entry[name] = ", ".join(values[name.lower()]) if name.lower() in values else None
            if self.ca is not None:
                entry.update(self._assertion(entry["Idmesh-Assertion"]))
            messages = [await receive()]
            while messages[-1]["type"] == "http.request" and messages[-1].get("more_body"):
                messages.append(await receive())
            entry.update(_rpc(b"".join(m.get("body", b"") for m in messages)))
            with self.log.open("a") as f:
                f.write(json.dumps(entry) + "\n")

            async def replay() -> Message:
                return messages.pop(0) if messages else await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


class Server(uvicorn.Server):
    """uvicorn re-raises a SIGTERM it caught once it has shut down (exit 143): stop on it, then return."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        yield


async def serve(host: str, port: int, log: Path, ca: bytes | None, audience: str | None) -> None:
    app = mcp.streamable_http_app(
        stateless_http=True,
        json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    config = uvicorn.Config(RequestLog(app, log, ca, audience), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=2, lifespan="on")
    server = Server(config)

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        print("ready", flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        announcer.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--ca", type=Path, help="CA PEM to verify Idmesh-Assertion with")
    parser.add_argument("--audience", help="audience the assertion must name (with --ca)")
    args = parser.parse_args()
    if (args.ca is None) != (args.audience is None):
        parser.error("--ca and --audience go together")
    asyncio.run(serve(args.host, args.port, args.log, args.ca.read_bytes() if args.ca else None, args.audience))


if __name__ == "__main__":
    main()
