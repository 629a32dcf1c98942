"""A meshd that runs in a cgroup of its own (as meshd.service does) keeps its agents' cgroups below it (issue 18).

The test makes a cgroup, starts meshd inside it (as systemd starts a unit in
its own), and checks that an agent's process lands in
``<that cgroup>/idmesh-<interface>/agent-<n>``, that the identity still
decides at the receiving node (nft matches the deeper cgroup level), and that
nothing is left below it once meshd has stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.agents.cgroups import locate_cgroup2
from tests.e2e.mesh import Mesh, Node, cmd, tcp_hello, tcp_server, wait_until
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
HELLO = ("import socket,sys\n"
         "print(socket.create_connection((sys.argv[1], 5432), timeout=2).recv(100).decode().strip())\n")


@pytest.fixture
def unit_cgroup() -> Iterator[Path]:
    root = locate_cgroup2(Path("/sys/fs/cgroup"), "x", mount=False).directory.parent
    made = root / f"idmesh-test-unit-{os.getpid()}"
    made.mkdir()
    try:
        yield made
    finally:
        for leftover in sorted(made.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if leftover.is_dir():
                leftover.rmdir()
        made.rmdir()


def start_in(mesh: Mesh, node: Node, cgroup: Path) -> None:
    procs = cgroup / "cgroup.procs"
    with node.log.open("a") as log:
        node.proc = node.host.popen(
            [cmd("meshd"), "run", "--state", str(node.state), "--interface", node.host.wg_ifname,
             "--socket", str(node.socket)], stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: procs.write_text(str(os.getpid())))  # before exec: ip netns exec, then meshd
    wait_until(lambda: node.socket.exists(), 20, f"{node.name}'s local API", on_fail=mesh.logs)


def test_agents_cgroups_live_below_meshds_own_and_still_decide(tmp_path: Path, unit_cgroup: Path) -> None:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    with Network(3) as net:
        mesh = Mesh(net, tmp_path, net["h1"])
        mesh.init(policy=POLICY)
        agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
        db = mesh.enroll(net["h3"], "db", "--tag", "db")
        start_in(mesh, agents, unit_cgroup)
        mesh.start(db)
        mesh.wait_converged()
        tcp_server(db.host, "::", 5432)
        run = [cmd("meshctl"), "agent", "run", "--socket", str(agents.socket), "-q", "--principal", "nikita@acme.com",
               "--scope", "db:read", "--"]
        where = agents.host.run([*run, "cat", "/proc/self/cgroup"])
        expected = f"0::/{unit_cgroup.name}/idmesh-{agents.host.wg_ifname}/agent-"
        assert expected in where.stdout, where.stdout
        seen = agents.host.run([*run, sys.executable, "-c", HELLO, db.addresses[0]]).stdout.replace("::ffff:", "")
        assert seen.startswith("hello 100.64.") and seen.strip() != f"hello {agents.addresses[0]}", seen  # its own address, let in by its identity
        assert tcp_hello(agents.host, db.addresses[0], 5432, timeout=1) is None  # the node itself is not
        mesh.stop(agents)
        assert not (unit_cgroup / f"idmesh-{agents.host.wg_ifname}").exists()  # nothing left below it
