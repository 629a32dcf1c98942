"""What an agent identity costs, and how fast it dies.

A mesh of three namespaces (controller, an ``agents`` node, a ``db`` node)
with the real daemons. Then:

* birth: N agents are started one after the other; each is a small client
  of meshd's local API that asks to become an agent and measures the call —
  key made on the node, certificate issued by the controller (delegation
  checked), address, cgroup, nftables entries, process moved in — then
  exits (which retires it);
* revocation: K agents are started and revoked one by one with the admin
  API; for each, the time from the controller's commit (its audit row) to
  the moment the db node's firewall no longer holds the agent's address.

    .venv/bin/python bench/bench_agents.py [--births 50] [--revocations 10]
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

from tests.e2e.mesh import Mesh, Node, cmd, firewall_holds, revoke_and_time, wait_until
from tests.e2e.netns import Network

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:read"]
    max_ttl: 1h
services:
  db: {nodes: [tag:db], ports: [5432]}
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: [db]
"""
BIRTH = """\
import json, sys, time, httpx
t = time.perf_counter()
with httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1], verify=False), base_url="http://meshd",
                  timeout=30) as c:
    r = c.post("/v1/agents", json={"principal": "nikita@acme.com", "scopes": ["db:read"], "ttl_seconds": 600,
                                   "name": "bench"})
print(json.dumps({"ms": (time.perf_counter() - t) * 1000, "status": r.status_code}))
"""


def births(agents: Node, n: int) -> list[float]:
    out = []
    for _ in range(n):
        done = agents.host.run([sys.executable, "-c", BIRTH, str(agents.socket)], timeout=60)
        row = json.loads(done.stdout)
        if row["status"] != 200:
            raise SystemExit(f"agent birth failed: {row}")
        out.append(row["ms"])
    return out


def revocations(mesh: Mesh, agents: Node, db: Node, k: int) -> list[float]:
    out = []
    for _ in range(k):
        proc = agents.host.popen([cmd("meshctl"), "agent", "run", "-q", "--socket", str(agents.socket), "--principal",
                                  "nikita@acme.com", "--scope", "db:read", "--name", "victim", "--", "sleep", "60"])
        listed = wait_until(lambda: json.loads(agents.host.run([cmd("meshctl"), "agent", "list", "--json",
                                                                "--socket", str(agents.socket)]).stdout), 20,
                            "the agent")
        agent = listed[0]
        address = agent["addresses"][0]

        wait_until(lambda held=address: firewall_holds(db, held), 10, "db to honor the agent")
        out.append(revoke_and_time(mesh, agent["id"], address, db))
        proc.wait(20)
    return out


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": round(q[49], 1), "p99": round(q[98], 1), "max": round(values[-1], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--births", type=int, default=50)
    ap.add_argument("--revocations", type=int, default=10)
    args = ap.parse_args()
    print(f"$ {command_line()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, Network(3) as net:
        mesh = Mesh(net, Path(tmp), net["h1"])
        mesh.init(policy=POLICY)
        agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
        db = mesh.enroll(net["h3"], "db", "--tag", "db")
        for node in (agents, db):
            mesh.start(node)
        mesh.wait_converged()
        born = births(agents, args.births)
        print(f"agent birth (local API call: key, certificate, address, cgroup, nftables, move): "
              f"{summary(born)} ms over {len(born)}", flush=True)
        revoked = revocations(mesh, agents, db, args.revocations)
        print(f"revocation, controller commit -> db firewall drops the address: {summary(revoked)} ms over "
              f"{len(revoked)}", flush=True)
        print(json.dumps({"birth_ms": summary(born), "revocation_ms": summary(revoked), "cores": os.cpu_count(),
                          "load_average": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
