"""A node's live copy of the netmap, changed in place by each delta (pure).

The messages themselves are wire types (:mod:`meshcore.wire.stream`); this
is what a node does with them. Applying a delta costs what the delta
holds, not what the mesh holds.
"""

from __future__ import annotations

from meshcore.wire.stream import Netmap, NetmapDelta, PeerNode

__all__ = ["NodeView", "ResyncNeeded"]


class ResyncNeeded(Exception):
    """A delta does not follow the map it was given: fetch a full map."""


class NodeView:
    """A node's live copy of the netmap, changed in place by each delta.

    In place, because the cost of a delta must not grow with the mesh: a
    10,000-node map is never copied to change one entry.
    """

    def __init__(self, full: Netmap) -> None:
        self.version = full.version
        self.domain = full.domain
        self.prefixes = full.prefixes
        self.nodes: dict[str, PeerNode] = dict(full.nodes)

    def apply(self, delta: NetmapDelta) -> tuple[list[PeerNode], list[str]]:
        """Apply ``delta``; return (nodes added or changed, names removed).

        Raises :class:`ResyncNeeded` on a version gap, leaving the view as it was.
        """
        if delta.version <= self.version:
            return [], []  # already contained in the full map this view started from
        if delta.base != self.version:
            raise ResyncNeeded(f"delta {delta.base}->{delta.version} does not follow version {self.version}")
        removed = [name for name in delta.remove if self.nodes.pop(name, None) is not None]
        changed = [n for n in delta.upsert if self.nodes.get(n.name) != n]
        for node in changed:
            self.nodes[node.name] = node
        self.version = delta.version
        return changed, removed

    def snapshot(self) -> Netmap:
        return Netmap(version=self.version, domain=self.domain, prefixes=self.prefixes, nodes=dict(self.nodes))
