"""The kernel back end without a kernel module: our requests through pyroute2's encoder, dumps through its decoder."""

from __future__ import annotations

import base64
import socket
from datetime import UTC, datetime
from typing import Any

from pyroute2.netlink import NLM_F_REQUEST  # type: ignore[import-untyped]
from pyroute2.netlink.generic.wireguard import (  # type: ignore[import-untyped]
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    AsyncWireGuard,
    wgmsg,
)

from meshd.wg import AddPeer, PeerConfig, RemovePeer, SetDevice, UpdatePeer, generate_private_key
from meshd.wg.kernel import netlink_requests, parse_netlink

K1 = base64.b64encode(bytes([1] * 32)).decode()
K2 = base64.b64encode(bytes([2] * 32)).decode()


def _roundtrip(message: Any) -> Any:
    message["cmd"] = 1
    message["version"] = 1
    message["header"]["type"] = 30
    message["header"]["flags"] = NLM_F_REQUEST
    message.encode()
    decoded = wgmsg(message.data)
    decoded.decode()
    return decoded


def _encode_peer(peer: dict[str, Any]) -> Any:
    """The peer part of the message pyroute2's WireGuard.set would send, encoded and decoded back."""
    msg = wgmsg()
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "wg0"])
    AsyncWireGuard._wg_set_peer(AsyncWireGuard.__new__(AsyncWireGuard), msg, peer)
    (decoded,) = _roundtrip(msg).get_attr("WGDEVICE_A_PEERS")
    return decoded


def test_operations_become_one_request_each() -> None:
    private = generate_private_key()
    requests = netlink_requests([
        SetDevice(private, 51820),
        RemovePeer(K2),
        UpdatePeer(K1, endpoint="[2001:db8::1]:51820", persistent_keepalive=0),
        AddPeer(PeerConfig(K2, ("100.64.0.64/26", "fd00::/64"), "198.51.100.12:51820", 25)),
    ])
    assert requests == [
        {"private_key": private, "listen_port": 51820},
        {"peer": {"public_key": K2, "remove": True}},
        {"peer": {"public_key": K1, "update_only": True, "endpoint_addr": "2001:db8::1", "endpoint_port": 51820,
                  "persistent_keepalive": 0}},
        {"peer": {"public_key": K2, "replace_allowed_ips": True, "allowed_ips": ["100.64.0.64/26", "fd00::/64"],
                  "endpoint_addr": "198.51.100.12", "endpoint_port": 51820, "persistent_keepalive": 25}},
    ]


def test_requests_encode_to_the_intended_flags() -> None:
    remove, update, add = (r["peer"] for r in netlink_requests([
        RemovePeer(K2),
        UpdatePeer(K1, allowed_ips=()),
        AddPeer(PeerConfig(K2, ("100.64.0.64/26", "fd00::/64"), "[2001:db8::12]:51820")),
    ]))
    assert _encode_peer(remove).get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert _encode_peer(update).get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS
    added = _encode_peer(add)
    assert added.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert [ip["addr"] for ip in added.get_attr("WGPEER_A_ALLOWEDIPS")] == ["100.64.0.64/26", "fd00::/64"]
    assert (added.get_attr("WGPEER_A_ENDPOINT")["addr"], added.get_attr("WGPEER_A_ENDPOINT")["port"]) == (
        "2001:db8::12", 51820)


def _allowed(net: str) -> dict[str, Any]:
    addr, length = net.split("/")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family], ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(family, addr)],
                      ["WGALLOWEDIP_A_CIDR_MASK", int(length)]]}


def test_a_dump_split_over_messages_is_merged() -> None:
    first = wgmsg()
    first["attrs"] = [
        ["WGDEVICE_A_IFNAME", "wg0"], ["WGDEVICE_A_PUBLIC_KEY", K2], ["WGDEVICE_A_LISTEN_PORT", 51820],
        ["WGDEVICE_A_PEERS", [{"attrs": [
            ["WGPEER_A_PUBLIC_KEY", K1],
            ["WGPEER_A_ENDPOINT", {"addr": "198.51.100.11", "port": 51820}],
            ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 0}],
            ["WGPEER_A_RX_BYTES", 148], ["WGPEER_A_TX_BYTES", 92],
            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
            ["WGPEER_A_ALLOWEDIPS", [_allowed("100.64.0.0/26")]],
        ]}]],
    ]
    second = wgmsg()  # the kernel continues the same peer's allowed IPs in the next message
    second["attrs"] = [
        ["WGDEVICE_A_IFNAME", "wg0"],
        ["WGDEVICE_A_PEERS", [
            {"attrs": [["WGPEER_A_PUBLIC_KEY", K1], ["WGPEER_A_ALLOWEDIPS", [_allowed("fd00::/64")]]]},
            {"attrs": [["WGPEER_A_PUBLIC_KEY", K2], ["WGPEER_A_ENDPOINT", {"addr": "2001:db8::12", "port": 7}]]},
        ]],
    ]
    state = parse_netlink([_roundtrip(first), _roundtrip(second)], "wg0")
    assert (state.public_key, state.listen_port) == (K2, 51820)
    one, two = state.peers
    assert one.public_key == K1 and one.endpoint == "198.51.100.11:51820"
    assert one.allowed_ips == ("100.64.0.0/26", "fd00::/64")
    assert one.latest_handshake == datetime.fromtimestamp(1700000000, tz=UTC)
    assert (one.rx_bytes, one.tx_bytes, one.persistent_keepalive) == (148, 92, 25)
    assert two.endpoint == "[2001:db8::12]:7" and two.latest_handshake is None and two.allowed_ips == ()
