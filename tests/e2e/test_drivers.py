"""The data-plane drivers for real: wireguard-go + netconf in network namespaces.

Each host runs ``wgnode.py`` (WireGuardGo + IPRouteNetConf, as meshd will)
and the tests look at the result from outside: ping and TCP over the
overlay in both families, peer changes that leave other sessions alone,
restarts that leave one interface and one process. All traffic stays
between namespaces this test created.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshd.wg import DeviceConfig, PeerConfig, generate_private_key, public_key_of
from tests.e2e.netns import Host, Network, processes_mentioning, wait_until
from tests.e2e.wgnode import WgNode

pytestmark = pytest.mark.e2e

PORT = 51820
MESH4, MESH6 = "100.64.0.0/10", "fd00:1::/48"

TCP_SERVER = """
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen()
print("listening", flush=True)
conn, peer = srv.accept()
print(peer[0], flush=True)
with conn, conn.makefile("rb") as lines:
    for line in lines:
        conn.sendall(line)
"""

TCP_CLIENT = """
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
replies = conn.makefile("r")
for line in sys.stdin:
    conn.sendall(line.encode())
    print(replies.readline(), end="", flush=True)
"""


@dataclass
class Member:
    """A host with its node program, keys and overlay block."""

    host: Host
    node: WgNode
    private_key: str

    @property
    def public_key(self) -> str:
        return public_key_of(self.private_key)

    @property
    def v4(self) -> str:
        return f"100.64.{self.host.index}.1"

    @property
    def v6(self) -> str:
        return f"fd00:1:0:{self.host.index}::1"

    def as_peer(self, via_ipv6: bool = False) -> PeerConfig:
        endpoint = f"[{self.host.underlay6}]:{PORT}" if via_ipv6 else f"{self.host.underlay4}:{PORT}"
        return PeerConfig(self.public_key, (f"100.64.{self.host.index}.0/24", f"fd00:1:0:{self.host.index}::/64"),
                          endpoint)

    def connect(self, *peers: PeerConfig) -> dict[str, Any]:
        return self.node.apply(DeviceConfig(self.private_key, PORT, peers), [f"{self.v4}/32", f"{self.v6}/128"],
                               [MESH4, MESH6])

    def peer_state(self, other: Member) -> dict[str, Any] | None:
        peers = self.node.state()["state"]["peers"]
        return next((p for p in peers if p["public_key"] == other.public_key), None)


@pytest.fixture
def members(network: Callable[..., Network], tmp_path: Path) -> Callable[[int], list[Member]]:
    def make(count: int) -> list[Member]:
        net = network(count)
        return [Member(h, WgNode(h, tmp_path / f"{h.name}.log"), generate_private_key()) for h in net.hosts]
    return make


def ping(host: Host, address: str, count: int = 1) -> bool:
    return host.run(["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", address], check=False).returncode == 0


def tcp_round_trip(client: Member, server: Member, address: str, port: int = 7000) -> str:
    """Echo a line over TCP from ``client`` to ``server``'s ``address``; return the source address the server saw."""
    srv = server.host.popen([sys.executable, "-c", TCP_SERVER, address, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert srv.stdout is not None
    assert _read_line(srv.stdout) == "listening\n"
    done = client.host.run([sys.executable, "-c", TCP_CLIENT, address, str(port)], input="hello over the mesh\n")
    assert done.stdout == "hello over the mesh\n"
    seen = _read_line(srv.stdout).strip()
    srv.wait(10)
    return seen


def _read_line(stream: Any, timeout: float = 10.0) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        assert sel.select(timeout), f"no output within {timeout:g} s"
    line: str = stream.readline()
    return line


def wireguard_go_pids(host: Host) -> list[int]:
    return [p for p in host.pids() if Path(f"/proc/{p}/comm").read_text().strip() == "wireguard-go"]


def interfaces_named(host: Host, ifname: str) -> int:
    out = host.run(["ip", "-o", "link", "show"]).stdout
    return sum(1 for line in out.splitlines() if line.split(": ")[1].split("@")[0] == ifname)


def test_tunnel_carries_ping_and_tcp_in_both_families(members: Callable[[int], list[Member]]) -> None:
    started = time.monotonic()
    a, b = members(2)
    a.connect(b.as_peer())
    b.connect(a.as_peer())
    configured = time.monotonic()
    wait_until(lambda: ping(a.host, b.v4), 10, "the first IPv4 ping over the tunnel")
    first_packet = time.monotonic()
    print(f"\ntwo nodes configured in {configured - started:.3f} s, first ping after {first_packet - started:.3f} s")

    assert ping(a.host, b.v4, count=3) and ping(b.host, a.v4, count=3)
    assert ping(a.host, b.v6, count=3) and ping(b.host, a.v6, count=3)
    assert tcp_round_trip(a, b, b.v4) == a.v4
    assert tcp_round_trip(b, a, a.v6, port=7001) == b.v6

    seen = a.peer_state(b)
    assert seen is not None and seen["latest_handshake"] is not None and seen["rx_bytes"] > 0
    assert seen["endpoint"] == f"{b.host.underlay4}:{PORT}"
    link = a.node.state()["link"]
    assert link["up"] and link["mtu"] == 1420 and sorted(link["routes"]) == [MESH4, MESH6]


def test_changing_one_peer_does_not_disturb_another(members: Callable[[int], list[Member]]) -> None:
    a, b, c = members(3)
    a.connect(b.as_peer(), c.as_peer(via_ipv6=True))  # C over the IPv6 underlay
    b.connect(a.as_peer())
    c.connect(a.as_peer(via_ipv6=True))
    wait_until(lambda: ping(a.host, b.v4) and ping(a.host, c.v6), 10, "A reaching B and C")
    before = a.peer_state(b)
    assert before is not None and before["latest_handshake"] is not None
    wg_pid = a.node.state()["pid"]

    # A TCP session A -> B that stays open across the changes.
    srv = b.host.popen([sys.executable, "-c", TCP_SERVER, b.v4, "7002"], stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and _read_line(srv.stdout) == "listening\n"
    cli = a.host.popen([sys.executable, "-c", TCP_CLIENT, b.v4, "7002"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    assert cli.stdin is not None and cli.stdout is not None

    def echo(text: str) -> str:
        assert cli.stdin is not None
        cli.stdin.write(text + "\n")
        cli.stdin.flush()
        return _read_line(cli.stdout).strip()

    assert echo("one") == "one"

    for step, peers in (("without C", (b.as_peer(),)), ("with C again", (b.as_peer(), c.as_peer(via_ipv6=True)))):
        answer = a.connect(*peers)
        assert answer["link_ops"] == [], f"{step}: addresses and routes were already right"
        after = a.peer_state(b)
        assert after is not None
        assert after["latest_handshake"] == before["latest_handshake"], f"{step}: B's session was reset"
        assert after["rx_bytes"] >= before["rx_bytes"] and after["tx_bytes"] >= before["tx_bytes"], step
        assert echo(step) == step
        assert ping(a.host, b.v4)
        assert a.node.state()["pid"] == wg_pid
        before = a.peer_state(b) or before
        if step == "without C":
            assert a.peer_state(c) is None
            assert not ping(a.host, c.v4)
    wait_until(lambda: ping(a.host, c.v6), 10, "A reaching C again after re-adding it")
    assert a.peer_state(b)["latest_handshake"] == before["latest_handshake"]  # type: ignore[index]
    assert cli.stdin is not None
    cli.stdin.close()
    assert cli.wait(10) == 0 and srv.wait(10) == 0


def test_apply_twice_and_restart_leave_one_interface_and_one_process(
        members: Callable[[int], list[Member]], tmp_path: Path) -> None:
    a, b = members(2)
    b.connect(a.as_peer())
    a.connect(b.as_peer())
    a.connect(b.as_peer())
    assert interfaces_named(a.host, a.node.ifname) == 1 and len(wireguard_go_pids(a.host)) == 1

    # meshd crashes (SIGKILL): its wireguard-go child lives on as a stray and keeps carrying traffic.
    (stray,) = wireguard_go_pids(a.host)
    os.kill(a.node.proc.pid, signal.SIGKILL)
    a.node.proc.wait(5)
    assert wireguard_go_pids(a.host) == [stray]
    wait_until(lambda: ping(a.host, b.v4), 10, "traffic through the orphaned wireguard-go")

    # meshd starts again with the same interface: it replaces the stray, no duplicate.
    a.node = WgNode(a.host, tmp_path / "h1-again.log")
    a.connect(b.as_peer())
    a.connect(b.as_peer())
    pids = wireguard_go_pids(a.host)
    assert len(pids) == 1 and pids != [stray], a.node.logs()
    assert interfaces_named(a.host, a.node.ifname) == 1
    wait_until(lambda: ping(a.host, b.v4) and ping(a.host, b.v6), 10, "traffic after the restart")

    a.node.close()
    assert wireguard_go_pids(a.host) == [] and interfaces_named(a.host, a.node.ifname) == 0
    assert not processes_mentioning([a.node.ifname])


def test_a_crashed_wireguard_go_is_restarted_and_reconfigured(members: Callable[[int], list[Member]]) -> None:
    a, b = members(2)
    a.connect(b.as_peer())
    b.connect(a.as_peer())
    wait_until(lambda: ping(a.host, b.v4), 10, "the tunnel")
    first = a.node.state()["pid"]
    os.kill(first, signal.SIGKILL)  # the interface dies with it: addresses and routes too
    wait_until(lambda: (s := a.node.state())["restarts"] == 1 and s["pid"] != first, 10, "the restart")
    wait_until(lambda: ping(a.host, b.v4) and ping(a.host, b.v6), 10, "traffic after the restart")
    assert len(wireguard_go_pids(a.host)) == 1 and interfaces_named(a.host, a.node.ifname) == 1


NETCONF_PROGRAM = """
import json, sys
from meshd.kernel.netconf import IPRouteNetConf, LinkConfig
config = json.loads(sys.argv[1])
print(json.dumps([str(op) for op in IPRouteNetConf().apply(LinkConfig(**config))]))
"""


def test_netconf_converges_a_real_link(network: Callable[..., Network]) -> None:
    (host,) = network(1).hosts
    host.run(["ip", "tuntap", "add", "tun9", "mode", "tun"])
    host.run(["ip", "route", "add", "10.9.0.0/16", "dev", "tun9", "proto", "static"], check=False)

    def apply(addresses: list[str], routes: list[str], mtu: int = 1420) -> list[str]:
        import json
        config = json.dumps({"ifname": "tun9", "addresses": addresses, "routes": routes, "mtu": mtu})
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        return list(json.loads(host.run([sys.executable, "-c", NETCONF_PROGRAM, config], env=env).stdout))

    first = apply(["100.64.1.1/32", "fd00:1:0:1::1/128"], [MESH4, MESH6, "100.100.0.0/16"])
    assert len(first) == 6
    assert apply(["100.64.1.1/32", "fd00:1:0:1::1/128"], [MESH4, MESH6, "100.100.0.0/16"]) == []
    host.run(["ip", "route", "add", "10.9.0.0/16", "dev", "tun9", "proto", "static"])
    assert apply(["100.64.1.1/32"], [MESH4, MESH6], mtu=1380) == [
        "SetLink(mtu=1380, up=True)", "RemoveRoute(destination='100.100.0.0/16')",
        "RemoveAddress(address='fd00:1:0:1::1/128')"]
    routes = host.run(["ip", "-4", "route", "show", "dev", "tun9"]).stdout
    assert "10.9.0.0/16 proto static" in routes and "100.64.0.0/10 proto 108" in routes
    assert "100.100.0.0/16" not in routes
    assert "mtu 1380" in host.run(["ip", "link", "show", "tun9"]).stdout


def test_the_harness_leaves_nothing_behind(tmp_path: Path) -> None:
    with Network(2) as net:
        a, b = net.hosts
        node = WgNode(a, tmp_path / "a.log")
        node.call("apply", device={"private_key": generate_private_key(), "listen_port": PORT, "peers": []},
                  link={"addresses": ["100.64.1.1/32"], "routes": [MESH4]})
        b.popen(["sleep", "300"])
        os.kill(node.proc.pid, signal.SIGKILL)  # leave a stray wireguard-go inside h1
        names = [net.switch, a.netns, b.netns, a.wg_ifname]
    listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    assert not any(n in listed for n in names[:3])
    assert not processes_mentioning(names)
    assert not (Path("/var/run/wireguard") / f"{a.wg_ifname}.sock").exists()
