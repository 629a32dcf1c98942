"""The SPIFFE Workload API as an agent feels it: fetch latency, fetches per second, JWT-SVIDs per second.

A mesh of two namespaces (controller, an ``agents`` node) with the real
daemons. One agent started by ``meshctl agent run`` runs a driver that uses
grpcio with the official service definitions (what py-spiffe and every
SPIFFE client send), and times, from inside the agent:

* ``FetchX509SVID``, each on a new connection (connect, attestation, the
  first streamed answer): the first call of an agent includes the
  controller signing its short SVID; the rest are served from the node;
* fetches per second with C threads at once, each on its own connection;
* ``FetchJWTSVID`` with a new audience each call (every one signed by the
  controller), and with one audience (the node's cache), per second.

    .venv/bin/python bench/bench_workload.py [--fetches 300] [--callers 8] [--jwts 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import command_line

from tests.e2e.mesh import Mesh, cmd
from tests.e2e.netns import Network

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:read"]
    max_ttl: 1h
acls: []
"""
DRIVER = """\
import json, os, sys, threading, time
import grpc
from spiffe._proto import workload_pb2 as pb, workload_pb2_grpc as g
target, n, callers, jwts = os.environ["SPIFFE_ENDPOINT_SOCKET"], int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
md = [("workload.spiffe.io", "true")]

def fetch():
    with grpc.insecure_channel(target) as channel:
        answer = next(g.SpiffeWorkloadAPIStub(channel).FetchX509SVID(pb.X509SVIDRequest(), metadata=md, timeout=10))
        assert answer.svids[0].spiffe_id

latencies = []
for _ in range(n):
    t = time.perf_counter(); fetch(); latencies.append((time.perf_counter() - t) * 1000)

def worker(count):
    for _ in range(count):
        fetch()
each = max(1, n // callers)
threads = [threading.Thread(target=worker, args=(each,)) for _ in range(callers)]
t = time.perf_counter()
for th in threads: th.start()
for th in threads: th.join()
per_second = callers * each / (time.perf_counter() - t)

with grpc.insecure_channel(target) as channel:
    stub = g.SpiffeWorkloadAPIStub(channel)
    t = time.perf_counter()
    for i in range(jwts):
        stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=[f"service-{i}"]), metadata=md, timeout=10)
    signed = jwts / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(jwts):
        stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["db"]), metadata=md, timeout=10)
    cached = jwts / (time.perf_counter() - t)
print(json.dumps({"latencies": latencies, "per_second": per_second, "jwt_signed": signed, "jwt_cached": cached}))
"""


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": round(q[49], 2), "p99": round(q[98], 2), "max": round(values[-1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fetches", type=int, default=300)
    ap.add_argument("--callers", type=int, default=8)
    ap.add_argument("--jwts", type=int, default=300)
    args = ap.parse_args()
    print(f"$ {command_line()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, Network(2) as net:
        mesh = Mesh(net, Path(tmp), net["h1"])
        mesh.init(policy=POLICY)
        agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
        mesh.start(agents)
        done = agents.host.run([cmd("meshctl"), "agent", "run", "-q", "--socket", str(agents.socket), "--principal",
                                "nikita@acme.com", "--scope", "db:read", "--", sys.executable, "-c", DRIVER,
                                str(args.fetches), str(args.callers), str(args.jwts)], timeout=900)
        out = json.loads(done.stdout)
        first, rest = out["latencies"][0], out["latencies"][1:]
        results = {
            "FetchX509SVID, an agent's first (ms)": round(first, 2),
            "FetchX509SVID, new connection each (ms)": summary(rest),
            f"FetchX509SVID per second, {args.callers} callers": round(out["per_second"]),
            "JWT-SVIDs per second, each signed by the controller": round(out["jwt_signed"]),
            "JWT-SVIDs per second, one audience (cached on the node)": round(out["jwt_cached"]),
        }
        for what, value in results.items():
            print(f"{what}: {value}", flush=True)
        print(json.dumps({**results, "cores": os.cpu_count(), "load_average": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
