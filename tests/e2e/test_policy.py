"""Identity-based access, enforced with nftables on each node (SPEC §4, §5)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.mesh import Mesh, Node, ping, tcp_hello, tcp_server, wait_until
from tests.e2e.netns import Network

SEED = (Path(__file__).parents[2] / "examples" / "policy.yaml").read_text()
CAST = [  # host, node name, token flags
    ("h2", "laptop", ("--owner", "nikita@acme.com")),
    ("h3", "db", ("--tag", "db")),
    ("h4", "ci", ("--tag", "ci")),
    ("h5", "monitoring", ("--tag", "monitoring")),
    ("h6", "li-laptop", ("--owner", "li@acme.com")),
]


@pytest.fixture
def cast(network: Callable[..., Network], tmp_path: Path) -> Iterator[tuple[Mesh, dict[str, Node]]]:
    net = network(6)
    mesh = Mesh(net, tmp_path, net["h1"])
    mesh.init(policy=None)
    nodes = {}
    for host, name, flags in CAST:
        nodes[name] = mesh.enroll(net[host], name, *flags)
        mesh.start(nodes[name])
    mesh.wait_converged()
    db, mon = nodes["db"], nodes["monitoring"]
    for port in (5432, 5433):
        tcp_server(db.host, "::", port)  # dual stack
    tcp_server(mon.host, "::", 9100)
    yield mesh, nodes


def reaches(src: Node, dst: Node, port: int) -> bool:
    return tcp_hello(src.host, dst.addresses[0], port, timeout=2) is not None


def test_default_deny_lets_nothing_cross_but_tunnels_are_up(cast: tuple[Mesh, dict[str, Node]]) -> None:
    _mesh, n = cast
    assert all(p["latest_handshake"] for p in n["laptop"].status()["peers"])  # WireGuard itself works
    assert not reaches(n["laptop"], n["db"], 5432)
    assert not ping(n["laptop"].host, n["db"].addresses[0])
    assert not ping(n["db"].host, n["laptop"].addresses[1])
    status = n["db"].status()
    assert status["policy"]["version"] == 0 and status["policy"]["rules"] == 0
    ruleset = n["db"].host.run(["nft", "list", "table", "inet", "idmesh"]).stdout
    assert 'counter name "denied" drop comment "default deny"' in ruleset


def test_the_seed_example_at_node_level(cast: tuple[Mesh, dict[str, Node]]) -> None:
    mesh, n = cast
    mesh.apply_policy(SEED)
    wait_until(lambda: all(node.status()["policy"]["version"] == 1 for node in n.values()), 10, "policy v1",
               mesh.logs)
    assert reaches(n["laptop"], n["db"], 5432)         # nikita, direct: db
    assert reaches(n["laptop"], n["db"], 5433)         # nikita, direct: db-admin
    assert not reaches(n["ci"], n["db"], 5432)         # tag:ci: neither
    assert not reaches(n["ci"], n["db"], 5433)
    assert reaches(n["li-laptop"], n["monitoring"], 9100)  # group:sre -> tag:monitoring:9100
    assert not reaches(n["ci"], n["monitoring"], 9100)
    assert not reaches(n["li-laptop"], n["db"], 5432)  # sre grants monitoring only
    assert not ping(n["laptop"].host, n["db"].addresses[0])  # no rule allows ICMP
    # replies to an allowed flow come back even though db may not open connections to the laptop
    assert tcp_hello(n["laptop"].host, n["db"].addresses[1], 5432, timeout=2) is not None


def test_a_policy_change_flips_a_live_outcome_and_a_broken_one_changes_nothing(
        cast: tuple[Mesh, dict[str, Node]]) -> None:
    mesh, n = cast
    mesh.apply_policy(SEED)
    wait_until(lambda: n["db"].status()["policy"]["version"] == 1, 10, "policy v1", mesh.logs)
    assert not reaches(n["ci"], n["db"], 5432)
    opened = SEED.replace("acls:\n", "acls:\n  - from: {tag: ci}\n    to: [db]\n", 1).replace(
        "  - from: {tag: ci}\n    to: db:5432\n    expect: deny\n", "")
    t0 = time.monotonic()
    mesh.apply_policy(opened)
    wait_until(lambda: reaches(n["ci"], n["db"], 5432), 10, "ci reaches db after the change", mesh.logs)
    print(f"policy change took effect for a live test after {time.monotonic() - t0:.2f} s")
    broken = opened.replace("to: [db]", "to: [dbx]", 1)
    refused = mesh.apply_policy(broken, check=False)
    assert refused.returncode == 2
    assert "policy.yaml:" in refused.stderr and "unknown service 'dbx'" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert n["db"].status()["policy"]["version"] == 2
    assert reaches(n["ci"], n["db"], 5432)
    history = mesh.admin("policy", "history", "--json").stdout
    assert history.count('"version"') == 2


def test_a_node_cannot_send_with_another_nodes_address(cast: tuple[Mesh, dict[str, Node]]) -> None:
    mesh, n = cast
    mesh.apply_policy(SEED)
    wait_until(lambda: n["db"].status()["policy"]["version"] == 1, 10, "policy v1", mesh.logs)
    laptop_v4 = n["laptop"].addresses[0]
    ci = n["ci"]
    # root on ci claims the laptop's address and connects from it: WireGuard on db
    # refuses a packet whose source is outside the sending peer's block.
    ci.host.run(["ip", "addr", "add", f"{laptop_v4}/32", "dev", ci.host.wg_ifname])
    assert tcp_hello(ci.host, n["db"].addresses[0], 5432, timeout=2, source=laptop_v4) is None
    assert reaches(n["laptop"], n["db"], 5432)  # the real laptop still gets in
