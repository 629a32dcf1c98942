"""The enrolled nodes as the admin sees them: listed, removed.

A node's addresses and blocks are not stored but derived from its block
index, so what the admin is shown (:func:`node_info`) and what other nodes
are sent (:func:`controller.netmap.peer_node`) cannot disagree. Removal
revokes every certificate of the node and ends its stream in one change.
"""

from __future__ import annotations

from datetime import datetime

from meshcore.errors import NotFound
from meshcore.wire.api import NodeInfo

from .context import Context, Settings
from .rows import NodeRow
from .store import Tx

__all__ = ["existing_node", "list_nodes", "node_info", "remove_node"]


def node_info(settings: Settings, row: NodeRow) -> NodeInfo:
    block = settings.prefixes.block(row.block_index)
    return NodeInfo(
        name=row.name,
        spiffe_id=str(settings.spiffe_id("node", row.name)),
        owner=row.owner,
        tags=row.tags,
        addresses=[str(block.node_v4), str(block.node_v6)],
        blocks=[str(block.v4), str(block.v6)],
        wireguard_public_key=row.wg_public_key,
        enrolled_at=row.enrolled_at,
        cert_not_after=row.cert_not_after,
    )


def existing_node(tx: Tx, name: str) -> NodeRow:
    """The node named ``name``, or NotFound."""
    row = tx.node(name)
    if row is None:
        raise NotFound(f"no node named {name!r}")
    return row


def list_nodes(ctx: Context) -> list[NodeInfo]:
    with ctx.store.transaction() as tx:
        return [node_info(ctx.settings, n) for n in tx.nodes()]


def remove_node(ctx: Context, actor: str, name: str, now: datetime) -> NodeInfo:
    """Remove a node: its certificates revoked, and its live agents revoked everywhere with it."""
    from .agents import count_ended, end_subtrees_locked  # (agents imports this module)

    with ctx.store.transaction() as tx:
        row = existing_node(tx, name)
        agents = [a.id for a in tx.live_agents(now, node=name)]
        ended = end_subtrees_locked(ctx, tx, actor, agents, now, revoked=True, why=f"its node {name} was removed")
        tx.delete_node(name)
        revoked = tx.revoke_certificates_of_node(name, now)
        sid = str(ctx.settings.spiffe_id("node", name))
        tx.audit(now, actor, "node.removed", sid, certificates_revoked=revoked)
        tx.audit(now, actor, "certificate.revoked", sid, serial=row.cert_serial, reason="node removed")
        ctx.hub.record_delta(tx, remove=(name,))
    count_ended(ctx, ended, revoked=True)
    return node_info(ctx.settings, row)
