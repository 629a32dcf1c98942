"""The controller under resource exhaustion (issue 18): does it keep answering, and how much memory does it hold?

A real controller on loopback. The attackers use their own loopback addresses
(127.0.0.2-4: the controller caps connections per source address, and the
prober on 127.0.0.1 must not share their cap):

* 500 TCP connections opened and held, no TLS handshake (127.0.0.2);
* 100 clients that finish TLS, send half their headers and stop (127.0.0.3);
* 100 netmap streams, 4 for each of 25 enrolled nodes, that read their
  headers and then never read again (127.0.0.4), while node 0 makes 1,500
  changes (endpoint reports: a delta to every stream each) and the admin
  applies 30 policies of 100 kB: what an unread stream may hold is bounded;
* one request that announces a 100 MB body (the answer should be 413 before
  any of it is read).

Meanwhile a prober opens a new TLS connection to ``GET /v1/health`` 20 times
at each stage. Reported: probe latency p50/max per stage, the 413's time,
and the controller's RSS at each stage.

    .venv/bin/python bench/bench_exhaustion.py
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from bench_fanout import HOST, SimNode, enroll_all, make_nodes, post_endpoint, raise_fd_limit
from common import command_line, free_port, wait_listening

from idmesh.client import AdminCredential

BIN = Path(sys.executable).parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def probe(port: int, ca: str, n: int = 20) -> dict[str, float]:
    ctx = ssl.create_default_context(cadata=ca)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST)
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:80]
        await reader.read()
        writer.close()
        times.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(0.05)
    times.sort()
    return {"p50_ms": round(times[len(times) // 2], 1), "max_ms": round(times[-1], 1)}


async def held_tcp(port: int, n: int) -> list[asyncio.StreamWriter]:
    out = []
    for _ in range(n):
        _, writer = await asyncio.open_connection(HOST, port, local_addr=("127.0.0.2", 0))
        out.append(writer)
    return out


async def half_headers(port: int, ca: str, n: int) -> list[asyncio.StreamWriter]:
    ctx = ssl.create_default_context(cadata=ca)
    out = []
    for _ in range(n):
        _, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST,
                                                  local_addr=("127.0.0.3", 0))
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        out.append(writer)
    return out


async def unread_streams(nodes: list[SimNode], port: int, each: int) -> list[asyncio.StreamWriter]:
    out = []
    for node in nodes:
        for _ in range(each):
            reader, writer = await asyncio.open_connection(HOST, port, ssl=node.ctx, server_hostname=HOST,
                                                           local_addr=("127.0.0.4", 0), limit=65536)
            writer.write(b"GET /v1/netmap HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            transport = writer.transport
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # from now on the kernel's buffers fill, then the controller's queue
            out.append(writer)
    return out


async def flood(node: SimNode, port: int, admin: AdminCredential, changes: int, policies: int) -> None:
    assert node.ctx is not None
    http = await asyncio.open_connection(HOST, port, ssl=node.ctx, server_hostname=HOST)
    try:
        for k in range(changes):
            await post_endpoint(http, k)
    finally:
        http[1].close()

    def apply() -> None:
        with admin.client() as client:
            for i in range(policies):
                text = f"# policy {i}\n" + "".join(f"# {'x' * 96}\n" for _ in range(1000)) + "acls: []\n"
                client.request("POST", "/v1/policy", {"text": text, "filename": f"p{i}.yaml"})

    await asyncio.to_thread(apply)


async def huge_body(port: int, admin: AdminCredential, data: Path) -> tuple[int, float]:
    ctx = ssl.create_default_context(cadata=admin.ca)
    (data.parent / "a.crt").write_text(admin.certificate)
    (data.parent / "a.key").touch(mode=0o600)
    (data.parent / "a.key").write_text(admin.key)
    ctx.load_cert_chain(data.parent / "a.crt", data.parent / "a.key")
    t = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST)
    writer.write(b"POST /v1/policy HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 104857600\r\n\r\n" + b"{" + b"x" * 65536)
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return int(head.split(b" ", 2)[1]), round((time.perf_counter() - t) * 1000, 1)


async def run(port: int, ca: str, token: str, data: Path, pid: int) -> dict[str, object]:
    stages: dict[str, object] = {}
    admin = AdminCredential.load(data / "admin.conf")
    nodes = make_nodes(0, 25, token)
    keys = data.parent / "keys"
    keys.mkdir()
    await enroll_all(nodes, port, ca, keys)
    stages["quiet"] = {"probe": await probe(port, ca), "rss_mb": rss_mb(pid)}
    print(f"quiet: {stages['quiet']}", flush=True)
    held = await held_tcp(port, 500)
    slow = await half_headers(port, ca, 100)
    streams = await unread_streams(nodes, port, 4)
    stages["500 held TCP, 100 half-header clients, 100 unread streams"] = {
        "probe": await probe(port, ca), "rss_mb": rss_mb(pid)}
    print(f"held: {stages['500 held TCP, 100 half-header clients, 100 unread streams']}", flush=True)
    await flood(nodes[0], port, admin, 1500, 30)
    stages["after 1,500 deltas and 30 policies of 100 kB to the unread streams"] = {
        "probe": await probe(port, ca), "rss_mb": rss_mb(pid)}
    print(f"flooded: {stages['after 1,500 deltas and 30 policies of 100 kB to the unread streams']}", flush=True)
    status, ms = await huge_body(port, admin, data)
    stages["a 100 MB body announced"] = {"status": status, "answer_ms": ms, "rss_mb": rss_mb(pid)}
    print(f"huge body: {stages['a 100 MB body announced']}", flush=True)
    for writer in [*held, *slow, *streams]:
        writer.transport.abort()
    await asyncio.sleep(1)
    stages["all closed"] = {"probe": await probe(port, ca), "rss_mb": rss_mb(pid)}
    return stages


def main() -> None:
    print(f"$ {command_line()}", flush=True)
    raise_fd_limit(4096)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ctl"
        port = free_port()
        subprocess.run([str(BIN / "mesh-controller"), "init", "--domain", "bench.mesh", "--data", str(data),
                        "--url", f"https://{HOST}:{port}"], check=True, capture_output=True)
        env = {**os.environ, "IDMESH_ADMIN": str(data / "admin.conf")}
        log = (Path(tmp) / "controller.log").open("wb")
        ctl = subprocess.Popen([str(BIN / "mesh-controller"), "serve", "--data", str(data), "--listen",
                                f"{HOST}:{port}", "--no-stun"],
                               stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_listening(port)
            token = subprocess.run([str(BIN / "meshctl"), "token", "create", "--reusable", "--tag", "bench"],
                                   check=True, capture_output=True, text=True, env=env).stdout.strip()
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                stages = runner.run(run(port, (data / "ca.crt").read_text(), token, data, ctl.pid))
        finally:
            ctl.send_signal(signal.SIGTERM)
            try:
                ctl.wait(10)
            except subprocess.TimeoutExpired:
                ctl.kill()
            log.close()
        tracebacks = (Path(tmp) / "controller.log").read_text(errors="replace").count("Traceback")
    print(json.dumps({"stages": stages, "controller_tracebacks": tracebacks, "cores": os.cpu_count(),
                      "load_average": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
