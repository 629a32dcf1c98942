"""Identity-based routes as data: which ip rules and routing tables steer each local identity (pure, no I/O).

A sending node steers each local identity's traffic to the WireGuard
interface of the gateway chosen for it: the node's own processes by
"locally generated, no agent mark", each agent by the value of its mark
field (set in the output hook by :mod:`meshd.agents.net`, which makes the
kernel route the packet again). Identities with the same routes share one
routing table, so the number of tables follows the number of distinct
route sets, not of agents::

    5180  fwmark GATEWAY/GATEWAY            lookup 5180   (gateway only) replies back into the gateway interface
    5190  fwmark BYPASS/BYPASS              lookup main   WireGuard's own encrypted UDP never loops into a tunnel
    5200  fwmark <agent>/<mask>|BYPASS      lookup 52xx   one rule per agent with routes, tables shared
    5250  fwmark 0/<mask>|BYPASS iif lo     lookup 52xx   the node's own processes
    32766 lookup main, 32767 lookup default               (the kernel's)
    32800 fwmark 0/BYPASS iif lo            lookup 5199   fallback: every routed prefix via the mesh interface

The bypass bit is part of the mask of every steering rule: a lookup that
finds no route in a table goes on to the next rule, so without it a
WireGuard packet the main table cannot route (no default route, say)
would fall through to an identity's table and loop into a tunnel. With
it, a packet carrying the bypass bit is routed by the main table or not
at all.

A profile table holds the identity's routes plus ``throw`` routes for the
overlay prefixes (mesh traffic falls through to the main table, where the
mesh routes live) and for the ``bypass`` prefixes (e.g. the controller,
which must stay reachable the ordinary way whatever gateway is chosen).
Overlay and bypass prefixes are never steered: a route equal to or inside
one of them is left out of the plan.

Why the fallback table: an agent's socket is routed once before the output
hook gives its packets the agent's mark, with mark 0; if that lookup finds
no route the send fails with ENETUNREACH and the packet never reaches the
hook that would steer it. The fallback gives that first lookup an answer
(the mesh interface, with the node's overlay source). The route firewall
(:mod:`meshd.routes.firewall`) rejects anything that would actually leave through
the mesh interface to a non-overlay address, so the fallback never carries
traffic. It serves locally generated packets only (``iif lo``): forwarded
traffic without a route stays unroutable, as it would be without idmesh.

:func:`plan_routing` only computes; :mod:`meshd.routes.tables` converges the
kernel to the plan.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from meshcore.addressing import parse_address, parse_network
from meshcore.errors import InvalidInput
from meshcore.names import check_ifname

__all__ = [
    "BYPASS_MARK",
    "GATEWAY_MARK",
    "MAIN_TABLE",
    "PRIORITIES",
    "PRIO_AGENT",
    "PRIO_BYPASS",
    "PRIO_FALLBACK",
    "PRIO_GATEWAY",
    "PRIO_NODE",
    "TABLE_FALLBACK",
    "TABLE_FIRST",
    "TABLE_GATEWAY",
    "TABLE_LAST",
    "RoutingPlan",
    "Rule",
    "SenderRoutes",
    "TableRoute",
    "plan_routing",
]

BYPASS_MARK = 0x00040000
"""The fwmark every idmesh WireGuard device puts on its own encrypted UDP: such packets always use the main table."""
GATEWAY_MARK = 0x00080000
"""On a gateway: the conntrack/packet mark of flows forwarded from the gateway interface (replies go back into it)."""

PRIO_GATEWAY = 5180
PRIO_BYPASS = 5190
PRIO_AGENT = 5200
"""Every agent rule has this priority: their marks differ, so their order does not matter."""
PRIO_NODE = 5250
PRIO_FALLBACK = 32800
"""After the kernel's ``main`` (32766) and ``default`` (32767) rules: used only when nothing else routes."""
PRIORITIES = frozenset({PRIO_GATEWAY, PRIO_BYPASS, PRIO_AGENT, PRIO_NODE, PRIO_FALLBACK})

MAIN_TABLE = 254
TABLE_GATEWAY = 5180
TABLE_FALLBACK = 5199
TABLE_FIRST = 5201
TABLE_LAST = 5299

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SenderRoutes:
    """One local identity's routes: each prefix with the interface of the gateway chosen for it now."""

    mark: int | None
    """The agent's mark value (inside ``mark_mask``); None for the node's own processes."""
    routes: tuple[tuple[str, str], ...]
    """``(prefix, ifname)``: ``("10.20.0.0/16", "rt-gw1")``, ``("0.0.0.0/0", ...)``, ``("::/0", ...)``."""


@dataclass(frozen=True)
class Rule:
    """One ip rule; ``fwmark``/``fwmask`` None means the rule does not look at the mark."""

    family: int
    """4 or 6."""
    priority: int
    table: int
    """254 is main."""
    fwmark: int | None = None
    fwmask: int | None = None
    iif: str | None = None
    """``"lo"`` matches locally generated traffic."""


@dataclass(frozen=True)
class TableRoute:
    """One route in one of our tables; a ``throw`` route ends the lookup in that table (the next rule is tried)."""

    table: int
    prefix: str
    """Canonical network text."""
    ifname: str | None
    """None for a throw route."""
    kind: Literal["unicast", "throw"] = "unicast"
    src: str | None = None
    """Preferred source address: the node's overlay address of the prefix's family."""

    @property
    def family(self) -> int:
        return 6 if ":" in self.prefix else 4


@dataclass(frozen=True)
class RoutingPlan:
    rules: frozenset[Rule] = frozenset()
    routes: frozenset[TableRoute] = frozenset()


def _inside(net: Network, others: Iterable[Network]) -> bool:
    return any(net.version == o.version and net.subnet_of(o) for o in others)  # type: ignore[arg-type]


def _sender_routes(sender: SenderRoutes, never: Sequence[Network]) -> frozenset[tuple[Network, str]]:
    who = "the node" if sender.mark is None else f"agent mark {sender.mark:#010x}"
    chosen: dict[Network, str] = {}
    for prefix, ifname in sender.routes:
        net = parse_network(prefix, f"{who}: route")
        check_ifname(ifname)
        if chosen.setdefault(net, ifname) != ifname:
            raise InvalidInput(f"{who}: route {net} is given two interfaces ({chosen[net]} and {ifname})")
    return frozenset((net, ifname) for net, ifname in chosen.items() if not _inside(net, never))


def _route_key(route: tuple[Network, str]) -> tuple[int, int, int, str]:
    net, ifname = route
    return net.version, int(net.network_address), net.prefixlen, ifname


def plan_routing(senders: Sequence[SenderRoutes], *, mark_mask: int, mesh_ifname: str, overlay: Sequence[str],
                 addresses: tuple[str, str], bypass: Sequence[str] = (),
                 gateway_ifname: str | None = None) -> RoutingPlan:
    """The rules and table routes that steer each sender's prefixes to its gateways' interfaces.

    ``addresses`` are the node's overlay addresses (IPv4, IPv6), used as the
    preferred source of every steered route. Tables are numbered from
    :data:`TABLE_FIRST` in the order of their sorted routes, so the same
    senders give the same plan whatever order they come in.
    """
    if not 0 < mark_mask <= 0xFFFFFFFF or mark_mask & (BYPASS_MARK | GATEWAY_MARK):
        raise InvalidInput(f"mark mask {mark_mask:#x} must be a non-zero 32-bit value clear of "
                           f"{BYPASS_MARK:#010x} and {GATEWAY_MARK:#010x}")
    check_ifname(mesh_ifname)
    if gateway_ifname is not None:
        check_ifname(gateway_ifname)
    overlays = [parse_network(t, "overlay prefix") for t in overlay]
    bypasses = [parse_network(t, "bypass prefix") for t in bypass]
    src = {family: parse_address(text, "overlay address", family)
           for family, text in zip((4, 6), addresses, strict=True)}

    by_sender: dict[int | None, frozenset[tuple[Network, str]]] = {}
    for sender in senders:
        if sender.mark is not None and (sender.mark <= 0 or sender.mark & ~mark_mask):
            raise InvalidInput(f"agent mark {sender.mark:#x} is not a non-zero value inside mask {mark_mask:#010x}")
        if sender.mark in by_sender:
            raise InvalidInput("the node is given twice" if sender.mark is None
                               else f"agent mark {sender.mark:#010x} is given twice")
        by_sender[sender.mark] = _sender_routes(sender, [*overlays, *bypasses])

    profiles = sorted({routes for routes in by_sender.values() if routes},
                      key=lambda routes: sorted(map(_route_key, routes)))
    if len(profiles) > TABLE_LAST - TABLE_FIRST + 1:
        raise InvalidInput(f"{len(profiles)} distinct route sets need more than the "
                           f"{TABLE_LAST - TABLE_FIRST + 1} routing tables {TABLE_FIRST}-{TABLE_LAST}")
    table_of = {routes: TABLE_FIRST + n for n, routes in enumerate(profiles)}

    steer_mask = mark_mask | BYPASS_MARK
    rules: set[Rule] = set()
    table_routes: set[TableRoute] = set()
    for routes, table in table_of.items():
        families = {net.version for net, _ in routes}
        table_routes.update(TableRoute(table, str(net), ifname, src=src[net.version]) for net, ifname in routes)
        table_routes.update(TableRoute(table, str(net), None, "throw")
                            for net in (*overlays, *bypasses) if net.version in families)
    for mark, routes in by_sender.items():
        for family in sorted({net.version for net, _ in routes}):
            if mark is None:
                rules.add(Rule(family, PRIO_NODE, table_of[routes], fwmark=0, fwmask=steer_mask, iif="lo"))
            else:
                rules.add(Rule(family, PRIO_AGENT, table_of[routes], fwmark=mark, fwmask=steer_mask))

    routed = {net for routes in table_of for net, _ in routes}
    for family in sorted({net.version for net in routed}):
        rules.add(Rule(family, PRIO_BYPASS, MAIN_TABLE, fwmark=BYPASS_MARK, fwmask=BYPASS_MARK))
        rules.add(Rule(family, PRIO_FALLBACK, TABLE_FALLBACK, fwmark=0, fwmask=BYPASS_MARK, iif="lo"))
    table_routes.update(TableRoute(TABLE_FALLBACK, str(net), mesh_ifname, src=src[net.version]) for net in routed)

    if gateway_ifname is not None:
        for family in (4, 6):
            rules.add(Rule(family, PRIO_GATEWAY, TABLE_GATEWAY, fwmark=GATEWAY_MARK, fwmask=GATEWAY_MARK))
        table_routes.update(TableRoute(TABLE_GATEWAY, str(net), gateway_ifname) for net in overlays)
    return RoutingPlan(frozenset(rules), frozenset(table_routes))
