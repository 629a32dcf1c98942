"""Churn soak (issue 18): many agent births and deaths and many policy applies; is anything left behind?

A mesh of three namespaces (controller, an ``agents`` node, a ``db`` node)
with the real daemons. Then, in rounds until the counts are reached (or the
time bound, 10 minutes, runs out):

* births: 10 callers at once, each a forked child that becomes an agent
  through meshd's local API and exits at once (its agent is retired);
* policy applies: the admin applies a policy that differs each time (a
  comment and an acl's port), so every node recompiles and replaces its
  firewall table.

Before and after: RSS and open file descriptors of meshd (both nodes) and the
controller, and what the agents node holds for agents (cgroups, nftables
elements, agent directories, the controller's live agents of the node). After
the churn everything an agent held must be gone, and memory should be flat.

    .venv/bin/python bench/bench_soak.py [--births 10000] [--policies 1000] [--minutes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import command_line

from tests.e2e.mesh import Mesh, Node, cmd, wait_until
from tests.e2e.netns import Network

POLICY = """\
# round {n}
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:read"]
    max_ttl: 1h
services:
  db: {{nodes: [tag:db], ports: [{port}]}}
acls:
  - from: {{principal: nikita@acme.com, via: agent, scope: "db:read"}}
    to: [db]
"""
BIRTHS = """\
import os, sys, threading
from idmesh.local import LocalClient
socket, n, callers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = {"principal": "nikita@acme.com", "scopes": ["db:read"], "ttl_seconds": 600, "name": "soak"}
failed = []
def caller(count):
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                LocalClient(socket).request("POST", "/v1/agents", body)
                os._exit(0)
            except Exception:
                os._exit(1)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(1)
threads = [threading.Thread(target=caller, args=(n // callers,)) for _ in range(callers)]
for t in threads: t.start()
for t in threads: t.join()
print(len(failed))
"""
APPLY = """\
import sys
from pathlib import Path
from idmesh.client import AdminCredential
admin, template, start, n = AdminCredential.load(Path(sys.argv[1])), open(sys.argv[2]).read(), int(sys.argv[3]), int(sys.argv[4])
with admin.client() as client:
    for i in range(start, start + n):
        client.request("POST", "/v1/policy", {"text": template.format(n=i, port=5432 + i % 2), "filename": "p.yaml"})
"""


def process(pid: int) -> dict[str, float]:
    status = {line.split(":")[0]: line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
              if line.startswith(("VmRSS", "Threads"))}
    return {"rss_mb": round(int(status["VmRSS"]) / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"])}


def held_for_agents(mesh: Mesh, node: Node) -> dict[str, int]:
    table = json.loads(node.host.run(["nft", "-j", "list", "table", "inet", "idmesh_agents"]).stdout)["nftables"]
    elements = sum(len(obj[kind].get("elem", [])) for obj in table for kind in ("set", "map") if kind in obj)
    directory = node.socket.parent / f"agents-{node.host.wg_ifname}"
    parents = [Path(root) / f"idmesh-{node.host.wg_ifname}" for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")]
    cgroups = [p for parent in parents if parent.is_dir() for p in parent.glob("agent-*") if p.is_dir()]
    live = json.loads(mesh.admin("agent", "list", "--mesh", "--json").stdout)
    return {"nft_elements": elements, "agent_directories": len(os.listdir(directory)),
            "cgroups": len(cgroups), "live_agents_at_controller": len(live),
            "local_agents": len(json.loads(node.host.run([cmd("meshctl"), "agent", "list", "--json", "--socket",
                                                          str(node.socket)]).stdout))}


def snapshot(mesh: Mesh, agents: Node, db: Node) -> dict[str, object]:
    assert agents.proc is not None and db.proc is not None and mesh.controller is not None
    return {"meshd agents": process(agents.proc.pid), "meshd db": process(db.proc.pid),
            "controller": process(mesh.controller.pid), "agents node holds": held_for_agents(mesh, agents)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--births", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--minutes", type=float, default=10.0)
    args = ap.parse_args()
    print(f"$ {command_line()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, Network(3) as net:
        mesh = Mesh(net, Path(tmp), net["h1"])
        mesh.init(policy=POLICY.format(n=0, port=5432))
        agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
        db = mesh.enroll(net["h3"], "db", "--tag", "db")
        for node in (agents, db):
            mesh.start(node)
        mesh.wait_converged()
        (Path(tmp) / "template.yaml").write_text(POLICY)
        before = snapshot(mesh, agents, db)
        print(f"before: {json.dumps(before)}", flush=True)
        deadline = time.monotonic() + args.minutes * 60
        born = applied = failed = 0
        t0 = time.monotonic()
        while (born < args.births or applied < args.policies) and time.monotonic() < deadline:
            if born < args.births:
                batch = min(500, args.births - born)
                failed += int(agents.host.run([sys.executable, "-c", BIRTHS, str(agents.socket), str(batch), "10"],
                                              timeout=600).stdout)
                born += batch
            if applied < args.policies:
                batch = min(50, args.policies - applied)
                mesh.controller_host.run([sys.executable, "-c", APPLY, str(Path(tmp) / "ctl" / "admin.conf"),
                                          str(Path(tmp) / "template.yaml"), str(applied + 1), str(batch)],
                                         timeout=600)
                applied += batch
            print(f"  {time.monotonic() - t0:.0f} s: {born} births ({failed} failed), {applied} policies", flush=True)
        version = applied + 1
        wait_until(lambda: all(n.status()["policy"]["version"] >= version for n in (agents, db)), 60,
                   "both nodes on the last policy")
        wait_until(lambda: held_for_agents(mesh, agents)["local_agents"] == 0, 60, "every agent retired")
        time.sleep(2)
        after = snapshot(mesh, agents, db)
        print(json.dumps({"births": born, "failed_births": failed, "policies": applied,
                          "seconds": round(time.monotonic() - t0), "before": before, "after": after,
                          "cores": os.cpu_count(), "load_average": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
