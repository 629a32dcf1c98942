"""What an agent identity costs as the user feels it, and how fast it dies.

A mesh of three namespaces (controller, an ``agents`` node, a ``db`` node)
with the real daemons. Then, side by side in one run:

* the command line: ``meshctl --help``, ``meshctl status`` and
  ``meshctl agent run -- true`` (the whole process: start-up, birth, exec
  of ``true``, which retires the agent), wall clock, timed by a driver
  inside the node's namespace;
* an agent's first connection: ``meshctl agent run -- python -c CONNECT``
  where CONNECT times, from inside the agent, its first TCP connection to
  db (the receiving node must know the agent by the time its SYN arrives);
* birth inside meshd: N agents one after the other, each a forked child
  asking meshd's local API to become an agent (key, certificate from the
  controller with the delegation checked, address, cgroup, nftables,
  process moved in), the call timed; then births per second with C
  callers at once;
* revocation: K agents are started and revoked one by one with the admin
  API; for each, the time from the controller's commit (its audit row) to
  the moment the db node's firewall no longer holds the agent's address;
* the firewall put back: ``nft delete table inet idmesh`` on db (as another
  admin might), five times; the time until meshd has installed it again.

    .venv/bin/python bench/bench_agents.py [--births 200] [--runs 50] [--callers 20] [--revocations 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import command_line

from tests.e2e.mesh import Mesh, Node, cmd, firewall_holds, revoke_and_time, tcp_server, wait_until
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
BIRTHS = """\
import json, os, sys, time
from idmesh.local import LocalClient
client, n, out = LocalClient(sys.argv[1]), int(sys.argv[2]), []
body = {"principal": "nikita@acme.com", "scopes": ["db:read"], "ttl_seconds": 600, "name": "bench"}
if sys.argv[3:] == ["--wait"]:  # started with others: begin together, once all are up
    print("ready", flush=True); sys.stdin.readline()
for _ in range(n):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes the agent (and retires it by exiting)
        t = time.perf_counter()
        client.request("POST", "/v1/agents", body)
        os.write(w, str((time.perf_counter() - t) * 1000).encode()); os._exit(0)
    os.close(w)
    got = os.read(r, 64); os.close(r); os.waitpid(pid, 0)
    if not got:
        raise SystemExit("a birth failed")
    out.append(float(got))
print(json.dumps(out))
"""
WALL = """\
import json, subprocess, sys, time
n, argv, out = int(sys.argv[1]), sys.argv[2:], []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    out.append((time.perf_counter() - t) * 1000)
print(json.dumps(out))
"""
CONNECT = ("import socket, sys, time\n"
           "t = time.perf_counter(); socket.create_connection((sys.argv[1], 5432), timeout=5).recv(100)\n"
           "print((time.perf_counter() - t) * 1000)\n")


def run_json(node: Node, code: str, *args: str, timeout: float = 600) -> list[float]:
    return list(json.loads(node.host.run([sys.executable, "-c", code, *args], timeout=timeout).stdout))


def agent_run(node: Node, *command: str) -> list[str]:
    return [cmd("meshctl"), "agent", "run", "-q", "--socket", str(node.socket), "--principal", "nikita@acme.com",
            "--scope", "db:read", "--", *command]


def first_connections(agents: Node, db: Node, n: int) -> list[float]:
    out = []
    for _ in range(n):
        done = agents.host.run(agent_run(agents, sys.executable, "-c", CONNECT, db.addresses[0]), timeout=60)
        out.append(float(done.stdout))
    return out


def birth_steps(node: Node) -> dict[str, float]:
    """The median of each step in meshd's ``born ... in N ms (key .., certificate .., ...)`` lines."""
    steps: dict[str, list[float]] = {}
    for line in node.log.read_text().splitlines():
        message = json.loads(line).get("msg", "") if line.startswith("{") else ""
        if (found := re.search(r" born at .* in ([0-9.]+) ms \(([^)]*)\)$", message)) is None:
            continue
        steps.setdefault("total", []).append(float(found.group(1)))
        for part in found.group(2).split(", "):
            name, value = part.rsplit(" ", 1)
            steps.setdefault(name, []).append(float(value))
    return {name: round(statistics.median(values), 2) for name, values in steps.items()}


def concurrent_births(agents: Node, callers: int, each: int) -> float:
    """Births per second with ``callers`` asking at once, ``each`` births apiece (timed from when all are up)."""
    procs = [agents.host.popen([sys.executable, "-c", BIRTHS, str(agents.socket), str(each), "--wait"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(callers)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit("a concurrent birth failed")
    return callers * each / (time.perf_counter() - t0)


def revocations(mesh: Mesh, agents: Node, db: Node, k: int) -> list[float]:
    out = []
    for _ in range(k):
        proc = agents.host.popen([cmd("meshctl"), "agent", "run", "-q", "--socket", str(agents.socket), "--principal",
                                  "nikita@acme.com", "--scope", "db:read", "--name", "victim", "--", "sleep", "60"])
        listed = wait_until(lambda: [a for a in json.loads(agents.host.run(
            [cmd("meshctl"), "agent", "list", "--json", "--socket", str(agents.socket)]).stdout)
            if a["name"] == "victim"], 20, "the agent")
        agent = listed[0]
        address = agent["addresses"][0]

        wait_until(lambda held=address: firewall_holds(db, held), 10, "db to honor the agent")
        out.append(revoke_and_time(mesh, agent["id"], address, db))
        proc.wait(20)
    return out


def table_restores(db: Node, k: int) -> list[float]:
    """``nft delete table inet idmesh`` on db, k times: ms until meshd has installed it again (polled every 5 ms)."""
    code = ("import subprocess, sys, time, json\n"
            "out = []\n"
            "for _ in range(int(sys.argv[1])):\n"
            "    subprocess.run(['nft', 'delete', 'table', 'inet', 'idmesh'], check=True)\n"
            "    t = time.perf_counter()\n"
            "    while subprocess.run(['nft', 'list', 'table', 'inet', 'idmesh'], capture_output=True).returncode:\n"
            "        time.sleep(0.005)\n"
            "    out.append((time.perf_counter() - t) * 1000)\n"
            "    time.sleep(1)\n"
            "print(json.dumps(out))\n")
    return run_json(db, code, str(k))


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": round(q[49], 1), "p99": round(q[98], 1), "max": round(values[-1], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--births", type=int, default=200)
    ap.add_argument("--runs", type=int, default=50, help="runs of each command timed whole")
    ap.add_argument("--callers", type=int, default=20)
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
        tcp_server(db.host, "::", 5432)
        results: dict[str, dict[str, float]] = {}

        def report(what: str, values: list[float]) -> None:
            results[what] = summary(values)
            print(f"{what}: {results[what]} ms over {len(values)}", flush=True)

        runs = str(args.runs)
        report("meshctl --help", run_json(agents, WALL, runs, cmd("meshctl"), "--help"))
        report("meshctl status", run_json(agents, WALL, runs, cmd("meshctl"), "status", "--socket", str(agents.socket)))
        report("meshctl agent run -- true", run_json(agents, WALL, runs, *agent_run(agents, "true")))
        report("an agent's first connection to db, from inside the agent", first_connections(agents, db, args.runs))
        report("agent birth inside meshd (local API call)",
               run_json(agents, BIRTHS, str(agents.socket), str(args.births)))
        steps = birth_steps(agents)
        print(f"  its steps, medians from meshd's log (ms): {steps}", flush=True)
        rate = concurrent_births(agents, args.callers, max(1, args.births // args.callers))
        print(f"births per second with {args.callers} callers at once: {rate:.0f}", flush=True)
        report("revocation, controller commit -> db firewall drops the address",
               revocations(mesh, agents, db, args.revocations))
        report("firewall table deleted by someone else -> installed again by meshd", table_restores(db, 5))
        print(json.dumps({**results, "birth_steps_ms": steps, "births_per_second": round(rate), "callers": args.callers,
                          "cores": os.cpu_count(), "load_average": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
