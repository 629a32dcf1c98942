"""What a node reports about itself: where it can be reached, and the routes it offers to carry.

Both arrive from the node, so both are validated strictly here before they
reach anyone's map: an endpoint on loopback or link-local is no use to
another host and one inside the overlay would route the tunnel through
itself, a route inside the overlay would let a gateway capture the mesh. A report that changes nothing spends no netmap
version; a change of offered routes is audited (offering to carry others'
traffic is an identity event), a change of endpoints is not.
"""

from __future__ import annotations

import base64
import ipaddress
from datetime import datetime

from meshcore.addressing import MeshPrefixes
from meshcore.errors import InvalidInput
from meshcore.identity import Identity
from meshcore.wire.stream import EndpointReport, PeerNode, RouteOffer

from .context import Context
from .netmap import peer_node
from .nodes import existing_node

__all__ = ["report_endpoints"]


def report_endpoints(ctx: Context, ident: Identity, report: EndpointReport, observed: str | None,
                     now: datetime) -> PeerNode:
    """Record where a node can be reached — its own candidates, then the
    source address the controller saw (which may be a NAT's) — the routes
    it offers, and the ports it serves MCP on."""
    name = ident.spiffe_id.name
    prefixes = ctx.settings.prefixes
    candidates = [_endpoint(e, prefixes) for e in report.endpoints]
    if observed:
        candidates.append(_endpoint(_join(observed, report.listen_port), prefixes))
    endpoints = tuple(dict.fromkeys(c for c in candidates if c))
    routing = _route_offer(report.routing, prefixes).model_dump(mode="json", exclude_none=True)
    reach = _reach(report, prefixes)
    mcp_ports = tuple(sorted(set(report.mcp_ports)))
    with ctx.store.transaction() as tx:
        row = existing_node(tx, name)
        if row.endpoints == endpoints and row.routing == routing and row.reach == reach \
                and row.mcp_ports == mcp_ports:
            return peer_node(row, prefixes)
        tx.set_node_endpoints(name, endpoints)
        tx.set_node_reach(name, reach)
        tx.set_node_mcp_ports(name, mcp_ports)
        if row.routing.get("routes", []) != routing.get("routes", []):
            tx.audit(now, str(ident.spiffe_id), "node.routes", str(ident.spiffe_id),
                     routes=list(routing.get("routes", [])))
        tx.set_node_routing(name, routing)
        peer = peer_node(existing_node(tx, name), prefixes)
        ctx.hub.record_delta(tx, upsert=(peer,))
    return peer


_NAT_KINDS = ("none", "independent", "varies", "unknown")


def _reach(report: EndpointReport, prefixes: MeshPrefixes) -> dict[str, object]:
    """A node's NAT report, its addresses made canonical (a loopback or overlay one is dropped, as an endpoint)."""
    reach = report.reach
    if reach.nat not in _NAT_KINDS:
        raise InvalidInput(f"unknown NAT behaviour {reach.nat!r}: expected one of {', '.join(_NAT_KINDS)}")
    if (reach.probe_ufrag is None) != (reach.probe_pwd is None):
        raise InvalidInput("probe credentials come as a pair (ufrag and pwd)")
    for text in (reach.probe_ufrag, reach.probe_pwd):
        if text is not None and (len(text) < 4 or not text.isascii() or not text.isalnum()):
            raise InvalidInput("probe credentials must be 4 or more ASCII letters and digits")
    reflexive = tuple(dict.fromkeys(c for c in (_endpoint(e, prefixes) for e in reach.reflexive) if c))
    relay = _endpoint(reach.relay, prefixes) if reach.relay else None
    out = reach.model_copy(update={"reflexive": reflexive, "relay": relay})
    return out.model_dump(mode="json", exclude_none=True, exclude_defaults=True)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _route_offer(offer: RouteOffer, prefixes: MeshPrefixes) -> RouteOffer:
    """Canonical prefixes, none inside the overlay (a gateway must not capture the mesh), a key, a port."""
    routes: list[str] = []
    for text in offer.routes:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise InvalidInput(f"advertised route {text!r}: {exc}") from exc
        overlay = prefixes.v4 if net.version == 4 else prefixes.v6
        if net.prefixlen and net.overlaps(overlay):
            raise InvalidInput(f"advertised route {net} overlaps the mesh's own prefix {overlay}")
        routes.append(str(net))
    if routes and (offer.route_key is None or offer.gateway_port is None):
        raise InvalidInput("a node that advertises routes must give its route key and gateway port")
    if offer.route_key is not None:
        try:
            if len(base64.b64decode(offer.route_key, validate=True)) != 32:
                raise ValueError("not 32 bytes")
        except ValueError as exc:
            raise InvalidInput(f"route key {offer.route_key!r} is not a base64 X25519 key") from exc
    return RouteOffer(routes=tuple(sorted(set(routes), key=_prefix_order)), route_key=offer.route_key,
                      gateway_port=offer.gateway_port if routes else None)


def _prefix_order(text: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(text)
    return net.version, int(net.network_address), net.prefixlen


def _endpoint(text: str, prefixes: MeshPrefixes) -> str | None:
    """Normalise an underlay ``ip:port``; None for what can never be an endpoint.

    Loopback, link-local, multicast and the overlay itself are dropped.
    """
    host, sep, port = text.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        ip = getattr(ip, "ipv4_mapped", None) or ip  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
        number = int(port)
    except ValueError as exc:
        raise InvalidInput(f"invalid endpoint {text!r}: expected IP:PORT or [IPv6]:PORT") from exc
    if not sep or not 0 < number < 65536:
        raise InvalidInput(f"invalid endpoint {text!r}: expected IP:PORT or [IPv6]:PORT")
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return None
    if prefixes.block_of(str(ip)) is not None:
        return None
    return _join(str(ip), number)
