"""A node keeps working against a newer controller (``meshcore.wire``: strict writers, tolerant readers).

The controller here is :mod:`tests.compat.future_controller`: this
version's controller whose every answer and stream message carries a
field this meshd does not know, and whose stream interleaves a message of
a type it does not know. Enrollment, the map, the policy, an agent's birth
and its revocation must all still work — a node that failed to parse
would reconnect forever and never hear of a revocation again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from meshcore.wire import PROTOCOL
from tests.compat.future_controller import FIELD
from tests.e2e.mesh import Mesh, Node, cmd, ping, tcp_server, wait_until
from tests.e2e.netns import Network

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:read"]
    max_ttl: 1h
acls:
  - from: {tag: agents}
    to: ["tag:db"]
    protocol: [tcp, icmp]
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: ["tag:db:5432"]
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Node, Node]]:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    with Network(3) as net:
        mesh = Mesh(net, tmp_path_factory.mktemp("compat"), net["h1"],
                    serve=[sys.executable, "-m", "tests.compat.future_controller", "serve"])
        mesh.init(policy=POLICY)
        agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
        db = mesh.enroll(net["h3"], "db", "--tag", "db")
        for node in (agents, db):
            mesh.start(node)
        mesh.wait_converged()
        tcp_server(db.host, "::", 5432)
        yield mesh, agents, db


def test_the_future_controller_really_sends_what_this_version_does_not_know(
        lab: tuple[Mesh, Node, Node]) -> None:
    mesh, _, _ = lab
    read = ("import json,sys; from pathlib import Path; from idmesh.client import AdminCredential;"
            "print(json.dumps(AdminCredential.load(Path(sys.argv[1])).client().request('GET', '/v1/nodes')))")
    raw = json.loads(mesh.controller_host.run([sys.executable, "-c", read, mesh.env["IDMESH_ADMIN"]]).stdout)
    assert all(FIELD in node for node in raw) and len(raw) == 2
    assert len(json.loads(mesh.admin("nodes", "list", "--json").stdout)) == 2  # and meshctl reads it


def test_nodes_enroll_connect_and_enforce_the_policy(lab: tuple[Mesh, Node, Node]) -> None:
    _mesh, agents, db = lab
    status = agents.status()
    assert status["controller"]["connected"] and status["controller"]["protocol"] == PROTOCOL
    assert status["policy"]["version"] == db.status()["policy"]["version"] == 1
    assert db.status()["policy"]["rules"] > 0  # db compiled the policy's rules for its ingress
    assert ping(agents.host, db.addresses[0])
    assert not ping(db.host, agents.addresses[0])  # no rule lets db in: the policy is enforced, not just parsed


def test_an_unknown_message_type_is_skipped_and_the_stream_stays_up(lab: tuple[Mesh, Node, Node]) -> None:
    _mesh, agents, _ = lab
    log = agents.log.read_text()
    assert "sends 'hologram' messages, which this meshd does not know: skipped" in log
    assert log.count("connected to controller") == 1, log  # never dropped and reconnected
    assert "reconnecting" not in log


def test_an_agent_is_born_honored_remotely_and_revoked_everywhere(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, db = lab
    agent_run = [cmd("meshctl"), "agent", "run", "--socket", str(agents.socket), "-q", "--principal",
                 "nikita@acme.com", "--scope", "db:read", "--ttl", "10m"]
    hello = ("import os,socket,sys; c=socket.create_connection((sys.argv[1], 5432), timeout=3);"
             "print(c.recv(100).decode().strip(), os.environ['IDMESH_AGENT_ADDRESS'])")
    seen = agents.host.run([*agent_run, "--name", "once", "--", sys.executable, "-c", hello, db.addresses[0]],
                           check=False, timeout=60)
    assert seen.returncode == 0, seen.stderr
    word, peer, own = seen.stdout.split()
    assert word == "hello" and peer.removeprefix("::ffff:") == own  # db saw the agent's own address

    proc = agents.host.popen([*agent_run, "--name", "reader", "--", "sleep", "60"])
    def reader() -> dict[str, str] | None:
        listed = json.loads(agents.host.run([cmd("meshctl"), "agent", "list", "--json", "--socket",
                                             str(agents.socket)]).stdout)
        return next((a for a in listed if a["name"] == "reader"), None)

    agent = wait_until(reader, 20, "the agent", mesh.logs)

    def honored() -> bool:
        done = db.host.run([cmd("meshctl"), "whois", agent["addresses"][0], "--json", "--socket", str(db.socket)],
                           check=False)
        return done.returncode == 0 and json.loads(done.stdout)["agent"] == agent["id"]

    wait_until(honored, 10, "db honoring the agent born through the future controller", mesh.logs)
    mesh.admin("agent", "revoke", agent["id"])
    wait_until(lambda: not honored(), 10, "the revocation reaching db", mesh.logs)
    assert proc.wait(20) != 0  # its own node killed it
