"""Identity-based routes in the kernel: ip rules and routing tables converged to a :class:`RoutingPlan`.

``apply(plan)`` reads what of ours is installed, and sends only the
difference (nothing at all when they are equal). What is ours:

* a rule whose priority is one of :data:`meshd.routes.plan.PRIORITIES` and
  whose table is main (254) or one of 5180-5299, and which selects on
  nothing but the mark and the input interface (a rule someone else made
  with other selectors there is left alone);
* a route in a table 5180-5299: every ``throw`` route, and ``unicast``
  routes carrying our protocol number :data:`meshd.kernel.netconf.ROUTE_PROTO`.

Everything we add carries that protocol number (``ip rule`` and ``ip route``
show ``proto 108``). Order: new and changed routes first (a changed route is
replaced in place, so its prefix is never unrouted), then new rules, then
stale rules, then stale routes: a rule never points at a table that is
being emptied, and traffic keeps a path while the plan changes.

Routes name interfaces; every interface of a plan must exist before it is
applied (the caller creates the tunnels first): one that does not raises
:class:`Unavailable` before anything is sent.

:class:`FakePolicyRouting` keeps the plan in memory for tests of callers.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from meshcore.errors import Unavailable
from meshd.kernel.netconf import ROUTE_PROTO
from meshd.kernel.netlink import NetlinkError, netlink_error
from meshd.routes.plan import MAIN_TABLE, PRIORITIES, TABLE_GATEWAY, TABLE_LAST, RoutingPlan, Rule, TableRoute

__all__ = ["TABLES", "FakePolicyRouting", "IPRoutePolicyRouting", "PolicyRouting"]

TABLES = range(TABLE_GATEWAY, TABLE_LAST + 1)
"""The routing tables that belong to idmesh (5180-5299)."""

log = logging.getLogger("meshd.routes.tables")
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_RTN_UNICAST, _RTN_THROW = 1, 9
_FR_ACT_TO_TBL = 1
_ALL_BITS = 0xFFFFFFFF


class PolicyRouting(Protocol):
    """The ip rules and routing tables of identity-based routes: ``apply`` converges, ``close`` removes all."""

    def apply(self, plan: RoutingPlan) -> None: ...

    def close(self) -> None: ...


def _normal(rule: Rule) -> Rule:
    """The rule as the kernel reports it: a mark without a mask is an exact match, a mask alone matches 0."""
    mark, mask = rule.fwmark, rule.fwmask
    if mark is not None and mask is None:
        mask = None if mark == 0 else _ALL_BITS
    if mask is not None and mark is None:
        mark = 0
    if mask is None:
        mark = None
    return Rule(rule.family, rule.priority, rule.table, mark, mask, rule.iif)


def _normal_plan(plan: RoutingPlan) -> RoutingPlan:
    return RoutingPlan(frozenset(map(_normal, plan.rules)), plan.routes)


def _interfaces(routes: Iterable[TableRoute]) -> set[str]:
    return {r.ifname for r in routes if r.kind == "unicast" and r.ifname is not None}


def _route_key(route: TableRoute) -> tuple[int, int, str]:
    return route.family, route.table, route.prefix


def _route_order(route: TableRoute) -> tuple[int, int, int, int, str]:
    net = ipaddress.ip_network(route.prefix)
    return route.table, net.version, int(net.network_address), net.prefixlen, route.kind


def _rule_order(rule: Rule) -> tuple[int, int, int, int]:
    return rule.priority, rule.family, rule.table, rule.fwmark or 0


class IPRoutePolicyRouting:
    """:class:`PolicyRouting` on the current network namespace through one rtnetlink socket kept open."""

    def __init__(self) -> None:
        try:
            self._ipr: Any = IPRoute()
        except (NetlinkError, OSError) as exc:
            raise Unavailable(f"policy routing: cannot open an rtnetlink socket: {exc}") from exc
        self._lock = threading.Lock()
        self._closed = False

    # -- reading ----------------------------------------------------------------------------------------------
    def _links(self) -> dict[int, str]:
        return {int(msg["index"]): str(msg.get_attr("IFLA_IFNAME")) for msg in self._ipr.get_links()}

    def _rules(self) -> set[Rule]:
        rules = set()
        for family, af in _AF.items():
            for msg in self._ipr.get_rules(family=af):
                priority = msg.get_attr("FRA_PRIORITY") or 0
                table = msg.get_attr("FRA_TABLE") or msg["table"]
                plain = (msg["action"] == _FR_ACT_TO_TBL and msg["src_len"] == 0 and msg["dst_len"] == 0
                         and msg["flags"] == 0 and msg["tos"] == 0
                         and all(msg.get_attr(a) is None for a in ("FRA_OIFNAME", "FRA_UID_RANGE", "FRA_IP_PROTO",
                                                                    "FRA_L3MDEV", "FRA_SPORT_RANGE",
                                                                    "FRA_DPORT_RANGE", "FRA_GOTO")))
                if priority not in PRIORITIES or not (table == MAIN_TABLE or table in TABLES) or not plain:
                    continue
                mask = msg.get_attr("FRA_FWMASK")
                mark = msg.get_attr("FRA_FWMARK") or (0 if mask is not None else None)
                rules.add(Rule(family, priority, table, mark, mask, msg.get_attr("FRA_IIFNAME")))
        return rules

    def _routes(self, links: dict[int, str]) -> set[TableRoute]:
        routes = set()
        for family, af in _AF.items():
            for msg in self._ipr.get_routes(family=af):
                table = msg.get_attr("RTA_TABLE") or msg["table"]
                if table not in TABLES or msg["src_len"] != 0:
                    continue
                dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == 4 else "::")
                prefix = str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}"))
                if msg["type"] == _RTN_THROW:
                    routes.add(TableRoute(table, prefix, None, "throw"))
                elif (msg["type"] == _RTN_UNICAST and msg["proto"] == ROUTE_PROTO
                      and msg.get_attr("RTA_OIF") in links and msg.get_attr("RTA_GATEWAY") is None):
                    routes.add(TableRoute(table, prefix, links[msg.get_attr("RTA_OIF")], "unicast",
                                          msg.get_attr("RTA_PREFSRC")))
        return routes

    def _read(self) -> tuple[RoutingPlan, dict[int, str]]:
        links = self._links()
        return RoutingPlan(frozenset(self._rules()), frozenset(self._routes(links))), links

    def installed(self) -> RoutingPlan:
        """What of ours is in the kernel now (rules as the kernel reports them: see :func:`_normal`)."""
        with self._lock:
            self._require_open()
            try:
                return self._read()[0]
            except NetlinkError as exc:
                raise netlink_error(exc, "reading ip rules and routes") from exc

    # -- writing ----------------------------------------------------------------------------------------------
    def apply(self, plan: RoutingPlan) -> None:
        """Converge rules and routes to ``plan``: add what is missing, delete what is stale, send nothing else."""
        with self._lock:
            self._require_open()
            self._apply(_normal_plan(plan))

    def _apply(self, plan: RoutingPlan) -> None:
        try:
            current, links = self._read()
        except NetlinkError as exc:
            raise netlink_error(exc, "reading ip rules and routes") from exc
        index = {name: i for i, name in links.items()}
        missing = sorted(_interfaces(plan.routes) - set(index))
        if missing:
            raise Unavailable(f"policy routing: interface {', '.join(missing)} does not exist "
                              "(create it before routing through it)")
        wanted_keys = {_route_key(r) for r in plan.routes}
        add_routes = sorted(plan.routes - current.routes, key=_route_order)
        add_rules = sorted(plan.rules - current.rules, key=_rule_order)
        del_rules = sorted(current.rules - plan.rules, key=_rule_order)
        # A route whose prefix stays in its table has just been replaced in place: nothing to delete.
        del_routes = sorted((r for r in current.routes - plan.routes if _route_key(r) not in wanted_keys),
                            key=_route_order)
        for route in add_routes:
            self._route("replace", route, index)
        for rule in add_rules:
            self._rule("add", rule)
        for rule in del_rules:
            self._rule("del", rule)
        for route in del_routes:
            self._route("del", route, index)
        if add_routes or add_rules or del_rules or del_routes:
            log.info("policy routing: %d routes set, %d rules added, %d rules and %d routes removed",
                     len(add_routes), len(add_rules), len(del_rules), len(del_routes))

    def _route(self, command: str, route: TableRoute, index: dict[str, int]) -> None:
        spec: dict[str, Any] = {"family": _AF[route.family], "dst": route.prefix, "table": route.table}
        if route.kind == "throw":
            spec["type"] = _RTN_THROW
            if command != "del":
                spec["proto"] = ROUTE_PROTO
        else:
            spec.update(type=_RTN_UNICAST, proto=ROUTE_PROTO)
            if route.ifname is not None and route.ifname in index:
                spec["oif"] = index[route.ifname]
            if route.src is not None and command != "del":
                spec["prefsrc"] = route.src
        try:
            self._ipr.route(command, **spec)
        except NetlinkError as exc:
            if command == "del" and exc.code in (errno.ESRCH, errno.ENOENT):
                return  # gone already: the outcome is what we want
            what = f"table {route.table}: {route.kind} route {route.prefix}"
            raise netlink_error(exc, what + (f" dev {route.ifname}" if route.ifname else "")) from exc

    def _rule(self, command: str, rule: Rule) -> None:
        spec: dict[str, Any] = {"family": _AF[rule.family], "priority": rule.priority, "table": rule.table}
        if command == "add":
            spec["protocol"] = ROUTE_PROTO
        if rule.fwmask is not None:
            spec.update(fwmark=rule.fwmark or 0, fwmask=rule.fwmask)
        if rule.iif is not None:
            spec["iifname"] = rule.iif
        try:
            self._ipr.rule(command, **spec)
        except NetlinkError as exc:
            if (command == "add" and exc.code == errno.EEXIST) or (command == "del" and exc.code == errno.ENOENT):
                return  # someone did it between our read and our write
            raise netlink_error(exc, f"ip rule {command} {rule}") from exc

    def _require_open(self) -> None:
        if self._closed:
            raise Unavailable("policy routing is closed")

    def close(self) -> None:
        """Remove every rule and route of ours (also ones a crashed meshd left), then close the socket."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._apply(RoutingPlan())
            finally:
                self._ipr.close()


class FakePolicyRouting:
    """:class:`PolicyRouting` in memory: ``plan`` is what would be installed, ``applied`` every plan sent.

    With ``interfaces`` given, a plan routing through any other interface is
    refused like the real one refuses a missing interface.
    """

    def __init__(self, interfaces: Iterable[str] | None = None) -> None:
        self.interfaces = None if interfaces is None else set(interfaces)
        self.plan = RoutingPlan()
        self.applied: list[RoutingPlan] = []
        self.closed = False

    def installed(self) -> RoutingPlan:
        return self.plan

    def apply(self, plan: RoutingPlan) -> None:
        if self.closed:
            raise Unavailable("policy routing is closed")
        missing = sorted(_interfaces(plan.routes) - self.interfaces) if self.interfaces is not None else []
        if missing:
            raise Unavailable(f"policy routing: interface {', '.join(missing)} does not exist "
                              "(create it before routing through it)")
        self.applied.append(plan)
        self.plan = _normal_plan(plan)

    def close(self) -> None:
        self.plan = RoutingPlan()
        self.closed = True
