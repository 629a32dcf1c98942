"""The routes nodes offer, each with the policy rules that make it usable (``meshctl routes list``).

An offer is the node's (recorded by :mod:`controller.endpoints`), its use is
the policy's; listing them side by side is how an admin sees an offer
nobody uses, or a rule no gateway serves. It only reads; which rule uses
which offer is decided by the policy package (``offer_users``), not here.
"""

from __future__ import annotations

import ipaddress

from meshcore.policy import Gateway, Policy, offer_users
from meshcore.wire.api import RouteInfo

from .context import Context
from .policies import in_force

__all__ = ["list_routes"]


def list_routes(ctx: Context) -> list[RouteInfo]:
    """Every advertised route and the policy rules that make it usable."""
    with ctx.store.transaction() as tx:
        rows = tx.nodes()
    gateways = {r.name: Gateway(r.name, frozenset(r.tags), tuple(r.routing.get("routes", ()))) for r in rows}
    gateways = {n: g for n, g in gateways.items() if g.routes}
    policy = in_force(ctx) or Policy()
    out = []
    for (name, prefix), rules in sorted(offer_users(policy, gateways).items()):
        labels = [f"routes[{i}]" + (f" at {where}" if (where := policy.where("routes", i)) else "")
                  + f": {policy.routes[i].text()}" for i in rules]
        out.append(RouteInfo(node=name, tags=sorted(gateways[name].tags), prefix=prefix,
                             exit=ipaddress.ip_network(prefix).prefixlen == 0, enabled_by=labels))
    return out
