"""Delegations: which nodes may mint agents for which principal, with which
scopes, for how long, and when the principal's own grant is needed. Pure:
the controller asks before it signs.

A request is granted when ONE delegation covers all of it: the principal
is the delegation's, the requesting node is named by one of its ``nodes``
(``node:``, ``tag:`` or ``owner:``), every requested scope lies within its
scopes, the lifetime is at most its ``max_ttl``, and — unless the request
carries a verified grant — the delegation does not require a grant for it.
As with acls, the delegations are a union: order does not matter.

``requires_grant`` says when the node's word is not enough:

* ``false`` (the default): never — for unattended automation;
* ``true``: always;
* a list of scope patterns: when ANY requested scope *overlaps* one of them,
  that is, when some concrete ``resource:action`` lies within both
  (:func:`~meshcore.scopes.scopes_overlap`). With ``requires_grant:
  ["db:write"]`` a request for ``db:write`` or ``db:*`` (which covers
  ``db:write``) needs a grant, one for ``db:read`` or ``web:*`` does not. A
  request is judged as a whole: ``[db:read, db:write]`` needs a grant.

A pattern that overlaps none of the delegation's own scopes could never
match a request the delegation covers, so it is a validation error (see
:mod:`.checks`), as is an empty list (write ``false``).

Checked here: whether the request *needs* a grant. Checked by the caller:
that the grant it carries is genuine (signed by the principal's key, for
this node, not expired or used up) and that the request lies within it —
:func:`within_grant` does the scopes and lifetime part of that, purely.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from ..durations import format_duration
from ..errors import PermissionDenied
from ..scopes import Scope, scopes_overlap, scopes_within
from .fields import NodeSpec
from .identities import NodeIdentity
from .model import Delegation, Policy

__all__ = ["check_delegation", "grant_needed_for", "node_named", "within_grant"]


def node_named(spec: NodeSpec, node: NodeIdentity) -> bool:
    if spec.kind == "node":
        return spec.name == node.name
    if spec.kind == "tag":
        return spec.name in node.tags
    return spec.name == node.owner


def grant_needed_for(delegation: Delegation, scopes: Sequence[Scope]) -> tuple[Scope, ...]:
    """The requested scopes for which ``delegation`` requires a grant (all of them for ``true``)."""
    rule = delegation.requires_grant
    if rule is True:
        return tuple(scopes)
    if rule is False:
        return ()
    return tuple(s for s in scopes if any(scopes_overlap(s, pattern) for pattern in rule))


def _needs_grant(delegation: Delegation, scopes: Sequence[Scope]) -> bool:
    return delegation.requires_grant is True or bool(grant_needed_for(delegation, scopes))


def check_delegation(policy: Policy, principal: str, node: NodeIdentity, scopes: Sequence[Scope],
                     ttl: timedelta, *, granted: bool = False) -> Delegation:
    """The delegation that grants the request, or PermissionDenied naming what is missing.

    ``granted``: the request carries a grant the caller has verified (its
    signature, node, expiry, and :func:`within_grant`). Without one, a
    delegation that requires a grant for these scopes does not cover the
    request. When that is the only reason no delegation covers it, the
    refusal says so and how to get one; other refusals are as without
    ``requires_grant``. Of several covering delegations, the first in file
    order is returned.
    """
    mine = [(i, d) for i, d in enumerate(policy.delegations) if d.principal == principal]
    if not mine:
        raise PermissionDenied(f"no delegation lets any node mint agents for {principal}")
    on_node = [(i, d) for i, d in mine if any(node_named(spec, node) for spec in d.nodes)]
    if not on_node:
        raise PermissionDenied(f"no delegation lets node {node.name} mint agents for {principal} "
                               f"(delegated to {', '.join(str(s) for _, d in mine for s in d.nodes)})")
    wanted = ", ".join(str(s) for s in scopes)
    in_scope = [(i, d) for i, d in on_node if scopes_within(scopes, d.scopes)]
    if not in_scope:
        held = "; ".join(", ".join(str(s) for s in d.scopes) for _, d in on_node)
        raise PermissionDenied(f"no delegation grants {principal} the scope(s) {wanted} on node {node.name} "
                               f"(delegated: {held})")
    in_time = [(i, d) for i, d in in_scope if ttl <= d.max_ttl]
    if not in_time:
        longest = max(d.max_ttl for _, d in in_scope)
        raise PermissionDenied(f"lifetime {format_duration(ttl)} exceeds the delegation's max_ttl "
                               f"{format_duration(longest)} for {principal} on node {node.name}")
    for _, d in in_time:
        if granted or not _needs_grant(d, scopes):
            return d
    index, first = in_time[0]
    raise PermissionDenied(_grant_needed(policy, index, grant_needed_for(first, scopes), principal, node, scopes))


def _grant_needed(policy: Policy, index: int, needing: Sequence[Scope], principal: str, node: NodeIdentity,
                  scopes: Sequence[Scope]) -> str:
    where = policy.where("delegations", index)
    label = f"delegations[{index}]" + (f" at {where}" if where else "")
    if not needing:  # requires_grant: true and a request without scopes
        what = "an agent needs"
    elif len(needing) == 1:
        what = f"scope {needing[0]} needs"
    else:
        what = f"scopes {', '.join(str(s) for s in needing)} need"
    command = " ".join([f"meshctl grant create --node {node.name}", *(f"--scope {s}" for s in scopes)])
    return f"{what} a grant from {principal} ({label} requires_grant); ask them for one: {command}"


def within_grant(scopes: Sequence[Scope], ttl: timedelta, grant_scopes: Sequence[Scope],
                 grant_ttl_left: timedelta) -> str | None:
    """What in a request lies outside the grant it carries, as one sentence; None when it fits.

    Every requested scope must lie within the grant's scopes (the same
    attenuation rule as for sub-agents) and the lifetime must end no later
    than the grant (``grant_ttl_left``: its expiry minus now). A caller that
    prefers to shorten the lifetime to the grant's end, as it does for
    sub-agents, passes the shortened ``ttl``.
    """
    if grant_ttl_left <= timedelta(0):
        return "the grant has expired"
    outside = [s for s in scopes if not scopes_within((s,), grant_scopes)]
    if outside:
        return (f"scope(s) {', '.join(str(s) for s in outside)} lie outside the grant "
                f"(it grants {', '.join(str(s) for s in grant_scopes)})")
    if ttl > grant_ttl_left:
        return (f"lifetime {format_duration(ttl)} outlasts the grant, which ends in "
                f"{format_duration(grant_ttl_left)}")
    return None
