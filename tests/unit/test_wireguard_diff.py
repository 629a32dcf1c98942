"""The WireGuard diff: incremental, idempotent, order-independent; checked through the fake device."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.errors import InvalidInput
from meshd.wg import (
    AddPeer,
    DeviceConfig,
    FakeWireGuard,
    PeerConfig,
    RemovePeer,
    SetDevice,
    UpdatePeer,
    diff_peers,
    generate_private_key,
    public_key_of,
)
from meshd.wg.model import DeviceState, PeerState

PRIVATE = generate_private_key()
KEYS = sorted(public_key_of(generate_private_key()) for _ in range(6))
A, B, C = KEYS[:3]


def peer(key: str, i: int, endpoint: str | None = None, keepalive: int | None = None) -> PeerConfig:
    return PeerConfig(key, (f"100.64.{i}.0/26", f"fd00:0:0:{i}::/64"), endpoint, keepalive)


def config(*peers: PeerConfig, port: int = 51820, private: str = PRIVATE) -> DeviceConfig:
    return DeviceConfig(private, port, tuple(peers))


def test_first_apply_sets_device_and_adds_every_peer() -> None:
    dev = FakeWireGuard()
    dev.apply(config(peer(A, 1, "198.51.100.11:51820"), peer(B, 2)))
    assert dev.last_ops == [SetDevice(PRIVATE, 51820), AddPeer(peer(A, 1, "198.51.100.11:51820")), AddPeer(peer(B, 2))]
    assert dev.text() == (
        f"[Interface]\nPrivateKey = {PRIVATE}\nListenPort = 51820\n\n"
        f"[Peer]\nPublicKey = {A}\nAllowedIPs = 100.64.1.0/26, fd00:0:0:1::/64\nEndpoint = 198.51.100.11:51820\n\n"
        f"[Peer]\nPublicKey = {B}\nAllowedIPs = 100.64.2.0/26, fd00:0:0:2::/64\n"
    )


def test_second_apply_of_the_same_config_sends_nothing() -> None:
    dev = FakeWireGuard()
    desired = config(peer(A, 1, "198.51.100.11:51820", 25), peer(B, 2))
    dev.apply(desired)
    requests = len(dev.server.requests)
    dev.apply(desired)
    assert dev.last_ops == []
    assert [r for r in dev.server.requests[requests:] if r.startswith("set=1")] == []


def test_adding_and_removing_a_peer_leaves_the_others_untouched() -> None:
    dev = FakeWireGuard()
    dev.apply(config(peer(A, 1), peer(B, 2)))
    touched = dict(dev.server.touched)
    dev.apply(config(peer(A, 1), peer(B, 2), peer(C, 3)))
    assert dev.last_ops == [AddPeer(peer(C, 3))]
    dev.apply(config(peer(A, 1), peer(B, 2)))
    assert dev.last_ops == [RemovePeer(C)]
    assert dev.server.touched[A] == touched[A] and dev.server.touched[B] == touched[B]


def test_a_changed_peer_gets_only_its_changed_fields() -> None:
    dev = FakeWireGuard()
    dev.apply(config(peer(A, 1, "198.51.100.11:51820", 25)))
    moved = PeerConfig(A, ("100.64.9.0/26",), "198.51.100.11:51820", 25)
    dev.apply(config(moved))
    assert dev.last_ops == [UpdatePeer(A, allowed_ips=("100.64.9.0/26",))]
    dev.apply(config(PeerConfig(A, ("100.64.9.0/26",), "198.51.100.11:51820")))
    assert dev.last_ops == [UpdatePeer(A, persistent_keepalive=0)]
    assert "PersistentKeepalive" not in dev.text()


def test_update_only_never_resurrects_a_peer() -> None:
    dev = FakeWireGuard()
    dev.server.request("set=1\npublic_key=" + bytes(32).hex() + "\nupdate_only=true\nallowed_ip=10.0.0.0/8\n\n")
    assert dev.state().peers == ()


def test_a_roamed_endpoint_is_kept_until_our_intent_changes() -> None:
    dev = FakeWireGuard()
    dev.apply(config(peer(A, 1, "198.51.100.11:51820")))
    dev.server.roam(A, "203.0.113.7:40000")  # the peer's packets now come from elsewhere (NAT rebinding)
    dev.apply(config(peer(A, 1, "198.51.100.11:51820"), peer(B, 2)))
    assert dev.last_ops == [AddPeer(peer(B, 2))]
    assert dev.state().peer(A).endpoint == "203.0.113.7:40000"  # type: ignore[union-attr]
    dev.apply(config(peer(A, 1, "[2001:db8::11]:51820"), peer(B, 2)))
    assert dev.last_ops == [UpdatePeer(A, endpoint="[2001:db8::11]:51820")]


def test_without_memory_the_device_is_the_reference() -> None:
    """After a restart of meshd nothing is remembered: an endpoint that differs on the device is sent."""
    current = [PeerState(A, "203.0.113.7:40000", None, 0, 0, ("100.64.1.0/26", "fd00:0:0:1::/64"))]
    assert diff_peers(current, [peer(A, 1, "198.51.100.11:51820")]) == [UpdatePeer(A, "198.51.100.11:51820")]
    assert diff_peers(current, [peer(A, 1)]) == []  # no opinion on the endpoint: keep it


def test_a_peer_that_gets_its_first_endpoint_before_any_handshake_is_created_again() -> None:
    """WireGuard waits 5 s after a handshake it could not send; a re-created peer sends its first at once."""
    blocks = ("100.64.1.0/26", "fd00:0:0:1::/64")
    never = [PeerState(A, None, None, 0, 0, blocks, 25)]
    assert diff_peers(never, [peer(A, 1, "198.51.100.11:51820", 25)]) == [
        RemovePeer(A), AddPeer(peer(A, 1, "198.51.100.11:51820", 25))]
    roamed_in = [PeerState(A, None, datetime.now(UTC), 0, 0, blocks, 25)]  # a session: update, keep it
    assert diff_peers(roamed_in, [peer(A, 1, "198.51.100.11:51820", 25)]) == [UpdatePeer(A, "198.51.100.11:51820")]
    dev = FakeWireGuard()
    dev.apply(config(peer(A, 1, keepalive=25), peer(B, 2, "198.51.100.12:51820")))
    assert dev.update_peers([peer(A, 1, "198.51.100.11:51820", 25)], [])
    assert dev.last_ops == [RemovePeer(A), AddPeer(peer(A, 1, "198.51.100.11:51820", 25))]
    assert dev.update_peers([peer(A, 1, "198.51.100.99:51820", 25)], [])  # later moves are updates
    assert dev.last_ops == [UpdatePeer(A, endpoint="198.51.100.99:51820")]
    assert dev.state().peer(A).endpoint == "198.51.100.99:51820"  # type: ignore[union-attr]


def test_a_prefix_moving_between_peers_converges() -> None:
    dev = FakeWireGuard()
    dev.apply(config(PeerConfig(A, ("100.64.1.0/26", "100.64.7.0/26")), PeerConfig(B, ("100.64.2.0/26",))))
    target = config(PeerConfig(A, ("100.64.1.0/26",)), PeerConfig(B, ("100.64.2.0/26", "100.64.7.0/26")))
    dev.apply(target)
    fresh = FakeWireGuard()
    fresh.apply(target)
    assert dev.text() == fresh.text()
    dev.apply(target)
    assert dev.last_ops == []


def test_device_fields() -> None:
    dev = FakeWireGuard()
    dev.apply(config(port=51820))
    dev.apply(config(port=0))  # "any port": keep the one the device has
    assert dev.last_ops == []
    other = generate_private_key()
    dev.apply(config(port=51821, private=other))
    assert dev.last_ops == [SetDevice(other, 51821)]
    assert dev.state().public_key == public_key_of(other)


def test_state_reports_handshakes_and_counters() -> None:
    dev = FakeWireGuard()
    dev.apply(config(peer(A, 1)))
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    dev.server.handshake(A, when, rx=1000, tx=2000)
    (state,) = dev.state().peers
    assert (state.latest_handshake, state.rx_bytes, state.tx_bytes) == (when, 1000, 2000)
    assert state.allowed_ips == ("100.64.1.0/26", "fd00:0:0:1::/64")


def test_close_forgets_everything() -> None:
    dev = FakeWireGuard()
    dev.apply(config(peer(A, 1)))
    dev.close()
    assert dev.closed and dev.state() == DeviceState(dev.ifname, None, 0, ())


@pytest.mark.parametrize(("build", "message"), [
    (lambda: PeerConfig("not base64!"), "not base64"),
    (lambda: PeerConfig("AAAA"), "32-byte"),
    (lambda: PeerConfig(A, ("100.64.1.1/26",)), "host bits"),
    (lambda: PeerConfig(A, endpoint="2001:db8::1:51820"), "brackets"),
    (lambda: PeerConfig(A, endpoint="peer.example:51820"), "IP address"),
    (lambda: PeerConfig(A, endpoint="198.51.100.1:0"), "port"),
    (lambda: config(PeerConfig(A, ("100.64.1.0/26",)), PeerConfig(B, ("100.64.1.0/26",))), "two peers"),
    (lambda: config(peer(A, 1), peer(A, 2)), "twice"),
    (lambda: config(PeerConfig(public_key_of(PRIVATE))), "own key"),
    (lambda: config(port=70000), "listen port"),
])
def test_meaningless_configs_are_refused(build: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        build()  # type: ignore[operator]


def test_configs_that_mean_the_same_compare_equal() -> None:
    one = config(PeerConfig(B, ("fd00::/64", "100.64.2.0/26", "100.64.2.0/26"), "[2001:DB8::0:11]:1"), peer(A, 1))
    two = config(peer(A, 1), PeerConfig(B, ("100.64.2.0/26", "fd00::/64"), "[2001:db8::11]:1", 0))
    assert one == two


# -- random order of applies converges to the same text -------------------------------------------
PREFIXES = [f"100.64.{i}.0/26" for i in range(6)] + [f"fd00:0:0:{i}::/64" for i in range(6)]


@st.composite
def device_configs(draw: st.DrawFn) -> DeviceConfig:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=len(KEYS)))
    owner = {p: draw(st.sampled_from([None, *keys])) for p in PREFIXES} if keys else {}
    peers = []
    for key in keys:
        endpoint = draw(st.sampled_from([None, "198.51.100.11:51820", "[2001:db8::12]:51821"]))
        peers.append(PeerConfig(key, tuple(p for p, k in owner.items() if k == key), endpoint,
                                draw(st.sampled_from([None, 25]))))
    return DeviceConfig(PRIVATE, draw(st.sampled_from([51820, 51821])), tuple(peers))


@settings(max_examples=200, deadline=None)
@given(st.lists(device_configs(), max_size=5), device_configs())
def test_any_sequence_of_applies_ends_in_the_same_text(history: list[DeviceConfig], target: DeviceConfig) -> None:
    dev = FakeWireGuard()
    for desired in history:
        dev.apply(desired)
    dev.apply(target)
    fresh = FakeWireGuard()
    fresh.apply(target)
    # An endpoint we stopped having an opinion on stays what it was, so compare it only where we have one.
    assert _without_unwanted_endpoints(dev.text(), target) == _without_unwanted_endpoints(fresh.text(), target)
    dev.apply(target)
    assert dev.last_ops == []


def _without_unwanted_endpoints(text: str, target: DeviceConfig) -> str:
    no_opinion = {p.public_key for p in target.peers if p.endpoint is None}
    out, key = [], None
    for line in text.splitlines():
        if line.startswith("PublicKey = "):
            key = line.removeprefix("PublicKey = ")
        if line.startswith("Endpoint = ") and key in no_opinion:
            continue
        out.append(line)
    return "\n".join(out)
