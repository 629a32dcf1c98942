"""The firewall side of identity-based routes: one nftables table, ``inet idmesh_routes``.

On a sending node (:mod:`meshd.routes.plan` steers identities to gateway
tunnels, the ``route_ifaces``):

* nothing may start a connection towards this node through a gateway
  tunnel, neither to it (input) nor through it (forward): only replies and
  their ICMP errors come back;
* nothing may leave through the mesh interface to a non-overlay address:
  the routing plan's fallback table points every routed prefix at the mesh
  interface only so that an agent socket's first route lookup succeeds
  (see :mod:`meshd.routes.plan`). A packet of the node's own (no agent mark)
  headed there is rejected in output (``admin-prohibited``: the sender
  learns at once). An agent's packet is re-routed by its mark *after*
  that point, and nftables' ``oifname`` in the output hook still names
  the device of the first lookup (the hook's, not the new route's); so
  agents' packets are checked in postrouting, where the device is the one
  the packet really leaves through, and dropped (postrouting cannot
  reject).

On a gateway (``gateway_ifname`` set), traffic arriving on the gateway
interface is forwarded only for a granted (source address, destination
prefix) pair, looked up in one concatenated interval set per family, and
leaves masqueraded to the gateway's outside address. The flow's conntrack
mark gets :data:`meshd.routes.plan.GATEWAY_MARK`; its replies get it as packet
mark before routing, which sends them back into the gateway interface
(rule 5180 of the routing plan). Everything else from the gateway
interface is dropped and counted (``refused``); nothing from it is
addressed to the gateway itself, and nothing enters it but replies.

The table is replaced whole, in one transaction, when an interface or
prefix changes; grants and tunnels coming and going (an agent born, a
gateway used) only add and delete set elements, so counters and the rest
stay as they are (:func:`render_element_changes`). Grants are
collapsed first (a prefix inside another of the same source goes, adjacent
ones merge) because the kernel's concatenated interval sets refuse
overlapping elements.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from meshcore.addressing import parse_address, parse_network
from meshcore.errors import InvalidInput
from meshcore.names import check_ifname
from meshd.kernel.nft import Nft, NftTable
from meshd.routes.plan import GATEWAY_MARK

__all__ = ["TABLE", "RouteFirewall", "RouteFirewallConfig", "render_element_changes", "render_table"]

TABLE = "idmesh_routes"
log = logging.getLogger("meshd.routes.firewall")
_LINK_LOCAL6, _MULTICAST6 = "fe80::/10", "ff00::/8"
_REJECT = "reject with icmpx admin-prohibited"


def _grants(grants: Iterable[tuple[str, str]], family: int) -> frozenset[tuple[str, str]]:
    """Canonical text, and per source the destinations collapsed (no element inside or next to another)."""
    by_source: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
    for source, destination in grants:
        address = parse_address(source, "grant source", family)
        by_source.setdefault(address, []).append(parse_network(destination, f"grant {source}: destination", family))
    return frozenset((source, str(net)) for source, nets in by_source.items()
                     for net in ipaddress.collapse_addresses(nets))  # type: ignore[type-var]  # one family


@dataclass(frozen=True)
class RouteFirewallConfig:
    """Everything the table's text depends on; values are checked and made canonical on construction."""

    mesh_ifname: str
    overlay4: str
    """The mesh's IPv4 prefix, ``100.64.0.0/10``."""
    overlay6: str
    """The mesh's IPv6 (ULA /48) prefix."""
    route_ifnames: frozenset[str] = frozenset()
    """This node's tunnels to gateways."""
    gateway_ifname: str | None = None
    """Set when this node is a gateway."""
    grants4: frozenset[tuple[str, str]] = frozenset()
    """(source address, destination prefix) pairs allowed through this gateway."""
    grants6: frozenset[tuple[str, str]] = frozenset()
    agent_mask: int = 0xFFF00000
    """The agent field of the packet mark (:mod:`meshd.agents.net`)."""

    def __post_init__(self) -> None:
        for name in (self.mesh_ifname, *self.route_ifnames, *filter(None, [self.gateway_ifname])):
            check_ifname(name)
        clash = {self.mesh_ifname, self.gateway_ifname} & set(self.route_ifnames)
        if clash or self.gateway_ifname == self.mesh_ifname:
            raise InvalidInput(f"interface {(clash or {self.mesh_ifname}).pop()} is given two roles")
        set_ = object.__setattr__
        set_(self, "route_ifnames", frozenset(self.route_ifnames))
        set_(self, "overlay4", str(parse_network(self.overlay4, "overlay prefix", 4)))
        set_(self, "overlay6", str(parse_network(self.overlay6, "overlay prefix", 6)))
        set_(self, "grants4", _grants(self.grants4, 4))
        set_(self, "grants6", _grants(self.grants6, 6))


def _grant_sort(grant: tuple[str, str]) -> tuple[int, int, int]:
    net = ipaddress.ip_network(grant[1])
    return int(ipaddress.ip_address(grant[0])), int(net.network_address), net.prefixlen


def _elements(items: Iterable[str]) -> str:
    listed = ", ".join(items)
    return f" elements = {{ {listed} }};" if listed else ""


def render_table(cfg: RouteFirewallConfig) -> str:
    """The whole table for ``nft -f``: created if missing, deleted and made anew, in one transaction."""
    mesh, mark = f'"{cfg.mesh_ifname}"', f"{GATEWAY_MARK:#010x}"
    ifaces = _elements(f'"{name}"' for name in sorted(cfg.route_ifnames))
    grants4 = _elements(f"{s} . {d}" for s, d in sorted(cfg.grants4, key=_grant_sort))
    grants6 = _elements(f"{s} . {d}" for s, d in sorted(cfg.grants6, key=_grant_sort))
    gw = f'"{cfg.gateway_ifname}"' if cfg.gateway_ifname is not None else None
    off_mesh6 = f"{{ {cfg.overlay6}, {_LINK_LOCAL6}, {_MULTICAST6} }}"
    lines = [
        f"add table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f'  comment "idmesh routes: mesh {cfg.mesh_ifname}, gateway {cfg.gateway_ifname or "-"}"',
        "  counter refused { }",
        f"  set route_ifaces {{ type ifname;{ifaces} }}",
        f"  set grant4 {{ type ipv4_addr . ipv4_addr; flags interval;{grants4} }}",
        f"  set grant6 {{ type ipv6_addr . ipv6_addr; flags interval;{grants6} }}",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        "    iifname @route_ifaces ct state established,related accept",
        "    iifname @route_ifaces counter drop",
        *([f"    iifname {gw} counter drop"] if gw else []),
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        "    iifname @route_ifaces ct state established,related accept",
        "    iifname @route_ifaces drop",
        *([f"    iifname {gw} ip saddr . ip daddr @grant4 ct mark set ct mark | {mark} accept",
           f"    iifname {gw} ip6 saddr . ip6 daddr @grant6 ct mark set ct mark | {mark} accept",
           f"    iifname {gw} counter name refused drop",
           f"    oifname {gw} ct state established,related accept",
           f"    oifname {gw} drop"] if gw else []),
        "  }",
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        f"    meta mark & {cfg.agent_mask:#010x} == 0 oifname {mesh} ip daddr != {cfg.overlay4} {_REJECT}",
        f"    meta mark & {cfg.agent_mask:#010x} == 0 oifname {mesh} ip6 daddr != {off_mesh6} {_REJECT}",
        "  }",
        "  chain leaving {",
        "    type filter hook postrouting priority filter; policy accept;",
        f"    oifname {mesh} ip daddr != {cfg.overlay4} counter drop",
        f"    oifname {mesh} ip6 daddr != {off_mesh6} counter drop",
        "  }",
    ]
    if gw:
        lines += [
            "  chain replies {",
            "    type filter hook prerouting priority mangle; policy accept;",
            f"    iifname != {gw} ct mark & {mark} == {mark} meta mark set meta mark | {mark}",
            "  }",
            "  chain nat {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    oifname != {gw} ct mark & {mark} == {mark} masquerade",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_element_changes(installed: RouteFirewallConfig, desired: RouteFirewallConfig) -> str | None:
    """The set element changes from ``installed`` to ``desired``; None when the table must be replaced."""
    fixed = ("mesh_ifname", "overlay4", "overlay6", "gateway_ifname", "agent_mask")
    if any(getattr(installed, name) != getattr(desired, name) for name in fixed):
        return None
    lines = []
    for name, old, new, text in (
            ("route_ifaces", installed.route_ifnames, desired.route_ifnames, lambda n: f'"{n}"'),
            ("grant4", installed.grants4, desired.grants4, lambda g: f"{g[0]} . {g[1]}"),
            ("grant6", installed.grants6, desired.grants6, lambda g: f"{g[0]} . {g[1]}")):
        gone, added = sorted(old - new), sorted(new - old)
        if gone:
            lines.append(f"delete element inet {TABLE} {name} {{ {', '.join(map(text, gone))} }}")
        if added:
            lines.append(f"add element inet {TABLE} {name} {{ {', '.join(map(text, added))} }}")
    return "".join(line + "\n" for line in lines)


class RouteFirewall:
    """The ``inet idmesh_routes`` table of this network namespace, owned by this meshd."""

    def __init__(self, nft: Nft | None = None) -> None:
        self._table = NftTable(TABLE, nft)
        self._lock = threading.Lock()
        self.installed: RouteFirewallConfig | None = None

    def apply(self, cfg: RouteFirewallConfig) -> None:
        """Install the table for ``cfg``; nothing is sent when it is the one installed."""
        with self._lock:
            if cfg == self.installed:
                return
            changes = None if self.installed is None else render_element_changes(self.installed, cfg)
            if changes is not None:
                self._table.run(changes, "the route grants and tunnels")
                self.installed = cfg
                return
            self._table.run(render_table(cfg), "the route table")
            self.installed = cfg
            log.info("route firewall: %d route interfaces, gateway %s with %d grants", len(cfg.route_ifnames),
                     cfg.gateway_ifname or "-", len(cfg.grants4) + len(cfg.grants6))

    def refused(self) -> int:
        """Packets the gateway refused so far (no grant for their source and destination); 0 when not a gateway."""
        with self._lock:
            if self.installed is None or self.installed.gateway_ifname is None:
                return 0
            return self._table.counter("refused")

    def close(self) -> None:
        """Delete the table (also one a crashed meshd left), then close the nft context if it is ours."""
        with self._lock:
            try:
                self._table.delete()
            finally:
                self.installed = None
                self._table.close()
