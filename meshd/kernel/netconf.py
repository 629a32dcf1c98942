"""Addresses, routes, MTU and link state of the overlay interface, converged with pyroute2.

``apply(LinkConfig)`` is idempotent: it reads the link, computes the
difference with the pure :func:`plan_link` and sends only that. Ownership:

* the interface belongs to meshd, so every address on it that is not wanted
  is removed, except IPv6 link-local ones (the kernel's, not ours);
* routes are shared with the rest of the host, so only routes that carry our
  protocol number :data:`ROUTE_PROTO` (``ip route ... proto 108``), sit in
  the main table and leave through our interface are ours to remove; a
  route an operator added by hand through the interface is left alone.

Order of operations: the link goes up first (IPv4 refuses a route through
a link that is down), stale routes leave before stale addresses, addresses
come before routes. IPv6 addresses are added with ``nodad``: duplicate
detection makes a new address unusable for a second or more and cannot find
a duplicate on a point-to-point tunnel anyway.

:class:`FakeNetConf` runs the same plan against an in-memory link table and
prints it like ``ip addr`` / ``ip route`` for tests.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from meshcore.errors import InvalidInput, NotFound
from meshd.kernel.netlink import NetlinkError, netlink_error

__all__ = [
    "DEFAULT_MTU",
    "ROUTE_PROTO",
    "AddAddress",
    "AddRoute",
    "FakeNetConf",
    "IPRouteNetConf",
    "LinkConfig",
    "LinkOp",
    "LinkState",
    "NetConf",
    "RemoveAddress",
    "RemoveRoute",
    "SetLink",
    "local_blocks",
    "plan_link",
]

ROUTE_PROTO = 108
"""rtnetlink protocol number marking idmesh's routes (unassigned in /etc/iproute2/rt_protos)."""
DEFAULT_MTU = 1420
"""WireGuard's default: 1500 minus the largest (IPv6) encapsulation overhead of 80 bytes."""
_MAIN_TABLE = 254
_LOCAL_TABLE = 255
_SCOPE_HOST = 254
_IFA_F_NODAD = 0x02
_IFF_UP = 0x1


def _sort_key(text: str) -> tuple[int, int, int]:
    iface = ipaddress.ip_interface(text)
    return iface.version, int(iface.ip), iface.network.prefixlen


def _canonical(values: Iterable[str], what: str, *, network: bool) -> tuple[str, ...]:
    out = set()
    for value in values:
        try:
            out.add(str(ipaddress.ip_network(value) if network else ipaddress.ip_interface(value)))
        except ValueError as exc:
            raise InvalidInput(f"{what} {value!r} is not an address/prefix"
                               + (" without host bits" if network else "")) from exc
    return tuple(sorted(out, key=_sort_key))


@dataclass(frozen=True)
class LinkConfig:
    """The overlay interface as we want it: its own addresses (``"100.64.0.1/32"``), the mesh routes, the MTU."""

    ifname: str
    addresses: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    mtu: int = DEFAULT_MTU

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", _canonical(self.addresses, f"{self.ifname}: address", network=False))
        object.__setattr__(self, "routes", _canonical(self.routes, f"{self.ifname}: route", network=True))
        if not 1280 <= self.mtu <= 65535:
            raise InvalidInput(f"{self.ifname}: MTU {self.mtu} must be 1280-65535 (IPv6 needs at least 1280)")


@dataclass(frozen=True)
class LinkState:
    """The interface as it is; ``routes`` holds only the routes we own (see the module docstring)."""

    ifname: str
    mtu: int
    up: bool
    addresses: frozenset[str] = frozenset()
    routes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SetLink:
    mtu: int | None
    up: bool


@dataclass(frozen=True)
class AddAddress:
    address: str


@dataclass(frozen=True)
class RemoveAddress:
    address: str


@dataclass(frozen=True)
class AddRoute:
    destination: str


@dataclass(frozen=True)
class RemoveRoute:
    destination: str


LinkOp = SetLink | AddAddress | RemoveAddress | AddRoute | RemoveRoute


def plan_link(current: LinkState, desired: LinkConfig) -> list[LinkOp]:
    """The operations that turn ``current`` into ``desired``, in a safe order; empty when nothing differs."""
    ops: list[LinkOp] = []
    if current.mtu != desired.mtu or not current.up:
        ops.append(SetLink(desired.mtu if current.mtu != desired.mtu else None, True))
    want_addr, want_route = set(desired.addresses), set(desired.routes)
    ops += [RemoveRoute(r) for r in sorted(current.routes - want_route, key=_sort_key)]
    ops += [RemoveAddress(a) for a in sorted(current.addresses - want_addr, key=_sort_key)]
    ops += [AddAddress(a) for a in desired.addresses if a not in current.addresses]
    ops += [AddRoute(r) for r in desired.routes if r not in current.routes]
    return ops


class NetConf(Protocol):
    """The addresses/routes touchpoint: ``apply`` is idempotent and sends only the difference."""

    def apply(self, desired: LinkConfig) -> list[LinkOp]: ...

    def state(self, ifname: str) -> LinkState: ...


class IPRouteNetConf:
    """:class:`NetConf` on the current network namespace through rtnetlink."""

    def _index(self, ipr: IPRoute, ifname: str) -> int:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            raise NotFound(f"interface {ifname} does not exist")
        return int(index[0])

    def _read(self, ipr: IPRoute, ifname: str) -> tuple[int, LinkState]:
        index = self._index(ipr, ifname)
        (link,) = ipr.get_links(index)
        addresses = set()
        for msg in ipr.get_addr(index=index):
            iface = ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            if not (iface.version == 6 and iface.ip.is_link_local):
                addresses.add(str(iface))
        routes = set()
        for family in (2, 10):
            for msg in ipr.get_routes(family=family):
                if (msg["proto"] == ROUTE_PROTO and msg.get_attr("RTA_OIF") == index
                        and (msg.get_attr("RTA_TABLE") or msg["table"]) == _MAIN_TABLE):
                    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == 2 else "::")
                    routes.add(str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}")))
        state = LinkState(ifname, int(link.get_attr("IFLA_MTU")), bool(link["flags"] & _IFF_UP),
                          frozenset(addresses), frozenset(routes))
        return index, state

    def state(self, ifname: str) -> LinkState:
        try:
            with IPRoute() as ipr:
                return self._read(ipr, ifname)[1]
        except NetlinkError as exc:
            raise netlink_error(exc, f"reading interface {ifname}") from exc

    def apply(self, desired: LinkConfig) -> list[LinkOp]:
        try:
            with IPRoute() as ipr:
                index, current = self._read(ipr, desired.ifname)
                ops = plan_link(current, desired)
                for op in ops:
                    self._send(ipr, index, op, desired.ifname)
                return ops
        except NetlinkError as exc:
            raise netlink_error(exc, f"configuring interface {desired.ifname}") from exc

    def _send(self, ipr: IPRoute, index: int, op: LinkOp, ifname: str) -> None:
        try:
            if isinstance(op, SetLink):
                ipr.link("set", index=index, state="up", **({"mtu": op.mtu} if op.mtu else {}))
            elif isinstance(op, AddAddress | RemoveAddress):
                iface = ipaddress.ip_interface(op.address)
                flags = {"flags": _IFA_F_NODAD} if iface.version == 6 and isinstance(op, AddAddress) else {}
                ipr.addr("add" if isinstance(op, AddAddress) else "del", index=index, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen, **flags)
            else:
                ipr.route("add" if isinstance(op, AddRoute) else "del", dst=op.destination, oif=index,
                          proto=ROUTE_PROTO, table=_MAIN_TABLE)
        except NetlinkError as exc:
            # Another actor may have done it between our read and our write: the outcome is what we want.
            done = errno.EEXIST if isinstance(op, AddAddress | AddRoute) else errno.EADDRNOTAVAIL
            if exc.code in (done, errno.ESRCH) and not isinstance(op, SetLink):
                return
            raise netlink_error(exc, f"interface {ifname}: {op}") from exc


_PROTO_NAMES = {2: "kernel", 3: "boot", 4: "static"}


@dataclass
class _FakeLink:
    index: int
    mtu: int = 1500
    up: bool = False
    addresses: set[str] = field(default_factory=set)
    routes: dict[str, int] = field(default_factory=dict)  # destination -> rtnetlink protocol number


class FakeNetConf:
    """:class:`NetConf` on an in-memory link table; ``text()`` prints it like ``ip addr`` + ``ip route``."""

    def __init__(self) -> None:
        self.links: dict[str, _FakeLink] = {}
        self.last_ops: list[LinkOp] = []

    def add_link(self, ifname: str, mtu: int = 1500) -> None:
        self.links[ifname] = _FakeLink(len(self.links) + 2, mtu)

    def add_foreign_route(self, ifname: str, destination: str, proto: int = 4) -> None:
        """A route someone else put on the interface, which apply() must leave alone."""
        self.links[ifname].routes[str(ipaddress.ip_network(destination))] = proto

    def _link(self, ifname: str) -> _FakeLink:
        if ifname not in self.links:
            raise NotFound(f"interface {ifname} does not exist")
        return self.links[ifname]

    def state(self, ifname: str) -> LinkState:
        link = self._link(ifname)
        ours = frozenset(d for d, proto in link.routes.items() if proto == ROUTE_PROTO)
        return LinkState(ifname, link.mtu, link.up, frozenset(link.addresses), ours)

    def apply(self, desired: LinkConfig) -> list[LinkOp]:
        link = self._link(desired.ifname)
        self.last_ops = plan_link(self.state(desired.ifname), desired)
        for op in self.last_ops:
            if isinstance(op, SetLink):
                link.up, link.mtu = op.up, op.mtu or link.mtu
            elif isinstance(op, AddAddress):
                link.addresses.add(op.address)
            elif isinstance(op, RemoveAddress):
                link.addresses.discard(op.address)
            elif isinstance(op, AddRoute):
                link.routes[op.destination] = ROUTE_PROTO
            else:
                link.routes.pop(op.destination, None)
        return self.last_ops

    def text(self) -> str:
        out = []
        for name, link in sorted(self.links.items(), key=lambda kv: kv[1].index):
            out.append(f"{link.index}: {name}: <{'UP' if link.up else 'DOWN'}> mtu {link.mtu}")
            for address in sorted(link.addresses, key=_sort_key):
                out.append(f"    {'inet6' if ':' in address else 'inet'} {address}")
        for name, link in sorted(self.links.items()):
            for dest, proto in sorted(link.routes.items(), key=lambda kv: _sort_key(kv[0])):
                out.append(f"{dest} dev {name} proto {_PROTO_NAMES.get(proto, proto)}")
        return "\n".join(out) + "\n"


def local_blocks(prefixes: Iterable[str], present: bool) -> None:
    """Make every address of ``prefixes`` local to this namespace (a ``local`` route on lo), or undo it.

    For agents as servers (:mod:`meshd.agents.net`): a connection to an
    agent's own address must be delivered here, to the agent's sockets. One
    route per block, made once, costs nothing per birth (an address per
    agent would be two netlink calls each); which socket may receive at which
    address is the agents' table's input chain, which drops whatever is for
    a block address no agent holds.
    """
    try:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for prefix in prefixes:
                try:
                    ipr.route("replace" if present else "del", dst=prefix, type="local", table=_LOCAL_TABLE, oif=lo,
                              proto=ROUTE_PROTO, scope=_SCOPE_HOST)
                except NetlinkError as exc:
                    if present or exc.code not in (errno.ESRCH, errno.ENOENT):
                        raise
    except NetlinkError as exc:
        raise netlink_error(exc, f"{'adding' if present else 'removing'} the local routes of {', '.join(prefixes)}"
                            ) from exc

