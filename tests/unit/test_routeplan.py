"""Identity-based routes as data: which rules and tables :func:`plan_routing` asks for, and what it refuses."""

from __future__ import annotations

import itertools

import pytest

from meshcore.errors import InvalidInput, Unavailable
from meshd.routes.plan import (
    BYPASS_MARK,
    GATEWAY_MARK,
    PRIO_AGENT,
    PRIO_BYPASS,
    PRIO_FALLBACK,
    PRIO_GATEWAY,
    PRIO_NODE,
    TABLE_FALLBACK,
    TABLE_FIRST,
    TABLE_GATEWAY,
    TABLE_LAST,
    RoutingPlan,
    Rule,
    SenderRoutes,
    TableRoute,
    plan_routing,
)
from meshd.routes.tables import FakePolicyRouting

MASK = 0xFFF00000
STEER = MASK | BYPASS_MARK
A1, A2, A3 = 0x00100000, 0x00200000, 0x00300000
V4, V6 = "100.64.0.1", "fd12:3456:789a::1"
OVERLAY = ("100.64.0.0/10", "fd12:3456:789a::/48")
CONTROLLER = "198.51.100.11/32"
EXIT = (("0.0.0.0/0", "rt-gw1"), ("::/0", "rt-gw1"))


def plan(*senders: SenderRoutes, gateway: str | None = None, bypass: tuple[str, ...] = (CONTROLLER,)) -> RoutingPlan:
    return plan_routing(senders, mark_mask=MASK, mesh_ifname="idmesh0", overlay=OVERLAY, addresses=(V4, V6),
                        bypass=bypass, gateway_ifname=gateway)


def table(p: RoutingPlan, number: int) -> set[TableRoute]:
    return {r for r in p.routes if r.table == number}


def throws(number: int, *, v6: bool = True) -> set[TableRoute]:
    out = {TableRoute(number, "100.64.0.0/10", None, "throw"), TableRoute(number, CONTROLLER, None, "throw")}
    if v6:
        out.add(TableRoute(number, "fd12:3456:789a::/48", None, "throw"))
    return out


def test_no_senders_give_an_empty_plan() -> None:
    assert plan() == RoutingPlan(frozenset(), frozenset())
    assert plan(SenderRoutes(A1, ()), SenderRoutes(None, ())) == RoutingPlan()  # senders without routes get nothing


def test_an_agent_with_an_exit_route_gets_rules_a_table_with_throws_the_fallback_and_the_bypass_rule() -> None:
    p = plan(SenderRoutes(A1, EXIT))
    assert p.rules == {
        Rule(4, PRIO_AGENT, TABLE_FIRST, fwmark=A1, fwmask=STEER),
        Rule(6, PRIO_AGENT, TABLE_FIRST, fwmark=A1, fwmask=STEER),
        Rule(4, PRIO_BYPASS, 254, fwmark=BYPASS_MARK, fwmask=BYPASS_MARK),
        Rule(6, PRIO_BYPASS, 254, fwmark=BYPASS_MARK, fwmask=BYPASS_MARK),
        Rule(4, PRIO_FALLBACK, TABLE_FALLBACK, fwmark=0, fwmask=BYPASS_MARK, iif="lo"),
        Rule(6, PRIO_FALLBACK, TABLE_FALLBACK, fwmark=0, fwmask=BYPASS_MARK, iif="lo"),
    }
    assert table(p, TABLE_FIRST) == {
        TableRoute(TABLE_FIRST, "0.0.0.0/0", "rt-gw1", src=V4),
        TableRoute(TABLE_FIRST, "::/0", "rt-gw1", src=V6),
    } | throws(TABLE_FIRST)
    assert table(p, TABLE_FALLBACK) == {
        TableRoute(TABLE_FALLBACK, "0.0.0.0/0", "idmesh0", src=V4),
        TableRoute(TABLE_FALLBACK, "::/0", "idmesh0", src=V6),
    }
    assert {r.table for r in p.routes} == {TABLE_FIRST, TABLE_FALLBACK}


def test_a_family_without_routes_gets_no_rules_and_no_throws() -> None:
    p = plan(SenderRoutes(A1, (("10.20.0.0/16", "rt-gw1"),)))
    assert {r.family for r in p.rules} == {4}
    assert table(p, TABLE_FIRST) == {TableRoute(TABLE_FIRST, "10.20.0.0/16", "rt-gw1", src=V4)} | throws(
        TABLE_FIRST, v6=False)


def test_agents_with_the_same_routes_share_one_table() -> None:
    p = plan(SenderRoutes(A1, EXIT), SenderRoutes(A2, tuple(reversed(EXIT))))
    agent_rules = {r for r in p.rules if r.priority == PRIO_AGENT}
    assert agent_rules == {Rule(f, PRIO_AGENT, TABLE_FIRST, fwmark=m, fwmask=STEER) for f in (4, 6) for m in (A1, A2)}
    assert {r.table for r in p.routes} == {TABLE_FIRST, TABLE_FALLBACK}


def test_agents_sent_to_different_gateways_for_the_same_prefix_get_two_tables() -> None:
    p = plan(SenderRoutes(A1, (("10.20.0.0/16", "rt-gw1"),)), SenderRoutes(A2, (("10.20.0.0/16", "rt-gw2"),)))
    assert {r for r in p.rules if r.priority == PRIO_AGENT} == {
        Rule(4, PRIO_AGENT, TABLE_FIRST, fwmark=A1, fwmask=STEER),
        Rule(4, PRIO_AGENT, TABLE_FIRST + 1, fwmark=A2, fwmask=STEER),
    }
    assert TableRoute(TABLE_FIRST, "10.20.0.0/16", "rt-gw1", src=V4) in p.routes
    assert TableRoute(TABLE_FIRST + 1, "10.20.0.0/16", "rt-gw2", src=V4) in p.routes
    assert table(p, TABLE_FALLBACK) == {TableRoute(TABLE_FALLBACK, "10.20.0.0/16", "idmesh0", src=V4)}  # the union


def test_the_node_is_matched_as_locally_generated_traffic_without_an_agent_mark() -> None:
    p = plan(SenderRoutes(None, (("10.20.0.0/16", "rt-gw1"),)))
    assert {r for r in p.rules if r.priority == PRIO_NODE} == {
        Rule(4, PRIO_NODE, TABLE_FIRST, fwmark=0, fwmask=STEER, iif="lo")}
    assert not any(r.priority == PRIO_AGENT for r in p.rules)


def test_a_gateway_routes_marked_replies_back_into_its_gateway_interface() -> None:
    p = plan(gateway="gw0")
    assert p.rules == {Rule(f, PRIO_GATEWAY, TABLE_GATEWAY, fwmark=GATEWAY_MARK, fwmask=GATEWAY_MARK) for f in (4, 6)}
    assert p.routes == {TableRoute(TABLE_GATEWAY, "100.64.0.0/10", "gw0"),
                        TableRoute(TABLE_GATEWAY, "fd12:3456:789a::/48", "gw0")}
    both = plan(SenderRoutes(A1, EXIT), gateway="gw0")
    assert p.rules < both.rules and p.routes < both.routes


def test_overlay_and_bypass_prefixes_are_never_steered() -> None:
    p = plan(SenderRoutes(A1, (("198.51.100.11/32", "rt-gw1"), ("100.64.8.0/24", "rt-gw1"))))
    assert p == RoutingPlan()


@pytest.mark.parametrize(("senders", "message"), [
    ([SenderRoutes(A1, (("10.20.0.1/16", "rt-gw1"),))], "without host bits"),
    ([SenderRoutes(A1, (("10.20.0.0/33", "rt-gw1"),))], "without host bits"),
    ([SenderRoutes(A1, (("gateway", "rt-gw1"),))], "without host bits"),
    ([SenderRoutes(A1, (("10.20.0.0/16", "rt gw1"),))], "interface name"),
    ([SenderRoutes(A1, (("10.20.0.0/16", "rt-gw1"), ("10.20.0.0/16", "rt-gw2")))], "two interfaces"),
    ([SenderRoutes(0x00000100, EXIT)], "inside mask"),
    ([SenderRoutes(A1 | BYPASS_MARK, EXIT)], "inside mask"),
    ([SenderRoutes(0, EXIT)], "inside mask"),
    ([SenderRoutes(A1, EXIT), SenderRoutes(A1, ())], "given twice"),
    ([SenderRoutes(None, EXIT), SenderRoutes(None, EXIT)], "given twice"),
])
def test_bad_prefixes_interfaces_and_marks_are_refused(senders: list[SenderRoutes], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        plan(*senders)


def test_bad_overlay_bypass_addresses_and_mask_are_refused() -> None:
    with pytest.raises(InvalidInput, match="overlay prefix"):
        plan_routing([], mark_mask=MASK, mesh_ifname="idmesh0", overlay=("100.64.0.1/10",), addresses=(V4, V6))
    with pytest.raises(InvalidInput, match="bypass prefix"):
        plan(bypass=("198.51.100.11/24",))
    with pytest.raises(InvalidInput, match="IPv4 address"):
        plan_routing([], mark_mask=MASK, mesh_ifname="idmesh0", overlay=OVERLAY, addresses=(V6, V6))
    with pytest.raises(InvalidInput, match="clear of"):
        plan_routing([], mark_mask=MASK | GATEWAY_MARK, mesh_ifname="idmesh0", overlay=OVERLAY, addresses=(V4, V6))


def test_too_many_distinct_route_sets_are_refused() -> None:
    capacity = TABLE_LAST - TABLE_FIRST + 1
    senders = [SenderRoutes((n + 1) << 20, ((f"10.{n}.0.0/16", "rt-gw1"),)) for n in range(capacity)]
    assert max(r.table for r in plan(*senders).routes) == TABLE_LAST
    with pytest.raises(InvalidInput, match="routing tables"):
        plan(*senders, SenderRoutes((capacity + 1) << 20, (("10.250.0.0/16", "rt-gw1"),)))


def test_table_numbers_do_not_depend_on_the_order_of_senders() -> None:
    senders = [SenderRoutes(A1, (("10.20.0.0/16", "rt-gw2"),)), SenderRoutes(A2, EXIT),
               SenderRoutes(None, (("10.20.0.0/16", "rt-gw1"),)), SenderRoutes(A3, (("10.20.0.0/16", "rt-gw2"),))]
    plans = {plan(*order) for order in itertools.permutations(senders)}
    assert len(plans) == 1
    (p,) = plans
    # sorted by the sorted routes: IPv4 0.0.0.0/0 first, then 10.20.0.0/16 via rt-gw1, then via rt-gw2
    assert Rule(4, PRIO_AGENT, TABLE_FIRST, fwmark=A2, fwmask=STEER) in p.rules
    assert Rule(4, PRIO_NODE, TABLE_FIRST + 1, fwmark=0, fwmask=STEER, iif="lo") in p.rules
    assert Rule(4, PRIO_AGENT, TABLE_FIRST + 2, fwmark=A3, fwmask=STEER) in p.rules


def test_the_fake_driver_keeps_the_plan_and_refuses_missing_interfaces_like_the_real_one() -> None:
    routing = FakePolicyRouting(interfaces={"rt-gw1", "idmesh0"})
    p = plan(SenderRoutes(A1, EXIT))
    routing.apply(p)
    assert routing.installed() == p and routing.applied == [p]
    with pytest.raises(Unavailable, match="interface rt-gw2 does not exist"):
        routing.apply(plan(SenderRoutes(A1, (("10.20.0.0/16", "rt-gw2"),))))
    assert routing.installed() == p
    routing.close()
    assert routing.installed() == RoutingPlan()
    with pytest.raises(Unavailable, match="closed"):
        routing.apply(p)
