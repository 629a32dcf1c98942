"""Source classes: a selector, resolved against the policy's groups, with a stable set name.

Every distinct selector (by meaning: :meth:`Selector.text`) becomes one
:class:`SourceClass` and, on a node, one pair of nftables address sets. The
set name is derived from the selector's text alone — not from the rule's
position, not from who currently matches — so reordering rules renames
nothing, and an identity joining or leaving changes set *elements*, never
rules. Group membership is resolved here, from the policy's ``groups``: a
change of membership is a policy change.

Scope matching: an agent matches ``scope: S`` when one of its scopes and
``S`` have an action in common — each segment equal, or ``*`` on either
side. So ``scope: "db:*"`` (any db action) matches an agent holding
``db:read``, and ``scope: "db:read"`` matches an agent holding ``db:*``
(it may read, among other things). An agent holding ``*:*`` matches every
scope selector.

Authorization matching: ``authorized: grant`` matches exactly the agents
whose identity says they were born from their principal's grant,
``authorized: delegation`` those born on their node's word; nodes acting
directly match neither. So rules that tell the two apart get two source
classes (two sets), and an agent is in the one its certificate names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..scopes import Scope, scopes_overlap
from .fields import Authorized
from .identities import Actor, Identities
from .model import Selector

__all__ = ["SourceClass", "resolve", "scopes_overlap", "set_name", "source_class"]


def set_name(selector_text: str) -> str:
    """``src_`` and 12 hex digits of SHA-256: short enough for any nftables set name."""
    return "src_" + hashlib.sha256(selector_text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SourceClass:
    """A selector ready to match actors: ``members`` is the group's principals, resolved."""

    name: str
    text: str
    via: Literal["direct", "agent", "any"]
    principal: str | None = None
    group: str | None = None
    members: frozenset[str] | None = None
    owner: str | None = None
    tag: str | None = None
    node: str | None = None
    agent: str | None = None
    scope: Scope | None = None
    authorized: Authorized | None = None

    def matches(self, actor: Actor) -> bool:
        """Every given field must hold (AND); a missing field matches anything."""
        return (
            (self.via == "any" or actor.via == self.via)
            and (self.principal is None or actor.principal == self.principal)
            and (self.members is None or actor.principal in self.members or self.group in actor.groups)
            and (self.owner is None or actor.owner == self.owner)
            and (self.tag is None or self.tag in actor.tags)
            and (self.node is None or actor.node == self.node)
            and (self.agent is None or actor.agent == self.agent)
            and (self.scope is None or any(scopes_overlap(self.scope, s) for s in actor.scopes))
            and (self.authorized is None or actor.authorized == self.authorized)
        )


def source_class(selector: Selector, groups: Mapping[str, Sequence[str]]) -> SourceClass:
    text = selector.text()
    return SourceClass(
        name=set_name(text),
        text=text,
        via=selector.effective_via,
        principal=selector.principal,
        group=selector.group,
        members=None if selector.group is None else frozenset(groups.get(selector.group, ())),
        owner=selector.owner,
        tag=selector.tag,
        node=selector.node,
        agent=selector.agent,
        scope=selector.scope,
        authorized=selector.authorized,
    )


def resolve(source: SourceClass, identities: Identities) -> tuple[frozenset[str], frozenset[str]]:
    """The IPv4 and IPv6 addresses of every actor ``source`` matches.

    The index narrows the candidates to the smallest bucket a given field
    names (a group is the union of its members' buckets, a scope the union
    of the agents holding its resource, or ``*``); only those are matched
    field by field. So a narrow selector costs its members, not the mesh.
    (``authorized`` has no bucket: it narrows the candidates of the other
    fields, or of ``via: agent``.)
    """
    candidates: Mapping[str, Actor] | None = None
    for bucket_key in _bucket_keys(source):
        bucket = identities.bucket(bucket_key)
        if candidates is None or len(bucket) < len(candidates):
            candidates = bucket
    exact = _one_lookup(source)
    for keys in _union_keys(source):
        # with one field, its union *is* the answer; otherwise take it only if it is smaller
        if not exact and candidates is not None and sum(len(identities.bucket(k)) for k in keys) >= len(candidates):
            continue
        union: dict[str, Actor] = {}
        for key in keys:
            union.update(identities.bucket(key))
        candidates = union
    pool: Iterable[Actor] = identities.actors.values() if candidates is None else candidates.values()
    if not exact:
        matches = source.matches
        pool = [actor for actor in pool if matches(actor)]
    else:
        pool = list(pool)
    return (frozenset(a.ipv4 for a in pool if a.ipv4 is not None),
            frozenset(a.ipv6 for a in pool if a.ipv6 is not None))


def _one_lookup(source: SourceClass) -> bool:
    """True when the candidates are exactly the members, so matching them again can be skipped.

    That is a selector with one field (``via`` implied by ``scope``/``agent``
    does not count), whose bucket or union of buckets is its meaning — except
    a fully concrete scope: the agents holding ``db:*`` or ``db:write`` are
    candidates for ``db:read``, and only the first overlaps it. ``authorized``
    is never looked up (no bucket), so a selector naming it is always matched.
    """
    if source.authorized is not None:
        return False
    fields = [f for f in (source.principal, source.members, source.owner, source.tag, source.node, source.agent,
                          source.scope) if f is not None]
    implied = source.scope is not None or source.agent is not None
    if len(fields) + (source.via != "any" and not implied) > 1:
        return False
    return source.scope is None or "*" in (source.scope.resource, source.scope.action)


def _union_keys(source: SourceClass) -> list[list[tuple[str, str]]]:
    """Fields whose candidates are a union of buckets: a group's members; a scope's resource or action."""
    out = []
    if source.members is not None:
        out.append([("principal", p) for p in sorted(source.members)])
    scope = source.scope
    if scope is not None and scope.resource != "*":
        out.append([("scope.resource", scope.resource), ("scope.resource", "*")])
    elif scope is not None and scope.action != "*":
        out.append([("scope.action", scope.action), ("scope.action", "*")])
    return out


def _bucket_keys(source: SourceClass) -> list[tuple[str, str]]:
    keys = [(name, value) for name, value in (
        ("principal", source.principal), ("owner", source.owner), ("tag", source.tag),
        ("node", source.node), ("agent", source.agent),
    ) if value is not None]
    if source.via != "any":
        keys.append(("via", source.via))
    return keys
