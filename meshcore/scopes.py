"""Scopes: what an agent may do, as ``resource:action`` strings.

A scope has exactly two segments. Each segment is a name
(``[a-z0-9][a-z0-9._-]*``) or the wildcard ``*``, which stands for any name in
that position: ``web:*`` covers ``web:read`` and ``web:deploy``; ``*:*`` covers
everything. Attenuation is the rule that a delegated identity never holds more
than the one it came from: every scope of a child must be *within* some scope of
its parent. Two scopes *overlap* when some concrete ``resource:action`` lies
within both: ``db:*`` and ``db:write`` do, ``db:*`` and ``*:read`` do (in
``db:read``), ``db:read`` and ``db:write`` do not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidInput

__all__ = ["Scope", "parse_scope", "parse_scopes", "scope_within", "scopes_overlap", "scopes_within"]

_SEGMENT = re.compile(r"^(\*|[a-z0-9][a-z0-9._-]{0,62})\Z")


@dataclass(frozen=True, order=True)
class Scope:
    resource: str
    action: str

    def __str__(self) -> str:
        return f"{self.resource}:{self.action}"

    def within(self, other: Scope) -> bool:
        """True when every action this scope allows is also allowed by ``other``."""
        return _segment_within(self.resource, other.resource) and _segment_within(
            self.action, other.action
        )


def _segment_within(child: str, parent: str) -> bool:
    return parent == "*" or child == parent


def parse_scope(text: str) -> Scope:
    parts = text.split(":")
    if len(parts) != 2 or not all(_SEGMENT.match(p) for p in parts):
        raise InvalidInput(
            f"invalid scope {text!r}: expected resource:action, each a lower-case name or '*'"
        )
    return Scope(parts[0], parts[1])


def parse_scopes(texts: Iterable[str]) -> tuple[Scope, ...]:
    """Parse, de-duplicate and sort, so equal sets have equal encodings."""
    return tuple(sorted({parse_scope(t) for t in texts}))


def scope_within(child: Scope, parents: Iterable[Scope]) -> bool:
    return any(child.within(p) for p in parents)


def scopes_within(children: Iterable[Scope], parents: Iterable[Scope]) -> bool:
    """The attenuation check: every child scope lies within some parent scope."""
    parent_list = list(parents)
    return all(scope_within(c, parent_list) for c in children)


def _segments_overlap(a: str, b: str) -> bool:
    return a == b or a == "*" or b == "*"


def scopes_overlap(wanted: Scope, held: Scope) -> bool:
    """True when some concrete ``resource:action`` lies within both (each segment equal, or ``*`` on either side)."""
    return _segments_overlap(wanted.resource, held.resource) and _segments_overlap(wanted.action, held.action)
