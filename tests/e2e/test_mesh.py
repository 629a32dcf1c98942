"""The data plane's promises, end to end: real controller, real meshd, real
wireguard-go, one network namespace per host."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.mesh import Mesh, ping, tcp_hello, tcp_server, wait_for
from tests.e2e.netns import Network, processes_mentioning


@pytest.fixture
def mesh(network: Callable[..., Network], tmp_path: Path) -> Iterator[Mesh]:
    net = network(5)
    m = Mesh(net, tmp_path, net["h1"])
    m.init()
    yield m


def start_nodes(mesh: Mesh, hosts: list[str]) -> None:
    for name in hosts:
        mesh.start(mesh.enroll(mesh.net[name]))
    mesh.wait_converged()


def test_three_nodes_reach_each_other_over_ipv4_and_ipv6(mesh: Mesh) -> None:
    start_nodes(mesh, ["h2", "h3", "h4"])
    nodes = list(mesh.nodes.values())
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                v4, v6 = dst.addresses
                assert ping(src.host, v4), f"{src.name} -> {dst.name} {v4}"
                assert ping(src.host, v6), f"{src.name} -> {dst.name} {v6}"
    h2, h3 = mesh.nodes["h2"], mesh.nodes["h3"]
    for address in h3.addresses:
        tcp_server(h3.host, address, 7000)
        # the far end sees the sender's own overlay address: identity travels with the packet
        assert tcp_hello(h2.host, address, 7000) == f"hello {h2.addresses[0 if '.' in address else 1]}"


def test_tunnels_outlive_the_controller_and_nodes_reconnect(mesh: Mesh) -> None:
    start_nodes(mesh, ["h2", "h3"])
    h2, h3 = mesh.nodes["h2"], mesh.nodes["h3"]
    mesh.kill_controller()
    wait_for("nodes to notice", lambda: not h2.status()["controller"]["connected"], 60, mesh)
    assert ping(h2.host, h3.addresses[0]) and ping(h3.host, h2.addresses[1])
    mesh.start_controller()
    wait_for("reconnect", lambda: h2.status()["controller"]["connected"] and h3.status()["controller"]["connected"],
             60, mesh)
    mesh.start(mesh.enroll(mesh.net["h4"]))  # a change made after the restart reaches everyone
    mesh.wait_converged()
    assert ping(mesh.nodes["h4"].host, h2.addresses[0])


def test_a_removed_node_is_dropped_and_a_reenrolled_one_followed(mesh: Mesh) -> None:
    start_nodes(mesh, ["h2", "h3", "h4"])
    h2, h4 = mesh.nodes["h2"], mesh.nodes["h4"]
    mesh.admin("nodes", "remove", "h4")
    took = wait_for("peers to drop h4", lambda: "h4" not in h2.peer_names() and "h4" not in
                    mesh.nodes["h3"].peer_names(), 10, mesh)
    print(f"peers dropped a removed node after {took:.2f} s (including the meshctl call's own wait)")
    assert not ping(h4.host, h2.addresses[0])
    mesh.stop(h4)
    mesh.enroll(h4.host, "h4", force=True)  # new keys, same name
    mesh.start(h4)
    mesh.wait_converged()
    assert ping(h2.host, h4.addresses[0]) and ping(h4.host, h2.addresses[1])


def test_meshd_restarts_into_the_same_state_without_leftovers(mesh: Mesh) -> None:
    start_nodes(mesh, ["h2", "h3"])
    h2, h3 = mesh.nodes["h2"], mesh.nodes["h3"]
    ifname = h2.host.wg_ifname
    assert mesh.stop(h2) == 0
    assert ifname not in h2.host.run(["ip", "-o", "link"]).stdout
    assert processes_mentioning([ifname]) == []
    mesh.start(h2)
    mesh.wait_converged()
    links = h2.host.run(["ip", "-o", "link"]).stdout
    assert links.count(f"{ifname}:") == 1
    assert len([p for p in processes_mentioning([ifname]) if "wireguard-go" in p]) == 1
    assert ping(h2.host, h3.addresses[0])
    # a crash (SIGKILL) leaves an interface behind; the next start takes it over
    mesh.stop(h2, signal.SIGKILL)
    mesh.start(h2)
    mesh.wait_converged()
    assert h2.host.run(["ip", "-o", "link"]).stdout.count(f"{ifname}:") == 1
    assert len([p for p in processes_mentioning([ifname]) if "wireguard-go" in p]) == 1
    assert ping(h2.host, h3.addresses[1])


def test_meshd_serves_metrics_about_its_peers_and_policy(mesh: Mesh) -> None:
    h2 = mesh.enroll(mesh.net["h2"])
    mesh.start(h2, "--metrics", "127.0.0.1:9465")  # loopback of h2's own namespace
    mesh.start(mesh.enroll(mesh.net["h3"]))
    mesh.wait_converged()
    scrape = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9465/metrics').read().decode())"
    text = h2.host.run([sys.executable, "-c", scrape]).stdout
    values = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["idmesh_peers"] == 1 and values["idmesh_policy_version"] == 1
    assert 0 <= values['idmesh_handshake_age_seconds{peer="h3"}'] < 120
    assert values["idmesh_controller_connected"] == 1
    assert "idmesh_denied_packets" in values and "idmesh_spoofed_packets" in values
    assert values['idmesh_denied_flows{class="agent"}'] == 0
