"""meshd's requests to the controller (meshd.node.calls) against a TLS server on loopback with the mesh's own
server certificate: answers on kept connections, a kept connection the server closed while idle, a server
that closes without answering, chunked answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.authority import DataDir, init_data_dir
from controller.server import server_ssl_context
from idmesh.client import client_ssl_context
from meshcore.errors import Unavailable
from meshd.node.calls import ControllerCalls

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def answer(body: object, *, close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + (b"Connection: close\r\n" if close else b"") + b"Content-Length: %d\r\n\r\n" % len(data) + data)


async def serve(tmp_path: Path, handler: Handler, run: Callable[[ControllerCalls], Awaitable[None]]) -> None:
    init_data_dir(tmp_path, "acme.mesh", "https://127.0.0.1:8443", datetime.now(UTC))
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ssl_context(tmp_path))
    port = server.sockets[0].getsockname()[1]
    calls = ControllerCalls(f"https://127.0.0.1:{port}", client_ssl_context(DataDir(tmp_path).ca_cert.read_text()),
                            {"Idmesh-Protocol": "4"}, timeout=5)
    try:
        await run(calls)
    finally:
        calls.close()
        server.close()
        await server.wait_closed()


def test_requests_share_a_kept_connection_and_a_closed_idle_one_is_replaced(tmp_path: Path) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):  # two requests, then it closes the idle connection, as uvicorn does after 5 s
            body = json.loads(await read_request(reader))
            writer.write(answer({"echo": body, "connection": connections}))
            await writer.drain()
        writer.close()

    async def run(calls: ControllerCalls) -> None:
        seen = [json.loads((await calls.request("POST", "/v1/agents", {"n": n}))[1]) for n in range(3)]
        assert [s["echo"] for s in seen] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert [s["connection"] for s in seen] == [1, 1, 2]  # the third went on a new connection, once

    asyncio.run(serve(tmp_path, handler, run))


def test_a_server_that_closes_without_answering_is_unavailable_and_not_asked_twice(tmp_path: Path) -> None:
    asked = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal asked
        await read_request(reader)
        asked += 1
        writer.close()

    async def run(calls: ControllerCalls) -> None:
        with pytest.raises(Unavailable, match="the controller closed the connection"):
            await calls.request("POST", "/v1/agents", {})
        assert asked == 1

    asyncio.run(serve(tmp_path, handler, run))


def test_a_chunked_error_answer_is_read_whole(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"a\r\n{\"error\": \r\n9\r\n\"denied\"}\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def run(calls: ControllerCalls) -> None:
        assert await calls.request("DELETE", "/v1/agents/a1") == (403, b'{"error": "denied"}')

    asyncio.run(serve(tmp_path, handler, run))


def test_nobody_listening_is_one_line(tmp_path: Path) -> None:
    async def run() -> None:
        init_data_dir(tmp_path, "acme.mesh", "https://127.0.0.1:8443", datetime.now(UTC))
        calls = ControllerCalls("https://127.0.0.1:9", client_ssl_context(DataDir(tmp_path).ca_cert.read_text()), {})
        with pytest.raises(Unavailable, match=r"^controller https://127.0.0.1:9: cannot connect \(Connection refused\)$"):
            await calls.request("GET", "/v1/health")

    asyncio.run(run())
