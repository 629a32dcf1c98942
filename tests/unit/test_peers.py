"""From the netmap to the mesh interface's peers and link (:mod:`meshd.mesh.peers`): pure."""

from __future__ import annotations

from meshcore.netmap import NodeView
from meshcore.wire.stream import Netmap, PeerNode
from meshd.kernel.netconf import LinkConfig
from meshd.mesh.peers import KEEPALIVE, choose_endpoint, desired_link, desired_peers
from meshd.wg import PeerConfig, generate_private_key, public_key_of

PRIVATE = generate_private_key()
KEYS = {name: public_key_of(generate_private_key()) for name in ("self", "a", "b", "c")}
KEYS["self"] = public_key_of(PRIVATE)
PREFIXES = ("100.64.0.0/10", "fd7a:1:2::/48")


def node(name: str, i: int, endpoints: tuple[str, ...] = ()) -> PeerNode:
    return PeerNode(name=name, wireguard_public_key=KEYS[name],
                    addresses=(f"100.64.0.{64 * i + 1}", f"fd7a:1:2:{i}::1"),
                    blocks=(f"100.64.0.{64 * i}/26", f"fd7a:1:2:{i}::/64"), endpoints=endpoints, tags=("db",))


def view(*nodes: PeerNode) -> NodeView:
    return NodeView(Netmap(version=3, domain="acme.mesh", prefixes=PREFIXES, nodes={n.name: n for n in nodes}))


def test_every_peer_but_self_is_allowed_its_whole_block() -> None:
    v = view(node("self", 0, ("198.51.100.10:51820",)), node("a", 1, ("198.51.100.11:51820",)),
             node("b", 2, ("[2001:db8::12]:51820", "198.51.100.12:51820")))
    by_key = {p.public_key: p for p in desired_peers(v.nodes, "self", {}).values()}
    assert set(by_key) == {KEYS["a"], KEYS["b"]}  # never a peer entry for ourselves
    assert by_key[KEYS["a"]] == PeerConfig(KEYS["a"], ("100.64.0.64/26", "fd7a:1:2:1::/64"), "198.51.100.11:51820",
                                           KEEPALIVE)
    # the first candidate is the controller's best guess
    assert by_key[KEYS["b"]].endpoint == "[2001:db8::12]:51820"
    assert by_key[KEYS["b"]].allowed_ips == ("100.64.0.128/26", "fd7a:1:2:2::/64")


def test_a_peer_found_on_the_lan_is_tried_first() -> None:
    a = node("a", 1, ("203.0.113.7:41641",))
    v = view(node("self", 0), a, node("b", 2, ("198.51.100.12:51820",)))
    by_key = {p.public_key: p for p in desired_peers(v.nodes, "self", {KEYS["a"]: "198.51.100.11:51820"}).values()}
    assert by_key[KEYS["a"]].endpoint == "198.51.100.11:51820"
    assert by_key[KEYS["b"]].endpoint == "198.51.100.12:51820"  # discovery found nothing for b
    assert choose_endpoint(a, {}) == "203.0.113.7:41641"


def test_a_discovery_under_an_unknown_key_adds_no_peer() -> None:
    stranger = public_key_of(generate_private_key())
    peers = desired_peers(view(node("self", 0), node("a", 1)).nodes, "self", {stranger: "198.51.100.66:51820"})
    assert [p.public_key for p in peers.values()] == [KEYS["a"]]


def test_an_unknown_endpoint_is_left_to_the_device() -> None:
    (peer,) = desired_peers(view(node("self", 0), node("a", 1)).nodes, "self", {}).values()
    assert peer.endpoint is None  # "no opinion": the device keeps what it learnt from the peer's packets
    assert peer.persistent_keepalive == KEEPALIVE


def test_a_map_with_only_ourselves_gives_no_peers() -> None:
    assert desired_peers(view(node("self", 0)).nodes, "self", {}) == {}


def test_desired_link_gives_host_prefixes_and_routes_the_mesh() -> None:
    link = desired_link("idmesh0", ("100.64.0.65", "fd7a:1:2:1::1"), PREFIXES)
    assert link == LinkConfig("idmesh0", ("100.64.0.65/32", "fd7a:1:2:1::1/128"), PREFIXES)
    assert link.routes == ("100.64.0.0/10", "fd7a:1:2::/48")
