"""``meshctl serve`` as a caller feels it: requests per second and added latency, and the assertion's cost.

A mesh of three namespaces (controller, ``db``, ``laptop``) with the real
daemons. On ``db`` one upstream (tests/e2e/mcp_server.py, uvicorn) listens
on the mesh directly (port 9001) and behind ``meshctl serve`` (port 8080,
forwarding to the same process on loopback). From ``laptop``, an agent
(scope web:read, an acl narrowed to ``GET /hello``) times small GETs on one
kept-alive connection, then requests per second with C connections at
once, both ways. Every request through serve is decided by the policy and
carries a fresh set of identity headers and an ``Idmesh-Assertion`` (signed
once per caller every 30 s: the cache). In-process, the cost of signing one
assertion and of a cached one.

    .venv/bin/python bench/bench_serve.py [--requests 2000] [--connections 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import start_namespace_bench

from tests.e2e.mesh import Mesh, cmd
from tests.e2e.netns import Network

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [owner:nikita@acme.com]
    scopes: ["web:*"]
    max_ttl: 1h
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "web:read"}
    to: ["tag:db:8080"]
    http: [{methods: [GET], paths: [/hello]}]
  - from: {principal: nikita@acme.com, via: agent, scope: "web:read"}
    to: ["tag:db:9001"]
"""
SERVER = str(Path(__file__).resolve().parents[1] / "tests" / "e2e" / "mcp_server.py")
DRIVER = """\
import http.client, json, sys, threading, time
host, n, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def run(port, count, out):
    c = http.client.HTTPConnection(host, port, timeout=10)
    for _ in range(count):
        t = time.perf_counter()
        c.request("GET", "/hello")
        r = c.getresponse(); r.read()
        assert r.status == 200, r.status
        out.append((time.perf_counter() - t) * 1000)

result = {}
for name, port in (("direct", 9001), ("serve", 8080)):
    run(port, 50, [])  # warm
    latencies = []
    run(port, n, latencies)
    threads, each = [], n // conns
    t = time.perf_counter()
    for _ in range(conns):
        threads.append(threading.Thread(target=run, args=(port, each, [])))
        threads[-1].start()
    for th in threads:
        th.join()
    result[name] = {"latencies": latencies, "per_second": conns * each / (time.perf_counter() - t)}
print(json.dumps(result))
"""


def summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(sorted(values), n=100, method="inclusive")
    return {"p50": round(q[49], 2), "p99": round(q[98], 2)}


def assertion_cost(rounds: int = 2000) -> tuple[float, float]:
    """Microseconds to sign one assertion, and to take a cached one (meshd.serve.assertions)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from meshcore.identity import Claims, SpiffeId, build_leaf, cert_pem, key_pem, new_ca
    from meshd.serve.assertions import Assertions

    now = datetime.now(UTC)
    ca = new_ca("acme.mesh", ed25519.Ed25519PrivateKey.generate(), now)
    key = ed25519.Ed25519PrivateKey.generate()
    leaf = build_leaf(ca, key.public_key(), SpiffeId("acme.mesh", "node", "db"), Claims(kind="node", node="db"),
                      now, timedelta(hours=1))
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / n for n in ("node.key", "node.crt", "ca.crt")]
        for path, text in zip(files, (key_pem(key), cert_pem(leaf), cert_pem(ca.cert)), strict=True):
            path.write_text(text)
        book = Assertions(*files)
        claims = {"sub": "spiffe://acme.mesh/agent/a1", "principal": "nikita@acme.com", "scopes": ["db:read"]}
        t = time.perf_counter()
        for i in range(rounds):
            book.get(f"agent:a{i}", "api", claims)
        signed = (time.perf_counter() - t) / rounds * 1e6
        t = time.perf_counter()
        for _ in range(rounds):
            book.get("agent:a1", "api", claims)
        cached = (time.perf_counter() - t) / rounds * 1e6
    return round(signed, 1), round(cached, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=8)
    args = ap.parse_args()
    start_namespace_bench("the controller, two meshd, the upstream and the client")
    with tempfile.TemporaryDirectory() as tmp, Network(3) as net:
        mesh = Mesh(net, Path(tmp), net["h1"])
        mesh.init(policy=POLICY)
        db = mesh.enroll(net["h2"], "db", "--tag", "db")
        laptop = mesh.enroll(net["h3"], "laptop", "--owner", "nikita@acme.com")
        for node in (db, laptop):
            mesh.start(node)
        mesh.wait_converged()
        upstream = db.host.popen([sys.executable, SERVER, "--host", "0.0.0.0", "--port", "9001", "--log", os.devnull],
                                 stdout=subprocess.PIPE, text=True)
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        db.host.run([cmd("meshctl"), "serve", "--socket", str(db.socket), "--port", "8080", "--to",
                     "http://127.0.0.1:9001", "--name", "api"])
        done = laptop.host.run([cmd("meshctl"), "agent", "run", "-q", "--socket", str(laptop.socket), "--principal",
                                "nikita@acme.com", "--scope", "web:read", "--", sys.executable, "-c", DRIVER,
                                db.addresses[0], str(args.requests), str(args.connections)], timeout=900)
        out = json.loads(done.stdout)
    direct, served = summary(out["direct"]["latencies"]), summary(out["serve"]["latencies"])
    signed, cached = assertion_cost()
    results = {
        "GET over the mesh, direct to the upstream, one kept-alive connection (ms)": direct,
        "GET through meshctl serve, same (ms)": served,
        "added by serve, p50 / p99 (ms)": [round(served["p50"] - direct["p50"], 2),
                                            round(served["p99"] - direct["p99"], 2)],
        f"requests/s direct, {args.connections} connections": round(out["direct"]["per_second"]),
        f"requests/s through serve, {args.connections} connections": round(out["serve"]["per_second"]),
        "Idmesh-Assertion signed (µs each)": signed,
        "Idmesh-Assertion from the cache (µs each)": cached,
    }
    for what, value in results.items():
        print(f"{what}: {value}", flush=True)
    print(json.dumps({**results, "cores": os.cpu_count(), "load_average": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
