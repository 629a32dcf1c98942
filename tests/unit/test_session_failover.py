"""meshd's controller session with several replicas (meshd.node.session), against TLS servers on loopback with
the mesh's own certificates: the node learns the replicas from the netmap, and when the one it streams from dies
(its connection reset, as after ``kill -9``) it streams from the next within a second, asking only for what
changed since its version; a call the dead replica cannot take goes to the next."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from controller.authority import DataDir, init_data_dir
from controller.server import server_ssl_context
from meshcore.wire.stream import EndpointReport, Netmap, StreamMessage
from meshd.node.session import ControllerSession
from meshd.node.state import StateDir

VERSION = 7


@dataclass
class Replica:
    """A controller replica: it takes endpoint reports and calls, and streams one full map naming ``controllers``.

    ``die``: reset the stream's connection right after the map, as the kernel does for a process killed.
    """

    data: Path
    die: bool = False
    controllers: tuple[str, ...] = ()
    asked: list[str] = field(default_factory=list)
    streams: asyncio.Queue[float] = field(default_factory=asyncio.Queue)
    url: str = ""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                               if line.lower().startswith("content-length:")), 0)
                await reader.readexactly(length)
                method, target, _ = head.split("\r\n")[0].split(" ")
                self.asked.append(f"{method} {target}")
                if not target.startswith("/v1/netmap"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
                                 b'{"done":true}')
                    continue
                await self._stream(writer)
                return
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        full = Netmap(version=VERSION, domain="acme.mesh", prefixes=("100.64.0.0/10", "fd7a:115c:a1e0::/48"),
                      nodes={}, controllers=self.controllers)
        line = StreamMessage(type="full", full=full).model_dump_json().encode() + b"\n"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(line), line))
        await writer.drain()
        self.streams.put_nowait(asyncio.get_running_loop().time())
        if self.die:
            writer.transport.abort()
        else:
            await self._stop.wait()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Replica]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=server_ssl_context(self.data))
        self.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            self._stop.set()
            server.close()
            await server.wait_closed()


def mesh(tmp_path: Path) -> tuple[Path, StateDir]:
    """A controller data directory, and a node state directory trusting its CA (the admin's certificate
    stands in for a node's: the replicas here ask for none)."""
    data, state = tmp_path / "controller", StateDir(tmp_path / "node")
    init_data_dir(data, "acme.mesh", "https://127.0.0.1:8443", datetime.now(UTC))
    admin = json.loads(DataDir(data).admin_conf.read_text())
    state.ensure()
    state.ca_cert.write_text(DataDir(data).ca_cert.read_text())
    state.node_cert.write_text(admin["certificate"])
    state.node_key.write_text(admin["key"])
    return data, state


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"https://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Node:
    session: ControllerSession
    learnt: list[tuple[str, ...]]


async def report() -> EndpointReport:
    return EndpointReport(listen_port=51820)


async def with_node(state: StateDir, urls: list[str], run: Callable[[Node], Awaitable[None]],
                    stream: bool = True) -> None:
    versions: list[int] = []
    learnt: list[tuple[str, ...]] = []
    session = ControllerSession(state, urls, lambda: versions[-1] if versions else None,
                                on_full=lambda full: versions.append(full.version), on_delta=print,
                                on_policy=print, on_agents=print, endpoints=report, on_controllers=learnt.append)
    task = asyncio.create_task(session.run() if stream else asyncio.sleep(0))
    try:
        await run(Node(session, learnt))
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        session.close()


def test_a_node_learns_the_replicas_and_streams_from_the_next_within_a_second_when_one_dies(tmp_path: Path) -> None:
    data, state = mesh(tmp_path)

    async def main() -> None:
        async with Replica(data, die=True).running() as first, Replica(data).running() as second:
            first.controllers = second.controllers = (first.url, second.url)

            async def run(node: Node) -> None:
                async with asyncio.timeout(10):
                    died = await first.streams.get()
                    moved = await second.streams.get()
                    while not node.session.connected:  # (the map is sent: the node may not have read it yet)
                        await asyncio.sleep(0.01)
                assert moved - died < 1.0
                assert node.learnt == [(first.url, second.url)]  # from the first replica's full map
                assert node.session.url == second.url and node.session.urls == (first.url, second.url)

            await with_node(state, [first.url], run)  # enrolled knowing only the first
            assert second.asked == ["POST /v1/endpoints", f"GET /v1/netmap?since={VERSION}"]

    asyncio.run(main())


def test_a_single_controller_is_streamed_from_again_after_its_stream_ends(tmp_path: Path) -> None:
    data, state = mesh(tmp_path)

    async def main() -> None:
        async with Replica(data, die=True).running() as only:
            async def run(node: Node) -> None:
                async with asyncio.timeout(10):
                    for _ in range(2):
                        await only.streams.get()
                assert node.session.url == only.url and node.learnt == []  # no list: the one it knows stays

            await with_node(state, [only.url], run)
            assert only.asked[:4] == ["POST /v1/endpoints", "GET /v1/netmap", "POST /v1/endpoints",
                                      f"GET /v1/netmap?since={VERSION}"]

    asyncio.run(main())


def test_a_call_that_cannot_connect_to_the_replica_in_use_goes_to_the_next(tmp_path: Path) -> None:
    data, state = mesh(tmp_path)

    async def main() -> None:
        async with Replica(data).running() as live:
            dead = dead_url()

            async def run(node: Node) -> None:
                assert node.session.url == dead  # the replica in use, as far as the session knows
                assert await node.session.call("POST", "/v1/agents", {"name": "a"}) == {"done": True}
                assert await node.session.call("DELETE", "/v1/agents/a") == {"done": True}

            await with_node(state, [dead, live.url], run, stream=False)
            assert live.asked == ["POST /v1/agents", "DELETE /v1/agents/a"]

    asyncio.run(main())


def test_endpoint_reports_go_one_at_a_time_each_built_as_it_is_sent(tmp_path: Path) -> None:
    """Two reports at once (a relayed address and a STUN round): sent in turn, so the controller stores the
    newest last (before, both were in flight and a stale one could commit second and stay in the map)."""
    data, state = mesh(tmp_path)
    steps: list[str] = []

    async def report() -> EndpointReport:
        steps.append("built")
        await asyncio.sleep(0.05)  # while this one is being built, the other one waits
        return EndpointReport(listen_port=51820)

    async def main() -> None:
        async with Replica(data).running() as one:
            session = ControllerSession(state, [one.url], lambda: None, on_full=print, on_delta=print,
                                        on_policy=print, on_agents=print, endpoints=report)
            try:
                async def sent() -> None:
                    await session.report_endpoints()
                    steps.append("answered")

                await asyncio.gather(sent(), sent())
            finally:
                session.close()
            assert one.asked == ["POST /v1/endpoints", "POST /v1/endpoints"]

    asyncio.run(main())
    assert steps == ["built", "answered", "built", "answered"]
