"""meshd.routes.routing against in-memory drivers: which tunnels exist, what the kernel is told, failover."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshcore.policy import AgentIdentity, Identities, NodeIdentity, load_policy
from meshcore.scopes import parse_scope
from meshcore.wire.stream import PeerNode, RouteOffer
from meshd.kernel.netconf import FakeNetConf
from meshd.routes.firewall import RouteFirewall
from meshd.routes.plan import BYPASS_MARK, PRIO_AGENT
from meshd.routes.routing import LINGER, RETRY_EVERY, STALE_AFTER, Routing, advertised, side_ifname
from meshd.routes.tables import FakePolicyRouting
from meshd.wg import generate_private_key, public_key_of
from meshd.wg.fake import FakeWireGuard
from meshd.wg.uapi import key_to_hex

POLICY = load_policy("""\
routes:
  - from: {principal: li@acme.com}
    to: 0.0.0.0/0
    via: [node:exit-a, node:exit-b]
  - from: {scope: "billing:*"}
    to: 10.20.0.0/16
    via: node:gw
""")
MARK_MASK = 0xFFF00000
KEYS = {name: generate_private_key() for name in ("agents", "exit-a", "exit-b", "gw")}
BLOCKS = {"agents": 0, "exit-a": 1, "exit-b": 2, "gw": 3}
OFFERS = {"exit-a": ("0.0.0.0/0", "::/0"), "exit-b": ("0.0.0.0/0", "::/0"), "gw": ("10.20.0.0/16",)}


def _peer(name: str) -> PeerNode:
    i = BLOCKS[name]
    routes = OFFERS.get(name, ())
    return PeerNode(name=name, wireguard_public_key=public_key_of(generate_private_key()),
                    addresses=(f"100.64.0.{64 * i + 1}", f"fd00:0:0:{i}::1"),
                    blocks=(f"100.64.0.{64 * i}/26", f"fd00:0:0:{i}::/64"),
                    endpoints=(f"198.51.100.{10 + i}:51820",), tags=("t",),
                    routing=RouteOffer(routes=routes, route_key=public_key_of(KEYS[name]),
                                       gateway_port=51821 if routes else None))


NODES = {name: _peer(name) for name in BLOCKS}


def _agent(agent_id: str, n: int, principal: str, scope: str) -> AgentIdentity:
    return AgentIdentity(id=agent_id, name=agent_id, principal=principal, scopes=(parse_scope(scope),),
                         node="agents", ipv4=f"100.64.0.{n}", ipv6=f"fd00::{n}")


def _ids(*agents: AgentIdentity) -> Identities:
    nodes = [NodeIdentity(name=p.name, tags=frozenset(p.tags), ipv4=p.addresses[0], ipv6=p.addresses[1])
             for p in NODES.values()]
    return Identities.build(nodes, agents)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeNft:
    def __init__(self) -> None:
        self.scripts: list[str] = []

    def __call__(self, script: str) -> str:
        self.scripts.append(script)
        return ""


class Rig:
    """A Routing for node ``name`` on fakes, and what they were told."""

    def __init__(self, name: str = "agents", marks: Mapping[str, int] | None = None) -> None:
        self.clock = Clock()
        self.netconf = FakeNetConf()
        self.devices: dict[str, FakeWireGuard] = {}
        self.tables = FakePolicyRouting()
        self.nft = FakeNft()
        self.sysctl: dict[str, str] = {}
        self.route_ifaces: list[frozenset[str]] = []
        self.restart: dict[str, Any] = {}
        peer = NODES[name]
        self.routing = Routing(
            name, side_ifname("wg0", ""), peer.addresses, KEYS[name],  # type: ignore[arg-type]
            RouteOffer(routes=OFFERS.get(name, ()), route_key=public_key_of(KEYS[name]),
                       gateway_port=51821 if name in OFFERS else None),
            ("100.64.0.0/10", "fd00::/48"), mark_mask=MARK_MASK, agent_marks=lambda: dict(marks or {}),
            set_route_interfaces=lambda names: self.route_ifaces.append(frozenset(names)),
            tables=self.tables, firewall=RouteFirewall(self.nft), netconf=self.netconf,
            sysctl=self.sysctl.__setitem__, opener=self._open, clock=self.clock,
            mesh_endpoints=lambda: {NODES["exit-a"].wireguard_public_key: "198.51.100.99:51820"})

    def _open(self, ifname: str, **kwargs: Any) -> FakeWireGuard:
        self.restart[ifname] = kwargs["on_restart"]
        self.netconf.add_link(ifname)
        self.devices[ifname] = FakeWireGuard(ifname)
        return self.devices[ifname]

    def tunnel_to(self, gateway: str) -> FakeWireGuard:
        status: Any = self.routing.status()
        ifname = next(t["interface"] for t in status["tunnels"] if t["gateway"] == gateway)
        return self.devices[ifname]

    def hear(self, gateway: str) -> None:
        """A keepalive arrives from ``gateway``."""
        device = self.tunnel_to(gateway)
        key = key_to_hex(NODES[gateway].routing.route_key)  # type: ignore[arg-type]
        device.server.peers[key].rx += 32

    def via(self) -> dict[str, str | None]:
        status: Any = self.routing.status()
        return {f"{r['identity']} {r['prefix']}": r["via"] for r in status["routes"]}


SRE = _agent("sre", 2, "li@acme.com", "ops:run")
BILL = _agent("bill", 3, "ann@acme.com", "billing:read")


def test_a_node_without_routes_touches_nothing() -> None:
    rig = Rig()
    rig.routing.apply(POLICY, _ids(), NODES)
    assert rig.devices == {} and rig.tables.applied == [] and rig.nft.scripts == [] and rig.sysctl == {}


def test_a_sender_gets_one_tunnel_per_gateway_and_one_table_per_set_of_routes() -> None:
    rig = Rig(marks={"sre": 0x00200000, "bill": 0x00300000})
    rig.routing.apply(POLICY, _ids(SRE, BILL), NODES)
    assert sorted(d.ifname for d in rig.devices.values()) == ["wg0r1", "wg0r2", "wg0r3"]
    exit_a = rig.tunnel_to("exit-a").state()
    assert exit_a.fwmark == BYPASS_MARK and exit_a.public_key == public_key_of(KEYS["agents"])
    (peer,) = exit_a.peers
    assert peer.public_key == NODES["exit-a"].routing.route_key
    assert peer.endpoint == "198.51.100.99:51821"  # the live mesh endpoint's address, the gateway port
    assert set(peer.allowed_ips) == {"0.0.0.0/0", "::/0"} and peer.persistent_keepalive == 1
    assert rig.tunnel_to("gw").state().peers[0].endpoint == "198.51.100.13:51821"  # no live one: a candidate
    agent_rules = {(r.fwmark, r.table) for r in rig.tables.plan.rules if r.priority == PRIO_AGENT}
    assert {m for m, _ in agent_rules} == {0x00200000, 0x00300000} and len({t for _, t in agent_rules}) == 2
    assert rig.route_ifaces[-1] == {"wg0r1", "wg0r2", "wg0r3"}
    assert rig.via() == {"agent:sre 0.0.0.0/0": "exit-a", "agent:bill 10.20.0.0/16": "gw"}


def test_an_agent_not_born_here_yet_gets_no_rule() -> None:
    rig = Rig(marks={})
    rig.routing.apply(POLICY, _ids(SRE), NODES)
    assert not [r for r in rig.tables.plan.rules if r.priority == PRIO_AGENT]


def test_a_quiet_gateway_hands_its_identities_to_the_next_and_takes_them_back() -> None:
    rig = Rig(marks={"sre": 0x00200000})
    rig.routing.apply(POLICY, _ids(SRE), NODES)
    for _ in range(3):
        rig.clock.now += 1
        rig.hear("exit-a")
        rig.hear("exit-b")
        assert rig.routing.poll() is False
    assert rig.via() == {"agent:sre 0.0.0.0/0": "exit-a"}
    rig.clock.now += STALE_AFTER - 0.5
    rig.hear("exit-b")
    assert rig.routing.poll() is False  # quiet, but not for long enough yet
    rig.clock.now += 1
    rig.hear("exit-b")
    assert rig.routing.poll() is True
    assert rig.via() == {"agent:sre 0.0.0.0/0": "exit-b"}
    routes = {(r.prefix, r.ifname) for r in rig.tables.plan.routes if r.kind == "unicast" and r.table > 5200}
    assert routes == {("0.0.0.0/0", "wg0r2")}
    rig.clock.now += 1
    rig.hear("exit-a")
    assert rig.routing.poll() is True
    assert rig.via() == {"agent:sre 0.0.0.0/0": "exit-a"}


def test_a_down_gateway_is_retried_with_a_fresh_peer() -> None:
    rig = Rig(marks={"sre": 0x00200000})
    rig.routing.apply(POLICY, _ids(SRE), NODES)
    device = rig.tunnel_to("exit-a")
    rig.clock.now += STALE_AFTER + 1
    rig.routing.poll()
    key = NODES["exit-a"].routing.route_key
    assert key is not None
    assert device.server.touched[key] >= 3  # added, then removed and added again: a new session
    touched = device.server.touched[key]
    rig.clock.now += 1
    rig.routing.poll()
    assert device.server.touched[key] == touched  # not again before RETRY_EVERY
    rig.clock.now += RETRY_EVERY
    rig.routing.poll()
    assert device.server.touched[key] > touched


def test_a_tunnel_nobody_uses_lingers_then_goes() -> None:
    rig = Rig(marks={"bill": 0x00300000})
    rig.routing.apply(POLICY, _ids(BILL), NODES)
    gw = rig.tunnel_to("gw")
    rig.routing.apply(POLICY, _ids(), NODES)  # the agent ended
    assert not gw.closed and not [r for r in rig.tables.plan.rules if r.priority == PRIO_AGENT]
    rig.clock.now += LINGER + 1
    assert rig.routing.poll() is True
    assert gw.closed and rig.routing.status()["tunnels"] == []


def test_a_gateway_peers_with_every_node_and_grants_only_what_routes_send_through_it() -> None:
    rig = Rig("exit-a")
    rig.routing.apply(POLICY, _ids(SRE, BILL), NODES)
    assert rig.sysctl["net.ipv4.ip_forward"] == "1"
    gateway = rig.devices["wg0gw"].state()
    assert gateway.listen_port == 51821 and gateway.fwmark == BYPASS_MARK
    assert {p.public_key for p in gateway.peers} == {NODES[n].routing.route_key for n in ("agents", "exit-b", "gw")}
    assert "100.64.0.2 . 0.0.0.0/0" in rig.nft.scripts[-1]  # the SRE agent, through exit-a first
    assert "100.64.0.3 ." not in rig.nft.scripts[-1]  # billing has no route via exit-a


def test_advertising_an_exit_node_offers_both_families() -> None:
    assert advertised(["10.20.0.0/16", " "], True) == ("0.0.0.0/0", "10.20.0.0/16", "::/0")
    assert advertised([], False) == ()


def test_a_fresh_peer_counting_from_zero_is_not_taken_for_a_sign_of_life() -> None:
    rig = Rig(marks={"sre": 0x00200000})
    rig.routing.apply(POLICY, _ids(SRE), NODES)
    rig.hear("exit-a")
    rig.hear("exit-b")
    rig.routing.poll()
    for _ in range(int(2 * (STALE_AFTER + RETRY_EVERY))):  # exit-a silent, retried more than once
        rig.clock.now += 0.5
        rig.hear("exit-b")
        rig.routing.poll()
        if rig.clock.now - 1000.0 > STALE_AFTER + 0.5:
            assert rig.via() == {"agent:sre 0.0.0.0/0": "exit-b"}


def test_a_node_joining_is_one_peer_operation_on_the_gateway_interface() -> None:
    rig = Rig("exit-a")
    rig.routing.apply(POLICY, _ids(), NODES)
    device = rig.devices["wg0gw"]
    joined = PeerNode(name="new", wireguard_public_key=public_key_of(generate_private_key()),
                      addresses=("100.64.1.1", "fd00:0:0:9::1"), blocks=("100.64.1.0/26", "fd00:0:0:9::/64"),
                      routing=RouteOffer(route_key=public_key_of(generate_private_key())))
    requests = len(device.server.requests)
    rig.routing.apply(POLICY, _ids(), {**NODES, "new": joined})
    sent = device.server.requests[requests:]
    assert len(sent) == 1 and sent[0].startswith("set=1") and sent[0].count("public_key=") == 1  # no get=1
    assert joined.routing.route_key in {p.public_key for p in device.state().peers}
    rig.routing.apply(POLICY, _ids(), {**NODES, "new": joined})
    assert len(device.server.requests) == requests + 2  # unchanged: nothing sent (the +1 is the state() above)


def test_a_restarted_wireguard_go_gets_its_link_and_routes_back_at_the_next_poll() -> None:
    rig = Rig(marks={"sre": 0x00200000})
    rig.routing.apply(POLICY, _ids(SRE), NODES)
    rig.hear("exit-a")
    rig.hear("exit-b")
    rig.routing.poll()
    plans = len(rig.tables.applied)
    rig.netconf.links["wg0r1"].up = False  # what a re-created interface looks like
    rig.restart["wg0r1"]()
    assert rig.routing.poll() is True
    assert rig.netconf.links["wg0r1"].up and len(rig.tables.applied) == plans + 1
    assert rig.routing.poll() is False  # handled once


def test_status_answers_while_an_apply_holds_the_routing_lock() -> None:
    rig = Rig(marks={"sre": 0x00200000})
    rig.routing.apply(POLICY, _ids(SRE), NODES)
    with ThreadPoolExecutor(1) as pool, rig.routing._lock:  # an apply in progress, e.g. at 10,000 nodes
        status: Any = pool.submit(rig.routing.status).result(timeout=5)
    assert status["routes"][0]["via"] == "exit-a" and len(status["tunnels"]) == 2
