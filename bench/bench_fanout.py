"""Netmap fan-out: from a change at the controller to every connected node.

Starts a real controller (``mesh-controller serve``) on loopback, enrolls
nodes through ``POST /v1/enroll`` (keys and CSRs made before, as in
bench_enroll.py), then opens one ``GET /v1/netmap`` stream per node from this
one process: asyncio (uvloop, like the controller) with a raw TLS 1.3
connection per node carrying that node's own client certificate, a minimal
HTTP/1.1 chunked reader, and a :class:`meshcore.netmap.NodeView` per node
that applies every line, as meshd does.

Then it makes M changes, one after another: node 0 reports a new endpoint
(``POST /v1/endpoints``), which bumps the netmap version and is fanned out to
every stream. For each change it records, per node, the time from just
before the POST was sent until that node's stream had the whole delta line
(the line is then parsed and applied to the node's view; every view is
checked to end at the controller's version). Reported: p50/p99 of the
per-node arrival times over all (change, node) pairs, p50/p99 of the
"all nodes" time (the last node's arrival) over the changes, and the bytes
of a delta line, at each mesh size, next to the full map's size, to show
that a delta does not grow with the mesh.

The controller and this load generator share the machine's cores (and any
other work running on it), so arrival times include the generator's own
work: one event loop reads, decrypts, parses and applies for all N nodes,
and a node's "arrival" is when the loop got to its socket.

    .venv/bin/python bench/bench_fanout.py [--sizes 100,1000] [--changes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from common import command_line, cpu_seconds, free_port, wait_listening
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from idmesh.client import client_ssl_context
from meshcore.identity import build_csr
from meshcore.netmap import NodeView
from meshcore.wire.stream import StreamMessage

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
CHANGE_TIMEOUT = 30.0


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: with 20 changes, p99 is the slowest one."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- nodes ---------------------------------------------------------------------------------------

@dataclass
class SimNode:
    index: int
    name: str
    key_pem: bytes
    enroll_body: bytes
    ctx: ssl.SSLContext | None = None


def make_nodes(start: int, count: int, token: str) -> list[SimNode]:
    out = []
    for i in range(start, start + count):
        key = ed25519.Ed25519PrivateKey.generate()
        wg = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
        name = f"node-{i}"
        body = json.dumps({"token": token, "csr": build_csr(key), "name": name,
                           "wireguard_public_key": base64.b64encode(wg).decode()}).encode()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        out.append(SimNode(i, name, pem, body))
    return out


async def http_once(ctx: ssl.SSLContext, port: int, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One request on its own connection (enrollment), minimal HTTP/1.1."""
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST)
    try:
        writer.write(b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (method.encode(), path.encode(), HOST.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), await reader.read()
    finally:
        writer.close()


async def enroll_all(nodes: list[SimNode], port: int, ca: str, keydir: Path, clients: int = 16) -> None:
    plain = ssl.create_default_context(cadata=ca)
    queue = list(reversed(nodes))

    async def worker() -> None:
        while queue:
            node = queue.pop()
            status, body = await http_once(plain, port, "POST", "/v1/enroll", node.enroll_body)
            if status != 200:
                raise SystemExit(f"enrolling {node.name} failed: HTTP {status} {body[:200]!r}")
            cert = json.loads(body)["certificate"]
            cert_file, key_file = keydir / f"{node.name}.crt", keydir / f"{node.name}.key"
            cert_file.write_text(cert)
            key_file.write_bytes(node.key_pem)
            node.ctx = client_ssl_context(ca, cert_file=cert_file, key_file=key_file)

    await asyncio.gather(*(worker() for _ in range(clients)))


# -- streams -------------------------------------------------------------------------------------

@dataclass
class Stream:
    node: SimNode
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    view: NodeView | None = None
    full_bytes: int = 0
    delta_bytes: list[int] = field(default_factory=list)
    delta_bytes_sans_versions: list[int] = field(default_factory=list)


class Fanout:
    """Every stream's reader task records, per version, when its delta line arrived."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrivals: dict[int, list[float]] = {}
        self.done: dict[int, asyncio.Event] = {}
        self.errors: list[str] = []

    def expect(self, version: int) -> asyncio.Event:
        self.arrivals[version] = []
        self.done[version] = asyncio.Event()
        return self.done[version]

    def arrived(self, version: int, at: float) -> None:
        times = self.arrivals.get(version)
        if times is None:
            return
        times.append(at)
        if len(times) == self.n:
            self.done[version].set()


async def open_stream(node: SimNode, port: int) -> Stream:
    assert node.ctx is not None
    # each node from a loopback address of its own, 256 to an address: the controller takes at most 512
    # connections from one address (controller.server.PER_SOURCE), and nodes are separate hosts
    source = f"127.1.{node.index // 256 % 256}.{node.index % 256}"
    reader, writer = await asyncio.open_connection(HOST, port, ssl=node.ctx, server_hostname=HOST,
                                                   limit=16 * 1024 * 1024, local_addr=(source, 0))
    writer.write(b"GET /v1/netmap HTTP/1.1\r\nHost: %s\r\nAccept: application/x-ndjson\r\n\r\n" % HOST.encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200 or b"chunked" not in head.lower():
        raise RuntimeError(f"{node.name}: unexpected answer to GET /v1/netmap: {head[:200]!r}")
    stream = Stream(node, reader, writer)
    line = await read_line(stream)
    message = StreamMessage.model_validate_json(line)
    while message.type != "full":  # a policy document may come first
        message = StreamMessage.model_validate_json(await read_line(stream))
    assert message.full is not None
    stream.view = NodeView(message.full)
    stream.full_bytes = len(line)
    return stream


async def read_line(stream: Stream) -> bytes:
    """The next NDJSON line from the chunked body (the controller sends one line per chunk, but do not rely on it)."""
    buf = bytearray()
    while True:
        size_line = await stream.reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            raise EOFError(f"{stream.node.name}: the controller ended the stream")
        buf += (await stream.reader.readexactly(size + 2))[:-2]
        if buf.endswith(b"\n"):
            return bytes(buf)


async def follow(stream: Stream, fanout: Fanout) -> None:
    try:
        while True:
            line = await read_line(stream)
            at = time.perf_counter()
            message = StreamMessage.model_validate_json(line)
            if message.type == "delta" and message.delta is not None:
                assert stream.view is not None
                stream.view.apply(message.delta)
                stream.delta_bytes.append(len(line))
                # the version numbers gain a digit now and then as the mesh's history grows; that is not size
                stream.delta_bytes_sans_versions.append(
                    len(line) - len(str(message.delta.base)) - len(str(message.delta.version)))
                fanout.arrived(message.delta.version, at)
            elif message.type == "full" and message.full is not None:
                stream.view = NodeView(message.full)  # a resync: the change is in it
                fanout.arrived(message.full.version, at)
    except (EOFError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
        fanout.errors.append(f"{stream.node.name}: {exc}")


async def connect_all(nodes: list[SimNode], port: int, concurrency: int) -> tuple[list[Stream], str | None]:
    """Open a stream per node; on running out of resources, keep what opened and say why."""
    streams: list[Stream] = []
    queue = list(reversed(nodes))
    failure: str | None = None

    async def worker() -> None:
        nonlocal failure
        while queue and failure is None:
            node = queue.pop()
            try:
                streams.append(await open_stream(node, port))
            except OSError as exc:
                failure = f"{node.name}: {exc}"

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return streams, failure


async def post_endpoint(http: tuple[asyncio.StreamReader, asyncio.StreamWriter], k: int) -> int:
    """Node 0 reports a new endpoint on its keep-alive connection; returns the HTTP status."""
    reader, writer = http
    body = json.dumps({"listen_port": 51820, "endpoints": [f"203.0.113.{10 + k % 90}:{40000 + k % 10000}"]}).encode()
    writer.write(b"POST /v1/endpoints HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (HOST.encode(), len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(h.split(b":", 1)[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def measure(nodes: list[SimNode], port: int, changes: int, concurrency: int, ctl_pid: int) -> dict[str, object]:
    t0 = time.perf_counter()
    streams, failure = await connect_all(nodes, port, concurrency)
    connect_s = time.perf_counter() - t0
    n = len(streams)
    versions = {s.view.version for s in streams if s.view is not None}
    if len(versions) != 1:
        raise SystemExit(f"streams started at different versions: {sorted(versions)}")
    (version,) = versions
    fanout = Fanout(n)
    readers = [asyncio.create_task(follow(s, fanout)) for s in streams]
    changer = nodes[0]
    assert changer.ctx is not None
    http = await asyncio.open_connection(HOST, port, ssl=changer.ctx, server_hostname=HOST)
    per_node: list[float] = []
    all_nodes: list[float] = []
    post_ms: list[float] = []
    cpu_ctl0, cpu_me0 = cpu_seconds(ctl_pid), time.process_time()
    try:
        await asyncio.sleep(0.5)  # let the readers settle after the connection burst
        for k in range(changes):
            version += 1
            done = fanout.expect(version)
            start = time.perf_counter()
            status = await post_endpoint(http, k)
            post_ms.append((time.perf_counter() - start) * 1e3)
            if status != 200:
                raise SystemExit(f"POST /v1/endpoints answered {status}")
            try:
                async with asyncio.timeout(CHANGE_TIMEOUT):
                    await done.wait()
            except TimeoutError:
                raise SystemExit(f"change {k}: only {len(fanout.arrivals[version])} of {n} streams got version "
                                 f"{version} in {CHANGE_TIMEOUT:g} s; errors: {fanout.errors[:3]}") from None
            times = [(t - start) * 1e3 for t in fanout.arrivals[version]]
            per_node += times
            all_nodes.append(max(times))
            await asyncio.sleep(0.05)
        cpu_ctl, cpu_me = cpu_seconds(ctl_pid) - cpu_ctl0, time.process_time() - cpu_me0
    finally:
        http[1].close()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for s in streams:
            s.writer.close()
        await asyncio.sleep(0.2)
    behind = [s.node.name for s in streams if s.view is None or s.view.version != version]
    if behind:
        raise SystemExit(f"{len(behind)} views did not reach version {version}: {behind[:5]}")
    delta_sizes = sorted({b for s in streams for b in s.delta_bytes})
    sans_versions = sorted({b for s in streams for b in s.delta_bytes_sans_versions})
    return {
        "nodes": n,
        "changes": changes,
        "connect_s": round(connect_s, 2),
        "connect_failure": failure,
        "per_node_ms": {"p50": round(percentile(per_node, 50), 1), "p99": round(percentile(per_node, 99), 1),
                        "max": round(max(per_node), 1)},
        "all_nodes_ms": {"p50": round(percentile(all_nodes, 50), 1), "p99": round(percentile(all_nodes, 99), 1),
                         "max": round(max(all_nodes), 1)},
        "post_answer_ms_p50": round(statistics.median(post_ms), 1),
        "delta_line_bytes": delta_sizes[0] if len(delta_sizes) == 1 else delta_sizes,
        "delta_line_bytes_without_version_digits": sans_versions[0] if len(sans_versions) == 1 else sans_versions,
        "version_after": version,
        "full_map_line_bytes": statistics.median(s.full_bytes for s in streams),
        "controller_cpu_ms_per_change": round(cpu_ctl * 1e3 / changes, 1),
        "generator_cpu_ms_per_change": round(cpu_me * 1e3 / changes, 1),
        "stream_errors": fanout.errors[:5],
    }


async def run(args: argparse.Namespace, data: Path, port: int, ca: str, token: str,
              ctl_pid: int) -> list[dict[str, object]]:
    keydir = data.parent / "keys"
    keydir.mkdir()
    nodes: list[SimNode] = []
    results = []
    for size in args.sizes:
        fresh = make_nodes(len(nodes), size - len(nodes), token)
        t0 = time.perf_counter()
        await enroll_all(fresh, port, ca, keydir)
        print(f"enrolled {len(fresh)} nodes in {time.perf_counter() - t0:.1f} s (mesh of {size})", flush=True)
        nodes += fresh
        result = await measure(nodes[:size], port, args.changes, args.concurrency, ctl_pid)
        print(f"N={result['nodes']}: per node p50 {result['per_node_ms']['p50']} ms "  # type: ignore[index]
              f"p99 {result['per_node_ms']['p99']} ms, all nodes p50 {result['all_nodes_ms']['p50']} ms "  # type: ignore[index]
              f"p99 {result['all_nodes_ms']['p99']} ms, delta line {result['delta_line_bytes']} B", flush=True)  # type: ignore[index]
        results.append(result)
        if result["connect_failure"]:
            print(f"could not open all {size} streams: {result['connect_failure']}; "
                  f"largest N that worked: {result['nodes']}", flush=True)
            break
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=lambda s: sorted(int(x) for x in s.split(",")), default=[100, 1000],
                    help="mesh sizes to measure, comma-separated (default 100,1000)")
    ap.add_argument("--changes", type=int, default=20, help="changes per size (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=50, help="streams being opened at once (default %(default)s)")
    args = ap.parse_args()
    print(f"$ {command_line()}")
    nofile = raise_fd_limit(2 * max(args.sizes) + 256)
    print(f"RLIMIT_NOFILE {nofile}; {os.cpu_count()} cores shared by the controller and this generator "
          f"(load average before start: {os.getloadavg()[0]:.2f})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ctl"
        port = free_port()
        url = f"https://{HOST}:{port}"
        subprocess.run([str(BIN / "mesh-controller"), "init", "--domain", "bench.mesh", "--data", str(data),
                        "--url", url], check=True, capture_output=True)
        env = {**os.environ, "IDMESH_ADMIN": str(data / "admin.conf")}
        log = (Path(tmp) / "controller.log").open("wb")
        # the controller inherits our raised descriptor limit
        ctl = subprocess.Popen([str(BIN / "mesh-controller"), "serve", "--data", str(data), "--listen",
                                f"{HOST}:{port}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_listening(port)
            token = subprocess.run([str(BIN / "meshctl"), "token", "create", "--reusable", "--tag", "bench"],
                                   check=True, capture_output=True, text=True, env=env).stdout.strip()
            ca = (data / "ca.crt").read_text()
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                results = runner.run(run(args, data, port, ca, token, ctl.pid))
        finally:
            ctl.send_signal(signal.SIGTERM)
            try:
                ctl.wait(10)
            except subprocess.TimeoutExpired:
                ctl.kill()
                ctl.wait()
            log.close()
            tail = (Path(tmp) / "controller.log").read_text(errors="replace").strip().splitlines()[-5:]
    sizes = [r["delta_line_bytes_without_version_digits"] for r in results]
    print(json.dumps({
        "results": results,
        "delta_line_bytes_by_size": {r["nodes"]: r["delta_line_bytes"] for r in results},
        "delta_bytes_grow_with_mesh": len({json.dumps(s) for s in sizes}) > 1,  # version digits aside
        "target_all_nodes_p99_ms": 1000,
        "cores": os.cpu_count(),
        "shared": "controller, generator (N TLS streams in one event loop) and other work on this host share the cores",
        "controller_log_tail": tail,
    }, indent=2))


if __name__ == "__main__":
    main()
