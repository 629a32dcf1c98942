"""Enrollments per second through HTTPS, and their latency.

Starts a real controller (``mesh-controller serve``) on loopback, then runs
C concurrent clients that each enroll nodes over a fresh TLS 1.3 connection
(one node = one connection, as in real life). Node keys and CSRs are made
before the clock starts: they are each node's own cost, not the
controller's. Both processes share this machine's cores.

    .venv/bin/python bench/bench_enroll.py [--clients 50] [--enrollments 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, cpu_seconds, free_port, wait_listening
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from meshcore.identity import build_csr

BIN = Path(sys.executable).parent


def requests(n: int, token: str) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        wg = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
        out.append({"token": token, "csr": build_csr(ed25519.Ed25519PrivateKey.generate()),
                    "wireguard_public_key": base64.b64encode(wg).decode(), "name": f"bench-{i}"})
    return out


async def enroll_once(host: str, port: int, ctx: ssl.SSLContext, body: bytes) -> int:
    """One enrollment on its own TLS connection, with a minimal HTTP/1.1 client:
    the load generator must cost far less than the server it measures."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    try:
        writer.write(b"POST /v1/enroll HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.read()
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def run(url: str, ca: str, bodies: list[dict[str, str]], clients: int) -> tuple[float, list[float], int]:
    ctx = ssl.create_default_context(cadata=ca)
    host, port = url.removeprefix("https://").rsplit(":", 1)
    queue = [json.dumps(b).encode() for b in reversed(bodies)]
    latencies: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            status = await enroll_once(host, int(port), ctx, body)
            latencies.append(time.perf_counter() - t0)
            errors += status != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - t0, latencies, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--enrollments", type=int, default=3000)
    args = ap.parse_args()
    print(f"$ {command_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ctl"
        port = free_port()
        url = f"https://127.0.0.1:{port}"
        subprocess.run([str(BIN / "mesh-controller"), "init", "--domain", "bench.mesh", "--data", str(data),
                        "--url", url], check=True, capture_output=True)
        env = {**os.environ, "IDMESH_ADMIN": str(data / "admin.conf")}
        ctl = subprocess.Popen([str(BIN / "mesh-controller"), "serve", "--data", str(data), "--listen",
                                f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port)
            token = subprocess.run([str(BIN / "meshctl"), "token", "create", "--reusable", "--tag", "bench"],
                                   check=True, capture_output=True, text=True, env=env).stdout.strip()
            ca = (data / "ca.crt").read_text()
            warm = requests(100, token)
            for i, b in enumerate(warm):
                b["name"] = f"warm-{i}"
            asyncio.run(run(url, ca, warm, 10))
            bodies = requests(args.enrollments, token)
            cpu0, client0 = cpu_seconds(ctl.pid), time.process_time()
            elapsed, lat, errors = asyncio.run(run(url, ca, bodies, args.clients))
            server_cpu, client_cpu = cpu_seconds(ctl.pid) - cpu0, time.process_time() - client0
        finally:
            ctl.send_signal(signal.SIGTERM)
            ctl.wait(10)
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    print(json.dumps({
        "clients": args.clients,
        "enrollments": len(lat),
        "errors": errors,
        "enrollments_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "controller_cpu_ms_per_enrollment": round(server_cpu * 1000 / len(lat), 2),
        "client_cpu_ms_per_enrollment": round(client_cpu * 1000 / len(lat), 2),
        "cores": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
