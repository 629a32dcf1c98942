"""Enrollments per second through HTTPS, and their latency.

Starts a real controller (``mesh-controller serve``) on loopback, then runs
C concurrent clients that each enroll nodes over a fresh TLS 1.3 connection
(one node = one connection, as in real life). Node keys and CSRs are made
before the clock starts: they are each node's own cost, not the
controller's. Both processes share this machine's cores.

    .venv/bin/python bench/bench_enroll.py [--clients 50] [--enrollments 3000]
        [--store sqlite|postgresql] [--replicas 1|2] [--workers N]

With ``--store postgresql`` the controller's store is a PostgreSQL 15
cluster made for the run (tests/pg.py, with fsync on: durable, as in
production); ``--replicas 2`` adds a second controller with ``join``, and
the clients are spread over both (each client keeps to one, as a node
does); ``--workers N`` runs each replica with N processes. Everything
shares this machine's cores: the controllers, PostgreSQL and the load.
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


async def run(urls: list[str], ca: str, bodies: list[dict[str, str]], clients: int) -> tuple[float, list[float], int]:
    """Enroll ``bodies`` with ``clients`` concurrent clients, client i on replica ``urls[i % len(urls)]``."""
    ctx = ssl.create_default_context(cadata=ca)
    queue = [json.dumps(b).encode() for b in reversed(bodies)]
    latencies: list[float] = []
    errors = 0

    async def client(i: int) -> None:
        nonlocal errors
        host, port = urls[i % len(urls)].removeprefix("https://").rsplit(":", 1)
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            status = await enroll_once(host, int(port), ctx, body)
            latencies.append(time.perf_counter() - t0)
            errors += status != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return time.perf_counter() - t0, latencies, errors


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds of the controllers and their worker processes (and PostgreSQL's, when ours)."""
    total = 0.0
    for pid in pids:
        total += cpu_seconds(pid)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        total += sum(cpu_seconds(int(c)) for c in children)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--enrollments", type=int, default=3000)
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--replicas", type=int, choices=(1, 2), default=1)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if (args.replicas > 1 or args.workers > 1) and args.store != "postgresql":
        ap.error("--replicas and --workers need --store postgresql")
    print(f"$ {command_line()}")
    cluster = None
    if args.store == "postgresql":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.pg import Cluster

        cluster = Cluster(durable=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db = cluster.new_database() if cluster is not None else None
            urls: list[str] = []
            datas: list[Path] = []
            for r in range(args.replicas):
                data = Path(tmp) / f"ctl-{r}"
                port = free_port()
                url = f"https://127.0.0.1:{port}"
                if r == 0:
                    command = ["init", "--domain", "bench.mesh", "--data", str(data), "--url", url,
                               *(("--db", db) if db else ())]
                else:
                    command = ["join", "--data", str(data), "--url", url, "--db", str(db), "--ca-key",
                               str(datas[0] / "ca.key")]
                subprocess.run([str(BIN / "mesh-controller"), *command], check=True, capture_output=True)
                procs.append(subprocess.Popen(
                    [str(BIN / "mesh-controller"), "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                     "--no-stun", "--workers", str(args.workers)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
                wait_listening(port)
                urls.append(url)
                datas.append(data)
            token = subprocess.run([str(BIN / "meshctl"), "token", "create", "--reusable", "--tag", "bench"],
                                   check=True, capture_output=True, text=True,
                                   env={**os.environ, "IDMESH_ADMIN": str(datas[0] / "admin.conf")}).stdout.strip()
            ca = (datas[0] / "ca.crt").read_text()
            for r, url in enumerate(urls):  # (a token is the mesh's: any replica takes it)
                warm = requests(100, token)
                for i, b in enumerate(warm):
                    b["name"] = f"warm-{r}-{i}"
                asyncio.run(run([url], ca, warm, 10))
            bodies = requests(args.enrollments, token)
            controllers = [p.pid for p in procs]
            database = [cluster.postmaster_pid()] if cluster else []
            cpu0, db0, client0 = tree_cpu(controllers), tree_cpu(database), time.process_time()
            elapsed, lat, errors = asyncio.run(run(urls, ca, bodies, args.clients))
            server_cpu, client_cpu = tree_cpu(controllers) - cpu0, time.process_time() - client0
            db_cpu = tree_cpu(database) - db0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
        if cluster is not None:
            cluster.close()
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    print(json.dumps({
        "store": args.store,
        "replicas": args.replicas,
        "workers_per_replica": args.workers,
        "clients": args.clients,
        "enrollments": len(lat),
        "errors": errors,
        "enrollments_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "controller_cpu_ms_per_enrollment": round(server_cpu * 1000 / len(lat), 2),
        "postgresql_cpu_ms_per_enrollment": round(db_cpu * 1000 / len(lat), 2),
        "client_cpu_ms_per_enrollment": round(client_cpu * 1000 / len(lat), 2),
        "cores": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
