"""Nodes behind NAT, end to end: real NAT routers (nftables), the controller's STUN, coturn, real meshd.

The lab (:mod:`tests.e2e.natlab`): an internet with a public host — the
controller (STUN on its default ports 3478/3479) and coturn (3480) — and two
homes, each one node behind its own router. Behind endpoint-independent
NATs the nodes punch through and talk directly; behind symmetric NATs they
go through the relay and policy still decides; a NAT that opens moves the
pair back to a direct path under a live TCP connection; a router that
reboots (new mappings) is recovered from; with the controller gone every
established path keeps carrying; and junk sent at the WireGuard port
changes nothing.

The tests share one lab (module scope, built in a few seconds) and run in
file order; each first waits for the state it starts from.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.coturn import Coturn
from tests.e2e.mesh import Mesh, Node, cmd, ping, tcp_hello, tcp_server, wait_until
from tests.e2e.natlab import NatKind, NatLab, Router
from tests.e2e.test_agents import HELLO, run_agent

TURN_PORT = 3480  # the controller's STUN has 3478 and 3479
POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:e2e]
    scopes: ["db:read", "db:write"]
    max_ttl: 1h
acls:
  - from: {tag: e2e}
    to: ["tag:e2e:7000", "tag:e2e:7001"]
    protocol: [tcp, icmp]
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: ["tag:e2e:7003"]
"""
STREAM = ("import socket,sys,time\n"  # one TCP connection that must live through a path change
          "s=socket.create_connection((sys.argv[1], 7001), timeout=15)\n"
          "s.settimeout(15)\n"  # a stall while the path changes is fine; a reset is not

          "while True:\n"
          "    s.sendall(b'x'); assert s.recv(1) == b'x'\n"
          "    print('ok', flush=True); time.sleep(0.1)\n")
ECHO = ("import socket\n"
        "s=socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('::', 7001)); s.listen()\n"
        "while True:\n"
        "    c,_=s.accept()\n"
        "    while (b := c.recv(1)): c.sendall(b)\n")
JUNK = ("import socket,struct,os,sys\n"  # STUN-looking and random datagrams at one ip:port
        "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "to=(sys.argv[1], int(sys.argv[2]))\n"
        "for i in range(50):\n"
        "    s.sendto(struct.pack('!HHI', 1, 0, 0x2112A442) + os.urandom(12), to)\n"
        "    s.sendto(struct.pack('!HHI', 0x0101, 200, 0x2112A442) + os.urandom(212), to)\n"
        "    s.sendto(os.urandom(148), to)\n")


@dataclass
class Lab:
    net: NatLab
    mesh: Mesh
    a: Node
    b: Node
    coturn: Coturn
    relay_secret: Path

    @property
    def routers(self) -> list[Router]:
        return self.net.routers

    def set_nat(self, kind: NatKind) -> None:
        """Every router to ``kind``; one already there is left alone (a switch flushes its conntrack)."""
        for router in self.routers:
            if router.nat != kind:
                router.set_nat(kind)

    def logs(self) -> str:
        return self.mesh.logs() + "\n--- coturn\n" + self.coturn.logs(20)


def peer(node: Node) -> dict[str, Any]:
    (found,) = node.status()["peers"]
    return dict(found)


def path_is(node: Node, kind: str, endpoint_prefix: str = "") -> bool:
    found = peer(node)
    return bool(found["path"] == kind and (found["endpoint"] or "").startswith(endpoint_prefix))


def metric(node: Node, line_start: str) -> float:
    scrape = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9465/metrics').read().decode())"
    text = node.host.run([sys.executable, "-c", scrape]).stdout
    (value,) = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(line_start)]
    return float(value)


def both(lab: Lab, kind: str) -> bool:
    return path_is(lab.a, kind) and path_is(lab.b, kind)


def start(mesh: Mesh, node: Node) -> None:
    mesh.start(node, "--no-discovery", "--metrics", "127.0.0.1:9465")  # loopback of its own namespace


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    tmp = tmp_path_factory.mktemp("nat")
    with NatLab(homes=2, hosts_per_home=1, nat="eim") as net:
        coturn = Coturn(net.public, tmp / "turn", port=TURN_PORT)
        coturn.start()
        secret = tmp / "relay-secret"
        secret.touch(mode=0o600)
        secret.write_text(coturn.secret.decode())
        mesh = Mesh(net, tmp, net.public,
                    serve=[cmd("mesh-controller"), "serve", "--relay", f"turn:{coturn.address}:{TURN_PORT}",
                           "--relay-secret-file", str(secret)])
        mesh.init(policy=POLICY)
        a = mesh.enroll(net.homes[0].hosts[0], "a", "--tag", "e2e")
        b = mesh.enroll(net.homes[1].hosts[0], "b", "--tag", "e2e")
        for node in (a, b):
            start(mesh, node)
            tcp_server(node.host, "::", 7000)
            tcp_server(node.host, "::", 7003)
            node.host.popen([sys.executable, "-c", ECHO])
        try:
            yield Lab(net, mesh, a, b, coturn, secret)
        finally:
            for node in (a, b):
                if node.proc is not None:
                    mesh.stop(node)
            coturn.stop()


def test_behind_two_endpoint_independent_nats_the_nodes_talk_directly(lab: Lab) -> None:
    r1, r2 = lab.routers
    wait_until(lambda: path_is(lab.a, "direct", r2.wan + ":") and path_is(lab.b, "direct", r1.wan + ":"), 30,
               "a direct path through both NATs", lab.logs)
    for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
        assert ping(src.host, dst.addresses[0]) and ping(src.host, dst.addresses[1])  # overlay IPv4 and IPv6
        assert tcp_hello(src.host, dst.addresses[0], 7000) == f"hello ::ffff:{src.addresses[0]}"
    for node in (lab.a, lab.b):
        seen = peer(node)
        assert seen["nat"] == "independent", seen  # what the other end learned from the controller's STUN
        assert seen["last_probe"] != "never", seen
    # The public port is not the LAN port (the lab's NAT never preserves it): the address came from STUN.
    assert not peer(lab.b)["endpoint"].endswith(":51820")


def test_behind_symmetric_nats_the_relay_carries_them_and_policy_still_decides(lab: Lab) -> None:
    lab.set_nat("symmetric")
    wait_until(lambda: path_is(lab.a, "relay", "127.0.0.1:") and path_is(lab.b, "relay", "127.0.0.1:"), 40,
               "both ends through the relay", lab.logs)
    assert ping(lab.a.host, lab.b.addresses[0]) and ping(lab.b.host, lab.a.addresses[1])
    assert tcp_hello(lab.a.host, lab.b.addresses[0], 7000) == f"hello ::ffff:{lab.a.addresses[0]}"
    assert tcp_hello(lab.a.host, lab.b.addresses[0], 7002, timeout=2) is None  # no rule: denied over the relay too
    reader = run_agent(lab.a, sys.executable, "-c", HELLO, lab.b.addresses[0], "7003", name="reader")
    assert reader.returncode == 0 and reader.stdout.startswith("hello ::ffff:100.64."), reader
    writer = run_agent(lab.a, sys.executable, "-c", HELLO, lab.b.addresses[0], "7003", scopes=("db:write",))
    assert writer.returncode == 3, writer  # the agent's scope decides on b, over the relay as over any path
    assert peer(lab.a)["nat"] == "varies" and peer(lab.b)["nat"] == "varies"
    assert metric(lab.a, 'idmesh_peers_by_path{path="relay"}') == 1
    sent, received = 'idmesh_relay_bytes{direction="sent"}', 'idmesh_relay_bytes{direction="received"}'
    before = metric(lab.a, sent), metric(lab.b, received)
    assert lab.a.host.run(["ping", "-c", "3", "-s", "1000", "-W", "2", lab.b.addresses[0]]).returncode == 0
    assert metric(lab.a, sent) - before[0] >= 3000 and metric(lab.b, received) - before[1] >= 3000
    assert "CHANNEL_BIND processed, success" in lab.coturn.logs(400), lab.coturn.logs()


def test_a_nat_that_opens_moves_the_pair_from_the_relay_to_a_direct_path_under_a_live_tcp_connection(
        lab: Lab) -> None:
    lab.set_nat("symmetric")
    wait_until(lambda: both(lab, "relay"), 40, "the relay first", lab.logs)
    stream = lab.a.host.popen([sys.executable, "-u", "-c", STREAM, lab.b.addresses[0]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert stream.stdout is not None and stream.stdout.readline().strip() == "ok"
        lab.set_nat("eim")
        wait_until(lambda: both(lab, "direct"), 40, "back to a direct path", lab.logs)
        for _ in range(10):  # the same TCP connection still answers, now over the direct path
            assert stream.stdout.readline().strip() == "ok"
        assert stream.poll() is None
    finally:
        stream.kill()
        stream.wait(5)


def test_a_router_that_reboots_with_new_mappings_is_recovered_from(lab: Lab) -> None:
    wait_until(lambda: both(lab, "direct"), 40, "a direct path first", lab.logs)
    before = peer(lab.b)["endpoint"]
    lab.routers[0].reboot()  # a's router: new public ports, every mapping and conntrack entry gone
    wait_until(lambda: ping(lab.a.host, lab.b.addresses[0]) and ping(lab.b.host, lab.a.addresses[0]), 60,
               "traffic again after a's router rebooted", lab.logs)
    wait_until(lambda: path_is(lab.b, "direct") and peer(lab.b)["endpoint"] != before, 60,
               "b reaching a at a's new mapping", lab.logs)


def test_with_the_controller_gone_every_established_path_keeps_carrying(lab: Lab) -> None:
    wait_until(lambda: both(lab, "direct"), 40, "a direct path first", lab.logs)
    lab.mesh.kill_controller()
    try:
        for _ in range(5):
            assert ping(lab.a.host, lab.b.addresses[0]) and ping(lab.b.host, lab.a.addresses[1])
            time.sleep(1)
        assert tcp_hello(lab.b.host, lab.a.addresses[0], 7000) is not None
        assert both(lab, "direct")
    finally:
        lab.mesh.start_controller()


def test_junk_at_the_wireguard_port_changes_nothing(lab: Lab) -> None:
    wait_until(lambda: both(lab, "direct"), 40, "a direct path first", lab.logs)
    endpoint = peer(lab.a)["endpoint"]
    # From a's own LAN (the port-restricted NAT keeps strangers on the internet out): STUN-looking requests,
    # answers with no request behind them, random bytes, straight at the port meshd's raw socket watches.
    lab.routers[0].run([sys.executable, "-c", JUNK, lab.a.host.underlay4, "51820"])
    assert ping(lab.a.host, lab.b.addresses[0]) and ping(lab.b.host, lab.a.addresses[0])
    assert both(lab, "direct") and peer(lab.a)["endpoint"] == endpoint
    log = lab.a.log.read_text() + lab.b.log.read_text()
    assert "Traceback" not in log, lab.logs()


def test_a_relay_that_refuses_the_credentials_is_logged_and_breaks_nothing(lab: Lab) -> None:
    """The controller's secret and coturn's disagree: a fresh node's credentials are refused."""
    wait_until(lambda: both(lab, "direct"), 40, "a direct path first", lab.logs)
    good = lab.relay_secret.read_text()
    lab.mesh.kill_controller()
    lab.relay_secret.write_text("not coturn's secret")
    lab.mesh.start_controller()
    lab.mesh.stop(lab.a)
    start(lab.mesh, lab.a)  # credentials from the new secret (a running node keeps its good ones while they last)
    try:
        wait_until(lambda: both(lab, "direct"), 40, "a direct path with refused relay credentials", lab.logs)
        lab.set_nat("symmetric")
        wait_until(lambda: "the credentials were refused" in lab.a.log.read_text(), 30, "a's refusal logged",
                   lab.logs)
        wait_until(lambda: path_is(lab.a, "none"), 20, "no path: neither direct nor relayed", lab.logs)
        lab.set_nat("eim")
        wait_until(lambda: both(lab, "direct"), 40, "direct again once the NAT opens", lab.logs)
        assert ping(lab.a.host, lab.b.addresses[0]) and tcp_hello(lab.b.host, lab.a.addresses[0], 7000) is not None
        assert lab.a.proc is not None and lab.a.proc.poll() is None
        assert "Traceback" not in lab.a.log.read_text(), lab.logs()
    finally:
        lab.set_nat("eim")
        lab.mesh.kill_controller()
        lab.relay_secret.write_text(good)
        lab.mesh.start_controller()
