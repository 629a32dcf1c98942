"""Delegations: which nodes may mint agents for which principal, with which
scopes and for how long. Pure: the controller asks before it signs.

A request is granted when ONE delegation covers all of it: the principal
is the delegation's, the requesting node is named by one of its ``nodes``
(``node:``, ``tag:`` or ``owner:``), every requested scope lies within its
scopes, and the lifetime is at most its ``max_ttl``. As with acls, the
delegations are a union: order does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from ..durations import format_duration
from ..errors import PermissionDenied
from ..scopes import Scope, scopes_within
from .fields import NodeSpec
from .identities import NodeIdentity
from .model import Delegation, Policy

__all__ = ["check_delegation", "node_named"]


def node_named(spec: NodeSpec, node: NodeIdentity) -> bool:
    if spec.kind == "node":
        return spec.name == node.name
    if spec.kind == "tag":
        return spec.name in node.tags
    return spec.name == node.owner


def check_delegation(policy: Policy, principal: str, node: NodeIdentity, scopes: Sequence[Scope],
                     ttl: timedelta) -> Delegation:
    """The delegation that grants the request, or PermissionDenied naming what is missing."""
    mine = [d for d in policy.delegations if d.principal == principal]
    if not mine:
        raise PermissionDenied(f"no delegation lets any node mint agents for {principal}")
    on_node = [d for d in mine if any(node_named(spec, node) for spec in d.nodes)]
    if not on_node:
        raise PermissionDenied(f"no delegation lets node {node.name} mint agents for {principal} "
                               f"(delegated to {', '.join(str(s) for d in mine for s in d.nodes)})")
    wanted = ", ".join(str(s) for s in scopes)
    in_scope = [d for d in on_node if scopes_within(scopes, d.scopes)]
    if not in_scope:
        held = "; ".join(", ".join(str(s) for s in d.scopes) for d in on_node)
        raise PermissionDenied(f"no delegation grants {principal} the scope(s) {wanted} on node {node.name} "
                               f"(delegated: {held})")
    for d in in_scope:
        if ttl <= d.max_ttl:
            return d
    longest = max(d.max_ttl for d in in_scope)
    raise PermissionDenied(f"lifetime {format_duration(ttl)} exceeds the delegation's max_ttl "
                           f"{format_duration(longest)} for {principal} on node {node.name}")
