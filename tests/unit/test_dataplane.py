"""The incremental data plane ends where a fresh start would: the same
firewall filter and the same WireGuard peers, whatever the order of events."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.addressing import MeshPrefixes
from meshcore.policy import AgentIdentity, Authorized, Identities, NodeFilter, compile_node_filter, load_policy
from meshcore.scopes import parse_scopes
from meshcore.wire.stream import PeerNode
from meshd.kernel.netconf import FakeNetConf
from meshd.mesh.dataplane import DataPlane, node_identity
from meshd.wg import FakeWireGuard, generate_private_key

PREFIXES = MeshPrefixes(ipaddress.IPv4Network("100.64.0.0/10"), ipaddress.IPv6Network("fd00:1::/48"))
POLICY = load_policy("""\
services:
  db: {nodes: [tag:db], ports: [5432]}
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: [db]
  - from: {tag: ops}
    to: ["tag:db"]
    protocol: [tcp, icmp]
  - from: {principal: nikita@acme.com, authorized: grant}
    to: ["tag:db:5433"]
  - from: {authorized: delegation, scope: "web:*"}
    to: ["tag:db:8080"]
""", "p.yaml")
TAGS = [("db",), ("ops",), ("web",), ()]


class RecordingFirewall:
    def __init__(self) -> None:
        self.installed: NodeFilter | None = None
        self.compiles = 0

    def apply(self, nf: NodeFilter) -> str:
        self.installed = nf
        return "applied"


def key(i: int, generation: int = 0) -> str:
    return base64.b64encode(bytes([i, generation]) + b"\x01" * 30).decode()


def peer(i: int, tags: tuple[str, ...], generation: int = 0, port: int = 51820) -> PeerNode:
    block = PREFIXES.block(i)
    return PeerNode(name=f"n{i}", wireguard_public_key=key(i, generation), addresses=(str(block.node_v4),
                    str(block.node_v6)), blocks=(str(block.v4), str(block.v6)),
                    endpoints=(f"198.51.100.{i + 10}:{port}",), tags=tags)


def agent(i: int, node: int, scopes: tuple[str, ...], authorized: Authorized = "delegation") -> AgentIdentity:
    v4, v6 = PREFIXES.block(node).agent_address(i)
    return AgentIdentity(id=f"a{i}-{node}", name="x", principal="nikita@acme.com", scopes=parse_scopes(scopes),
                         node=f"n{node}", ipv4=str(v4), ipv6=str(v6), authorized=authorized)


def plane() -> tuple[DataPlane, FakeWireGuard, RecordingFirewall]:
    device, firewall, netconf = FakeWireGuard("wg0"), RecordingFirewall(), FakeNetConf()
    netconf.add_link("wg0")
    self_peer = peer(0, ("db",))
    p = DataPlane("n0", self_peer.addresses, generate_private_key(), 51820, "wg0", device, netconf, firewall)  # type: ignore[arg-type]
    return p, device, firewall


event = st.one_of(
    st.tuples(st.just("node"), st.integers(1, 6), st.sampled_from(TAGS), st.integers(0, 1), st.integers(1, 3)),
    st.tuples(st.just("gone"), st.integers(1, 6)),
    st.tuples(st.just("agent"), st.integers(0, 3), st.integers(1, 6), st.sampled_from([("db:read",), ("web:*",)]),
              st.sampled_from(["grant", "delegation"])),  # the same id re-born otherwise authorized moves sets
    st.tuples(st.just("agent-gone"), st.integers(0, 3), st.integers(1, 6)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(event, max_size=25))
def test_incremental_updates_equal_a_fresh_compile(events: list[Any]) -> None:
    dp, device, firewall = plane()
    nodes: dict[str, PeerNode] = {"n0": peer(0, ("db",))}
    agents: dict[str, AgentIdentity] = {}
    dp.apply(dp.take(POLICY, nodes, agents, {}, (str(PREFIXES.v4), str(PREFIXES.v6))))
    for ev in events:
        if ev[0] == "node":
            _, i, tags, generation, port = ev
            nodes[f"n{i}"] = peer(i, tags, generation, 51820 + port)
            dp.nodes_changed([f"n{i}"])
        elif ev[0] == "gone":
            nodes.pop(f"n{ev[1]}", None)
            gone = [a for a, ag in agents.items() if ag.node == f"n{ev[1]}"]
            for a in gone:
                agents.pop(a)
            dp.nodes_changed([f"n{ev[1]}"])
            dp.agents_changed(gone)
        elif ev[0] == "agent" and f"n{ev[2]}" in nodes:
            born = agent(ev[1], ev[2], ev[3], ev[4])
            agents[born.id] = born
            dp.agents_changed([born.id])
        elif ev[0] == "agent-gone":
            agents.pop(f"a{ev[1]}-{ev[2]}", None)
            dp.agents_changed([f"a{ev[1]}-{ev[2]}"])
        dp.apply(dp.take(POLICY, nodes, agents, {}, ()))
    fresh_ids = Identities.build([node_identity(p) for p in nodes.values()], agents.values())
    fresh = compile_node_filter(POLICY, fresh_ids, "n0")
    assert firewall.installed is not None
    assert firewall.installed.rules_hash == fresh.rules_hash
    assert dict(firewall.installed.sets) == dict(fresh.sets)
    peers = {p.public_key: p for p in device.state().peers}
    assert set(peers) == {p.wireguard_public_key for n, p in nodes.items() if n != "n0"}
    for name, p in nodes.items():
        if name != "n0":
            assert peers[p.wireguard_public_key].endpoint == p.endpoints[0]


def test_an_endpoint_move_is_one_wireguard_operation_and_no_compile() -> None:
    dp, device, firewall = plane()
    nodes = {f"n{i}": peer(i, ("ops",)) for i in range(50)}
    dp.apply(dp.take(POLICY, nodes, {}, {}, ()))
    before = firewall.installed
    nodes["n7"] = peer(7, ("ops",), port=40000)
    dp.nodes_changed(["n7"])
    dp.apply(dp.take(POLICY, nodes, {}, {}, ()))
    assert len(device.last_ops) == 1 and firewall.installed is before


def test_a_new_policy_recompiles_and_a_new_agent_only_adds_elements() -> None:
    dp, _device, firewall = plane()
    nodes = {"n0": peer(0, ("db",)), "n1": peer(1, ("web",))}
    dp.apply(dp.take(POLICY, nodes, {}, {}, ()))
    rules = firewall.installed.rules_hash if firewall.installed else None
    a = agent(0, 1, ("db:read",))
    dp.agents_changed([a.id])
    dp.apply(dp.take(POLICY, nodes, {a.id: a}, {}, ()))
    assert firewall.installed is not None and firewall.installed.rules_hash == rules
    assert any(a.ipv4 in s.v4 for s in firewall.installed.sets.values())
    other = load_policy("acls: []\n", "p2.yaml")
    dp.apply(dp.take(other, nodes, {a.id: a}, {}, ()))
    assert firewall.installed.rules == ()


def test_the_filter_admits_to_this_nodes_own_addresses_even_when_a_cached_map_names_older_ones() -> None:
    dp, _device, firewall = plane()
    stale = peer(5, ("db",)).model_copy(update={"name": "n0"})  # the map cached before this node enrolled again
    dp.apply(dp.take(POLICY, {"n0": stale, "n1": peer(1, ("ops",))}, {}, {}, ()))
    assert firewall.installed is not None and firewall.installed.addresses == peer(0, ("db",)).addresses


def test_serving_a_port_recompiles_the_filter_for_rules_narrowed_to_requests() -> None:
    narrowed = load_policy("acls:\n  - from: {tag: ops}\n    to: ['tag:db:8080']\n    http: [{methods: [GET]}]\n",
                           "p.yaml")
    dp, _device, firewall = plane()
    nodes = {"n0": peer(0, ("db",)), "n1": peer(1, ("ops",))}
    dp.apply(dp.take(narrowed, nodes, {}, {}, ()))
    assert firewall.installed is not None and firewall.installed.rules == ()
    dp.served = frozenset({8080})
    dp.apply(dp.take(narrowed, nodes, {}, {}, ()))
    installed = firewall.installed
    assert installed is not None and [str(port) for rule in installed.rules for port in rule.ports] == ["8080"]
