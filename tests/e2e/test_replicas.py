"""Two controller replicas on one PostgreSQL database, real meshd nodes, real WireGuard (SPEC §8).

The replicas run in the controller's namespace (h1, ports 8443 and 8444)
and reach the session's PostgreSQL cluster through its Unix socket. The
nodes learn both URLs (the token, then the map). Replica 1 is killed with
``-9`` while every node streams from it: the nodes move to replica 2 on
their own, keep receiving changes (a node enrolled afterwards joins the
tunnels), and a revocation made through replica 2 still closes the door
on the other node within a second. Times are printed for the notes; the
figures of record come from bench/bench_failover.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.mesh import Mesh, Node, Replica, cmd, firewall_holds, revoke_and_time, wait_for, wait_until
from tests.e2e.netns import Network
from tests.pg import Cluster

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


@pytest.fixture
def replicated(network: Any, tmp_path: Path, pg_cluster: Cluster) -> Iterator[tuple[Mesh, Replica]]:
    net: Network = network(4)
    mesh = Mesh(net, tmp_path, net["h1"], db=pg_cluster.new_database(socket=True))
    mesh.init(policy=POLICY)
    second = mesh.join(8444)
    try:
        second.start()
        yield mesh, second
    finally:
        second.stop()


def controller_of(node: Node) -> tuple[str, bool]:
    ctl = node.status()["controller"]
    return str(ctl["url"]), bool(ctl["connected"])


def test_nodes_move_to_the_other_replica_when_theirs_is_killed_and_keep_receiving_changes(
        replicated: tuple[Mesh, Replica]) -> None:
    mesh, second = replicated
    agents = mesh.enroll(mesh.net["h2"], "agents", "--tag", "agents")
    db = mesh.enroll(mesh.net["h3"], "db", "--tag", "db")
    for node in (agents, db):
        mesh.start(node)
    mesh.wait_converged()
    for node in (agents, db):  # both know both replicas, and stream from the first
        status = node.status()["controller"]
        assert status["urls"] == [mesh.url, second.url], status
        assert controller_of(node) == (mesh.url, True)
    # a change made through replica 2 reaches nodes streaming from replica 1
    version = agents.status()["policy"]["version"]
    path = mesh.tmp / "again.yaml"
    path.write_text(POLICY + "# applied through replica 2\n")
    second.admin("policy", "apply", str(path))
    took = wait_for("replica 2's policy on a node of replica 1",
                    lambda: agents.status()["policy"]["version"] > version, 10, mesh)
    print(f"\npolicy applied through replica 2, in force on a node streaming from replica 1: {took:.2f} s "
          "after meshctl returned")

    mesh.kill_controller()  # replica 1, kill -9, while both nodes stream from it
    t0 = time.monotonic()
    wait_until(lambda: all(controller_of(n) == (second.url, True) for n in (agents, db)), 30,
               "every node streaming from replica 2", on_fail=mesh.logs)
    print(f"every node streams from replica 2 {time.monotonic() - t0:.2f} s after replica 1 was killed")

    # changes keep coming: a node enrolled through replica 2 joins the tunnels of the others
    token = second.admin("token", "create", "--tag", "db").stdout.strip()
    late = mesh.net["h4"]
    state = mesh.tmp / "nodes" / "late"
    late.run([cmd("meshd"), "enroll", token, "--name", "late", "--state", str(state)])
    mesh.nodes["late"] = Node(late, "late", state, mesh.tmp / "late.sock", mesh.tmp / "late.log")
    mesh.start(mesh.nodes["late"])
    mesh.wait_converged()
    assert controller_of(mesh.nodes["late"])[0] == second.url  # replica 1 is gone: its URL is tried first, fails

    # and a revocation through replica 2 still reaches the receiving node at once
    proc = agents.host.popen([cmd("meshctl"), "agent", "run", "--socket", str(agents.socket), "-q", "--principal",
                              "nikita@acme.com", "--scope", "db:read", "--ttl", "10m", "--", "sleep", "600"])
    try:
        agent = wait_until(lambda: next(iter(_agents(agents)), None), 10, "the agent is born", on_fail=mesh.logs)
        address = agent["addresses"][0]
        wait_until(lambda: firewall_holds(db, address), 10, "db admits the agent", on_fail=mesh.logs)
        took_ms = revoke_and_time(_through(mesh, second), agent["id"], address, db)
        print(f"revocation through replica 2, db's firewall closed {took_ms:.0f} ms after the commit")
        assert not firewall_holds(db, address)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _agents(node: Node) -> list[dict[str, Any]]:
    import json

    out = node.host.run([cmd("meshctl"), "agent", "list", "--json", "--socket", str(node.socket)]).stdout
    return list(json.loads(out))


def _through(mesh: Mesh, replica: Replica) -> Mesh:
    """The mesh as its administrator sees it through ``replica``'s admin.conf (replica 1's is dead)."""

    class Through(Mesh):
        @property
        def env(self) -> dict[str, str]:
            return {**super().env, "IDMESH_ADMIN": str(replica.data / "admin.conf")}

    return Through(mesh.net, mesh.tmp, mesh.controller_host, mesh.url, None, mesh.nodes, mesh.serve, mesh.db)
