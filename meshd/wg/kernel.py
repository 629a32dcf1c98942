"""Kernel WireGuard over generic netlink (pyroute2), for hosts that have the module.

It cannot run on our test machines (no module), so it is kept small and its
two pure halves are unit-tested against pyroute2's own message encoder:
:func:`netlink_requests` turns diff operations into ``WireGuard.set``
arguments (one peer per request, as pyroute2 sends them), and
:func:`parse_netlink` reads a device dump, merging a peer that the kernel
split over several messages (it does so when the allowed-IP list is long).
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pyroute2 import WireGuard  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from meshcore.errors import Conflict, Unavailable
from meshcore.names import check_ifname
from meshd.kernel.netlink import create_link, delete_link, link_kind, netlink_error

from .diff import AddPeer, Op, RemovePeer, SetDevice, UpdatePeer, diff_device
from .model import DeviceConfig, DeviceState, PeerConfig, PeerState, parse_endpoint

__all__ = ["KernelWireGuard", "netlink_requests", "parse_netlink"]


def _endpoint_args(endpoint: str) -> dict[str, Any]:
    ip, port = parse_endpoint(endpoint)
    return {"endpoint_addr": str(ip), "endpoint_port": port}


def netlink_requests(ops: Sequence[Op]) -> list[dict[str, Any]]:
    """Keyword arguments for one ``WireGuard.set(ifname, **kwargs)`` call per operation."""
    requests: list[dict[str, Any]] = []
    for op in ops:
        if isinstance(op, SetDevice):
            device = {"private_key": op.private_key, "listen_port": op.listen_port, "fwmark": op.fwmark}
            requests.append({k: v for k, v in device.items() if v is not None})
        elif isinstance(op, RemovePeer):
            requests.append({"peer": {"public_key": op.public_key, "remove": True}})
        elif isinstance(op, AddPeer):
            peer: dict[str, Any] = {"public_key": op.peer.public_key, "replace_allowed_ips": True,
                                    "allowed_ips": list(op.peer.allowed_ips)}
            if op.peer.endpoint is not None:
                peer.update(_endpoint_args(op.peer.endpoint))
            if op.peer.persistent_keepalive:
                peer["persistent_keepalive"] = op.peer.persistent_keepalive
            requests.append({"peer": peer})
        elif isinstance(op, UpdatePeer):
            peer = {"public_key": op.public_key, "update_only": True}
            if op.endpoint is not None:
                peer.update(_endpoint_args(op.endpoint))
            if op.persistent_keepalive is not None:
                peer["persistent_keepalive"] = op.persistent_keepalive
            if op.allowed_ips is not None:
                peer["replace_allowed_ips"] = True
                peer["allowed_ips"] = list(op.allowed_ips)
            requests.append({"peer": peer})
    return requests


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_netlink(messages: Iterable[Any], ifname: str) -> DeviceState:
    """A :class:`DeviceState` from the ``WG_CMD_GET_DEVICE`` dump (a list of pyroute2 ``wgmsg``)."""
    public_key: str | None = None
    listen_port = fwmark = 0
    peers: dict[str, dict[str, Any]] = {}
    for msg in messages:
        if msg.get_attr("WGDEVICE_A_PUBLIC_KEY") is not None:
            public_key = _text(msg.get_attr("WGDEVICE_A_PUBLIC_KEY"))
        listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
        for nla in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _text(nla.get_attr("WGPEER_A_PUBLIC_KEY"))
            peer = peers.setdefault(key, {"allowed": []})
            for name in ("WGPEER_A_ENDPOINT", "WGPEER_A_LAST_HANDSHAKE_TIME", "WGPEER_A_RX_BYTES",
                         "WGPEER_A_TX_BYTES", "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"):
                if nla.get_attr(name) is not None:
                    peer[name] = nla.get_attr(name)
            peer["allowed"] += [ip["addr"] for ip in nla.get_attr("WGPEER_A_ALLOWEDIPS") or ()]
    states = []
    for key, peer in peers.items():
        endpoint = None
        if "WGPEER_A_ENDPOINT" in peer:
            ep = peer["WGPEER_A_ENDPOINT"]
            ip = ipaddress.ip_address(ep["addr"])
            if not ip.is_unspecified:
                endpoint = f"[{ip}]:{ep['port']}" if ip.version == 6 else f"{ip}:{ep['port']}"
        handshake = None
        hs = peer.get("WGPEER_A_LAST_HANDSHAKE_TIME")
        if hs is not None and (hs["tv_sec"] or hs["tv_nsec"]):
            handshake = datetime.fromtimestamp(hs["tv_sec"] + hs["tv_nsec"] / 1e9, tz=UTC)
        states.append(PeerState(key, endpoint, handshake, peer.get("WGPEER_A_RX_BYTES") or 0,
                                peer.get("WGPEER_A_TX_BYTES") or 0, tuple(peer["allowed"]),
                                peer.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or None))
    return DeviceState(ifname, public_key, listen_port, tuple(states), fwmark)


class KernelWireGuard:
    """A :class:`~meshd.wg.model.WireGuardDevice` backed by the kernel module (``ip link add ... type wireguard``)."""

    def __init__(self, ifname: str) -> None:
        self.ifname = check_ifname(ifname)
        self._applied: DeviceConfig | None = None

    def _netlink(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with WireGuard() as wg:
                return call(wg, *args, **kwargs)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise Unavailable(f"WireGuard interface {self.ifname} does not exist") from exc
            raise netlink_error(exc, f"{what} WireGuard interface {self.ifname}") from exc

    def start(self) -> None:
        """Create the interface unless it exists (a kernel device outlives a crashed daemon: adopt it)."""
        kind = link_kind(self.ifname)
        if kind is None:
            create_link(self.ifname, "wireguard")
        elif kind != "wireguard":
            raise Conflict(f"interface {self.ifname} exists and is a {kind or 'non-WireGuard'} interface")

    def apply(self, desired: DeviceConfig) -> None:
        self.start()
        try:
            for request in netlink_requests(diff_device(self.state(), desired, self._applied)):
                self._netlink("configuring", WireGuard.set, self.ifname, **request)
        except BaseException:
            self._applied = None
            raise
        self._applied = desired

    def update_peers(self, upsert: Sequence[PeerConfig], remove: Sequence[str]) -> bool:
        """No incremental path over netlink yet: the caller applies the whole config."""
        return False

    def state(self) -> DeviceState:
        return parse_netlink(self._netlink("reading", WireGuard.info, self.ifname), self.ifname)

    def close(self) -> None:
        delete_link(self.ifname)
        self._applied = None
