"""Agents as servers (issue 15): an agent listens on its own address; only what the policy allows reaches it.

Node ``a`` runs a serving agent (scope task:serve) listening on
``$IDMESH_AGENT_ADDRESS``; node ``c`` runs calling agents. The acl names the
destination by selector: ``'{principal: nikita@acme.com, scope: "task:serve"}:9000-9003'``.
The receiving node's agents table delivers a connection to an agent's
address only to sockets in that agent's own cgroup, so a plain process on
``a`` listening on the same port (wildcard, or the agent's very address)
gets nothing, and the agent's revocation closes its inbound side too.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.mesh import TCP_SERVER, Mesh, Node, cmd, revoke_and_time, tcp_hello, tcp_server, wait_until
from tests.e2e.netns import Network

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["task:*"]
    max_ttl: 1h
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "task:call"}
    to: ['{principal: nikita@acme.com, scope: "task:serve"}:9000-9003']
tests:
  - from: {principal: nikita@acme.com, scope: "task:call"}
    to: '{principal: nikita@acme.com, scope: "task:serve"}:9000'
    expect: allow
  - from: {principal: nikita@acme.com, scope: "task:other"}
    to: '{principal: nikita@acme.com, scope: "task:serve"}:9000'
    expect: deny
"""
# The agent listens on its own address, as `meshctl agent run --help` says an agent server does.
SERVE = ("import os, sys\n"
         "sys.argv = ['server', os.environ['IDMESH_AGENT_ADDRESS'], '9000']\n"
         f"exec({TCP_SERVER!r})\n")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Node, Node]]:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    with Network(3) as net:
        mesh = Mesh(net, tmp_path_factory.mktemp("agentsrv"), net["h1"])
        mesh.init(policy=POLICY)
        a = mesh.enroll(net["h2"], "a", "--tag", "agents")
        c = mesh.enroll(net["h3"], "c", "--tag", "agents")
        for node in (a, c):
            mesh.start(node)
        mesh.wait_converged()
        yield mesh, a, c


def agent_argv(node: Node, scope: str, *command: str) -> list[str]:
    return [cmd("meshctl"), "agent", "run", "--socket", str(node.socket), "-q", "--principal", "nikita@acme.com",
            "--scope", scope, "--ttl", "10m", "--", *command]


def serving_agent(a: Node) -> tuple[subprocess.Popen[str], str, str]:
    """The serving agent on ``a``: its process, id and IPv4 address (once it listens)."""
    proc = a.host.popen(agent_argv(a, "task:serve", sys.executable, "-c", SERVE), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    listed = a.host.run([cmd("meshctl"), "agent", "list", "--json", "--socket", str(a.socket)]).stdout
    agent = next(x for x in json.loads(listed) if "task:serve" in x["scopes"])
    return proc, agent["id"], agent["addresses"][0]


def call(node: Node, address: str, port: int, scope: str | None) -> str | None:
    """What a caller on ``node`` (an agent with ``scope``, or a plain process) hears from ``address:port``."""
    program = ("import socket, sys\n"
               "try:\n    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
               "    print(c.recv(200).decode().strip())\n"
               "except OSError as e:\n    print('no answer:', e)\n")
    argv = [sys.executable, "-c", program, address, str(port)]
    out = node.host.run(agent_argv(node, scope, *argv) if scope else argv, timeout=30).stdout.strip()
    return None if out.startswith("no answer") else out


def test_an_agent_serves_on_its_own_address_to_the_agents_the_policy_allows(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, a, c = lab
    proc, agent_id, address = serving_agent(a)
    try:
        heard = wait_until(lambda: call(c, address, 9000, "task:call"), 10, "the calling agent reaches the server")
        assert heard.startswith("hello 100.64."), heard  # it sees the caller's own agent address
        caller, block = heard.split()[1], json.loads((c.state / "node.json").read_text())["blocks"][0]
        assert ipaddress.ip_address(caller) in ipaddress.ip_network(block) and caller not in c.addresses
        assert call(c, address, 9000, "task:other") is None, "an agent without task:call must be dropped"
        assert call(c, address, 9000, None) is None, "node c itself is no agent the rule names"
        # a process on `a` that is no agent: on the wildcard address, and on the agent's very address
        others = [tcp_server(a.host, "0.0.0.0", 9002), tcp_server(a.host, address, 9003)]
        try:
            assert call(c, address, 9002, "task:call") is None, "a wildcard listener outside the agent got it"
            assert call(c, address, 9003, "task:call") is None, "a listener on the agent's address outside it got it"
            assert tcp_hello(a.host, address, 9003, timeout=2) is None, "not even from the node itself"
        finally:
            for other in others:
                other.kill()
                other.wait()
        # revoking the agent closes its inbound side at once
        took = revoke_and_time(mesh, agent_id, address, a)  # a's policy no longer admits to the address
        print(f"revocation to the serving agent's address no longer admitted: {took:.0f} ms")
        proc.wait(10)
        assert call(c, address, 9000, "task:call") is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
