"""Reading the audit log.

Rows are written by each concern inside the transaction of the change they
record, so an identity event never exists without its row; this module only
reads them back. The admin names a node by its name, while rows made by or
about it name it by SPIFFE ID; the ID is made here from the settings.
"""

from __future__ import annotations

from datetime import datetime

from meshcore.wire.api import AuditEntry

from .context import Context

__all__ = ["audit_entries"]


def audit_entries(ctx: Context, since: datetime | None, action: str | None, principal: str | None,
                  node: str | None, limit: int) -> list[AuditEntry]:
    """The newest ``limit`` rows matching every filter given, oldest first."""
    node_id = str(ctx.settings.spiffe_id("node", node)) if node else None
    with ctx.store.transaction() as tx:
        rows = tx.audit_rows(since, action, principal, node_id, limit)
    return [AuditEntry(id=r.id, at=r.at, actor=r.actor, action=r.action, target=r.target, source=r.source,
                       detail=r.detail) for r in rows]
