"""Identity-based routes end to end (SPEC §4 ``routes``): the gateway a packet
takes is chosen by who sent it, gateways forward only what the policy grants,
and a stopped exit node hands its traffic to the next one.

Topology (every address inside this test's namespaces)::

    h1 controller      h2 agents (sender)      mesh bridge 198.51.100.0/24
    h3 exit-a ─┐
    h4 exit-b ─┴─ internet  203.0.113.0/24  (server 203.0.113.1)
    h5 billing-gw ── lan    10.20.0.0/16    (server 10.20.0.1)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.mesh import Mesh, Node, cmd, tcp_hello, tcp_server, wait_until
from tests.e2e.netns import Host, Network

POLICY = """\
groups:
  sre: [li@acme.com]
delegations:
  - principal: li@acme.com
    nodes: [tag:agents]
    scopes: ["ops:*"]
    max_ttl: 1h
  - principal: ann@acme.com
    nodes: [tag:agents]
    scopes: ["billing:*", "docs:read"]
    max_ttl: 1h
routes:
  - from: {group: sre, via: agent}
    to: [0.0.0.0/0, "::/0"]
    via: [node:exit-a, node:exit-b]
  - from: {scope: "billing:*"}
    to: 0.0.0.0/0
    via: node:exit-b
  - from: {scope: "billing:*"}
    to: 10.20.0.0/16
    via: tag:billing-gw
"""
INTERNET, LAN, PORT = "203.0.113.1", "10.20.0.1", 8080
EXIT_A, EXIT_B, BILLING_GW = "203.0.113.2", "203.0.113.3", "10.20.0.2"
INTERNET6, EXIT_A6 = "2001:db8:113::1", "2001:db8:113::2"
HELLO = ("import socket,sys\n"
         "try:\n"
         "    print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).recv(100).decode().strip())\n"
         "except OSError as e: print('failed', e); sys.exit(3)\n")
SRE = ("li@acme.com", "ops:run")
BILLING = ("ann@acme.com", "billing:read")
DOCS = ("ann@acme.com", "docs:read")


@dataclass
class Lab:
    mesh: Mesh
    agents: Node
    exit_a: Node
    exit_b: Node
    billing_gw: Node
    internet: Host
    lan: Host


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    with Network(5, ipv6=False) as net:
        internet = net.add_segment("internet", [f"{INTERNET}/24", f"{INTERNET6}/64"],
                                   [(net["h3"], [f"{EXIT_A}/24", f"{EXIT_A6}/64"]), (net["h4"], f"{EXIT_B}/24")])
        lan = net.add_segment("lan", f"{LAN}/16", [(net["h5"], f"{BILLING_GW}/16")])
        mesh = Mesh(net, tmp_path_factory.mktemp("routes"), net["h1"])
        mesh.init(policy=POLICY)
        agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
        exit_a = mesh.enroll(net["h3"], "exit-a", "--tag", "exit")
        exit_b = mesh.enroll(net["h4"], "exit-b", "--tag", "exit")
        billing_gw = mesh.enroll(net["h5"], "billing-gw", "--tag", "billing-gw")
        mesh.start(agents)
        mesh.start(exit_a, "--advertise-exit-node")
        mesh.start(exit_b, "--advertise-exit-node")
        mesh.start(billing_gw, "--advertise-routes", "10.20.0.0/16")
        mesh.wait_converged()
        tcp_server(internet, "0.0.0.0", PORT)
        tcp_server(internet, INTERNET6, PORT)  # its own address: no clash with the IPv4 server
        tcp_server(lan, "0.0.0.0", PORT)
        yield Lab(mesh, agents, exit_a, exit_b, billing_gw, internet, lan)


def agent_argv(node: Node, who: tuple[str, str], *command: str) -> list[str]:
    """``meshctl agent run -q`` as ``who`` (principal, scope): meshctl prints nothing, the command's output is all."""
    principal, scope = who
    return [cmd("meshctl"), "agent", "run", "--socket", str(node.socket), "-q", "--principal", principal,
            "--scope", scope, "--ttl", "30m", "--", *command]


def as_agent(node: Node, who: tuple[str, str], *command: str) -> str:
    """Run ``command`` as a fresh agent of ``who``; its output."""
    done = node.host.run(agent_argv(node, who, *command), check=False, timeout=60)
    return (done.stdout + done.stderr).strip()


def hello(node: Node, who: tuple[str, str], address: str) -> str:
    return as_agent(node, who, sys.executable, "-c", HELLO, address, str(PORT))


def wait_routed(lab: Lab, who: tuple[str, str], address: str, expect: str) -> None:
    """Routes follow the netmap and policy streams: wait for the first answer, then it must hold."""
    wait_until(lambda: hello(lab.agents, who, address) == expect, 30, f"{who[0]} reaching {address}",
               on_fail=lab.mesh.logs)


def test_an_sre_agent_leaves_through_exit_a_and_a_billing_agent_through_exit_b(lab: Lab) -> None:
    wait_routed(lab, SRE, INTERNET, f"hello {EXIT_A}")  # the far end sees exit A's address
    assert hello(lab.agents, BILLING, INTERNET) == f"hello {EXIT_B}"
    assert hello(lab.agents, SRE, INTERNET) == f"hello {EXIT_A}"


def test_ipv6_leaves_through_the_exit_too(lab: Lab) -> None:
    wait_routed(lab, SRE, INTERNET6, f"hello {EXIT_A6}")  # an exit offers ::/0 as well; NAT66 to its address
    assert hello(lab.agents, BILLING, INTERNET6).startswith("failed")  # billing's routes are IPv4 only


def test_a_plain_process_and_an_agent_without_a_route_do_not_leave_the_mesh(lab: Lab) -> None:
    wait_routed(lab, SRE, INTERNET, f"hello {EXIT_A}")
    assert tcp_hello(lab.agents.host, INTERNET, PORT, timeout=2) is None
    assert hello(lab.agents, DOCS, INTERNET).startswith("failed")


def test_a_billing_agent_reaches_the_lan_only_through_the_billing_gateway(lab: Lab) -> None:
    wait_routed(lab, BILLING, LAN, f"hello {BILLING_GW}")
    # the SRE agent's default route is exit A, which has no way into the lan
    assert hello(lab.agents, SRE, LAN).startswith("failed")
    assert hello(lab.agents, DOCS, LAN).startswith("failed")


def _refused(node: Node) -> int:
    out = node.host.run(["nft", "-j", "list", "counter", "inet", "idmesh_routes", "refused"]).stdout
    return int(next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o))


def test_an_identity_without_a_route_cannot_reach_the_lan_by_setting_its_own_routes(lab: Lab) -> None:
    wait_routed(lab, BILLING, LAN, f"hello {BILLING_GW}")
    tunnel = next(t["interface"] for t in lab.agents.status()["routing"]["tunnels"] if t["gateway"] == "billing-gw")
    before = _refused(lab.billing_gw)
    lab.agents.host.run(["ip", "route", "add", "10.20.0.0/16", "dev", tunnel])
    try:
        assert tcp_hello(lab.agents.host, LAN, PORT, timeout=2) is None  # root, the node's own address
        assert hello(lab.agents, DOCS, LAN).startswith("failed")  # an agent no route names
        assert hello(lab.agents, BILLING, LAN) == f"hello {BILLING_GW}"  # the granted one still passes
    finally:
        lab.agents.host.run(["ip", "route", "del", "10.20.0.0/16", "dev", tunnel])
    assert _refused(lab.billing_gw) > before  # refused at the gateway, not lost on the way


def test_routes_list_and_explain_say_who_goes_where(lab: Lab) -> None:
    offered = {(r["node"], r["prefix"]): r for r in json.loads(lab.mesh.admin("routes", "list", "--json").stdout)}
    assert offered[("exit-a", "0.0.0.0/0")]["exit"] is True
    assert [e.split(" ")[0] for e in offered[("exit-a", "0.0.0.0/0")]["enabled_by"]] == ["routes[0]"]
    assert [e.split(" ")[0] for e in offered[("billing-gw", "10.20.0.0/16")]["enabled_by"]] == ["routes[2]"]
    assert [e.split(" ")[0] for e in offered[("exit-a", "::/0")]["enabled_by"]] == ["routes[0]"]
    explained = lab.mesh.admin("policy", "explain", "--from", "group=sre,via=agent,scope=ops:run",
                               "--to", INTERNET).stdout
    assert "via exit-a, then exit-b: routes[0]" in explained
    explained = json.loads(lab.mesh.admin("policy", "explain", "--from", "principal=ann@acme.com,scope=billing:read", "--to", LAN,
                                          "--json").stdout)
    assert explained["gateways"] == ["billing-gw"] and explained["route"] == "10.20.0.0/16"
    status = lab.agents.host.run([cmd("meshctl"), "status", "--socket", str(lab.agents.socket)]).stdout
    assert "TUNNEL" in status and "exit-a" in status and "billing-gw" in status


LOOP = ("import socket,sys,time\n"
        "while True:\n"
        "    try:\n"
        "        r=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).recv(100).decode().strip()\n"
        "    except OSError as e: r='failed'\n"
        "    print(time.monotonic(), r, flush=True); time.sleep(0.1)\n")


def test_when_exit_a_stops_the_sre_agent_moves_to_exit_b_and_back(lab: Lab) -> None:
    wait_routed(lab, SRE, INTERNET, f"hello {EXIT_A}")
    proc = lab.agents.host.popen(agent_argv(lab.agents, SRE, sys.executable, "-c", LOOP, INTERNET, str(PORT)),
                                 stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = proc.stdout

    def until(answer: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        for line in lines:
            at, _, said = line.strip().partition(" ")
            if said == answer:
                return float(at)
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"the agent never got {answer!r}\n{lab.mesh.logs()}")

    try:
        until(f"hello {EXIT_A}", 30)
        stopped = time.monotonic()
        assert lab.mesh.stop(lab.exit_a) == 0
        moved = until(f"hello {EXIT_B}", 30) - stopped
        print(f"\nexit A stopped: the SRE agent's traffic left through exit B after {moved:.1f} s")
        lab.mesh.start(lab.exit_a, "--advertise-exit-node")
        restarted = time.monotonic()
        back = until(f"hello {EXIT_A}", 60) - restarted
        print(f"exit A restarted: back through exit A after {back:.1f} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
