"""Identity-based routes: which gateway carries whose traffic to a prefix.

A node *offers* routes (what its meshd advertises: subnets, and
``0.0.0.0/0`` + ``::/0`` for an exit node); only a policy ``routes`` rule
makes an offer usable, and only for the identities its ``from`` matches.
The path is chosen by who sends, not by the source address:

* For one identity and one prefix the **first rule in file order** that
  matches the identity and has a gateway offering the prefix decides. Unlike
  acls, routes are ordered: two rules can send the same identity's traffic
  for the same prefix to different places, and one must win.
* Between different prefixes, IP routing applies: the longest prefix
  containing the destination wins (``10.20.0.0/16`` via the billing gateway
  beats ``0.0.0.0/0`` via an exit node).
* ``via`` lists gateways in failover order; ``tag:NAME`` stands for every
  node with that tag, in name order. A gateway counts only if it offers a
  route covering the prefix (an exit node covers every prefix of its
  family). A node never routes its own identities through itself.

The gateway side follows from the same function: a gateway forwards a
packet only when its source address belongs to an identity whose route for
a prefix containing the destination lists that gateway (any position: a
backup must accept traffic the moment the sender fails over).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .identities import Actor, Identities
from .model import Policy, Route
from .sources import SourceClass, source_class

__all__ = [
    "Gateway",
    "NodeRoutes",
    "RouteChoice",
    "RouteDecision",
    "compile_node_routes",
    "explain_route",
    "gateways_for",
    "offer_users",
    "route_for",
    "routes_of",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Gateway:
    """A node that offers routes: its name and tags (for ``tag:`` in ``via``) and its advertised prefixes."""

    name: str
    tags: frozenset[str] = frozenset()
    routes: tuple[str, ...] = ()

    def offers(self, prefix: Network) -> bool:
        for text in self.routes:
            offered = ipaddress.ip_network(text)
            if offered.version == prefix.version and prefix.subnet_of(offered):  # type: ignore[arg-type]
                return True
        return False


@dataclass(frozen=True)
class RouteChoice:
    """One identity's route: ``prefix`` goes via ``gateways`` (failover order), decided by ``routes[rule]``."""

    prefix: str
    gateways: tuple[str, ...]
    rule: int


@dataclass(frozen=True)
class NodeRoutes:
    """Everything one node does for routes, as a sender and as a gateway.

    ``senders``: the node's own identities (``node:NAME``, ``agent:ID``)
    that have routes. ``grants4``/``grants6``: (source address, prefix)
    pairs this node forwards as a gateway; ``clients``: the nodes those
    sources run on (they need a tunnel to this node's gateway interface).
    """

    senders: Mapping[str, tuple[RouteChoice, ...]] = field(default_factory=dict)
    grants4: frozenset[tuple[str, str]] = frozenset()
    grants6: frozenset[tuple[str, str]] = frozenset()
    clients: frozenset[str] = frozenset()

    @property
    def gateways(self) -> frozenset[str]:
        """Every gateway some identity of this node may use (first choices and backups)."""
        return frozenset(g for choices in self.senders.values() for c in choices for g in c.gateways)


def _sources(policy: Policy) -> list[SourceClass]:
    return [source_class(route.source, policy.groups) for route in policy.routes]


def gateways_for(route: Route, prefix: Network, gateways: Mapping[str, Gateway], *,
                 exclude: str | None = None) -> tuple[str, ...]:
    """The nodes ``route.via`` names that offer ``prefix``, in failover order, without duplicates."""
    out: list[str] = []
    for spec in route.via:
        if spec.kind == "node":
            names: Iterable[str] = (spec.name,) if spec.name in gateways else ()
        else:
            names = sorted(n for n, g in gateways.items() if spec.name in g.tags)
        for name in names:
            if name != exclude and name not in out and gateways[name].offers(prefix):
                out.append(name)
    return tuple(out)


def routes_of(policy: Policy, actor: Actor, gateways: Mapping[str, Gateway],
              sources: list[SourceClass] | None = None) -> tuple[RouteChoice, ...]:
    """The routes ``actor`` gets: per prefix, the first matching rule with a gateway offering it."""
    sources = _sources(policy) if sources is None else sources
    seen: set[str] = set()
    out: list[RouteChoice] = []
    for index, (route, source) in enumerate(zip(policy.routes, sources, strict=True)):
        if not source.matches(actor):
            continue
        for prefix in route.to:
            key = str(prefix)
            if key in seen:
                continue
            chosen = gateways_for(route, prefix, gateways, exclude=actor.node)
            if chosen:
                seen.add(key)
                out.append(RouteChoice(key, chosen, index))
    return tuple(out)


def route_for(choices: Iterable[RouteChoice], address: str) -> RouteChoice | None:
    """The choice IP routing takes for ``address``: the longest prefix containing it."""
    ip = ipaddress.ip_address(address)
    best: tuple[int, RouteChoice] | None = None
    for choice in choices:
        net = ipaddress.ip_network(choice.prefix)
        if net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, choice)
    return None if best is None else best[1]


def compile_node_routes(policy: Policy, identities: Identities, node: str,
                        gateways: Mapping[str, Gateway]) -> NodeRoutes:
    """What ``node`` must do: steer its identities' routes, and forward what it is a gateway for."""
    if not policy.routes or not gateways:
        return NodeRoutes()
    sources = _sources(policy)
    senders: dict[str, tuple[RouteChoice, ...]] = {}
    for key, actor in identities.bucket(("node", node)).items():
        choices = routes_of(policy, actor, gateways, sources)
        if choices:
            senders[key] = choices
    grants4: set[tuple[str, str]] = set()
    grants6: set[tuple[str, str]] = set()
    clients: set[str] = set()
    if node in gateways:
        for actor in _candidates(policy, identities, sources):
            if actor.node == node:
                continue
            for choice in routes_of(policy, actor, gateways, sources):
                if node not in choice.gateways:
                    continue
                version = ipaddress.ip_network(choice.prefix).version
                address = actor.ipv4 if version == 4 else actor.ipv6
                if address is not None:
                    (grants4 if version == 4 else grants6).add((address, choice.prefix))
                    clients.add(actor.node or "")
    return NodeRoutes(senders, frozenset(grants4), frozenset(grants6), frozenset(clients - {""}))


def _candidates(policy: Policy, identities: Identities, sources: list[SourceClass]) -> Iterable[Actor]:
    """Actors some route rule matches: only those can be granted anything."""
    for actor in identities.actors.values():
        if any(source.matches(actor) for source in sources):
            yield actor


def offer_users(policy: Policy, gateways: Mapping[str, Gateway]) -> dict[tuple[str, str], tuple[int, ...]]:
    """For ``routes list``: each (gateway, advertised prefix) and the rules that make it usable.

    A rule uses an offer when it names the gateway (directly or by tag) for a
    prefix inside the advertised one. An offer no rule uses carries nothing.
    """
    out: dict[tuple[str, str], tuple[int, ...]] = {}
    for name, gateway in sorted(gateways.items()):
        for offered in gateway.routes:
            net = ipaddress.ip_network(offered)
            users = tuple(
                index for index, route in enumerate(policy.routes)
                if any(p.version == net.version and p.subnet_of(net)  # type: ignore[arg-type]
                       and name in gateways_for(route, p, gateways) for p in route.to)
            )
            out[(name, offered)] = users
    return out


@dataclass(frozen=True)
class RouteDecision:
    """``policy explain`` for a destination address: the route taken, or why there is none."""

    address: str
    flow: str
    choice: RouteChoice | None
    rule_text: str

    def __str__(self) -> str:
        if self.choice is None:
            return f"no route: {self.flow}: {self.rule_text}"
        return f"route: {self.flow} via {', then '.join(self.choice.gateways)}: {self.rule_text}"


def explain_route(policy: Policy, actor: Actor, address: str, flow: str,
                  gateways: Mapping[str, Gateway] | None = None) -> RouteDecision:
    """The route ``actor`` gets to ``address``.

    With ``gateways`` (the mesh's offers) the gateways are the nodes that
    would carry it; without, the ``via`` entries as written (a file checked
    before any node advertises anything).
    """
    if gateways is None:
        choices: tuple[RouteChoice, ...] = _as_written(policy, actor)
    else:
        choices = routes_of(policy, actor, gateways)
    choice = route_for(choices, address)
    if choice is None:
        return RouteDecision(address, flow, None, "no routes rule matches this identity and a prefix containing "
                             "the address (it stays on the node's own routing table and cannot use a gateway)")
    where = policy.where("routes", choice.rule)
    label = f"routes[{choice.rule}]" + (f" at {where}" if where else "")
    return RouteDecision(address, flow, choice, f"{label}: {policy.routes[choice.rule].text()}")


def _as_written(policy: Policy, actor: Actor) -> tuple[RouteChoice, ...]:
    seen: set[str] = set()
    out: list[RouteChoice] = []
    for index, (route, source) in enumerate(zip(policy.routes, _sources(policy), strict=True)):
        if source.matches(actor):
            for prefix in route.to:
                if str(prefix) not in seen:
                    seen.add(str(prefix))
                    out.append(RouteChoice(str(prefix), tuple(str(v) for v in route.via), index))
    return tuple(out)
