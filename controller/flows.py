"""The identity flow log: connections the nodes saw arrive, with who sent them.

Nodes report what they saw (denied connections and a sample of accepted
ones). The controller trusts a record no further than its sender: it stamps
the node from the caller's certificate, whatever the record says, so a node
cannot report in another's name. Verdict and principal are stored beside
the record, as columns, because they are what the admin filters on.
"""

from __future__ import annotations

from meshcore.identity import Identity
from meshcore.wire.api import FlowBatch, FlowRecord

from .context import Context

__all__ = ["find_flows", "record_flows"]


def record_flows(ctx: Context, ident: Identity, batch: FlowBatch) -> int:
    """Store what the calling node saw; how many records."""
    node = ident.spiffe_id.name
    rows = [(f.at, f.verdict, f.principal, f.model_copy(update={"node": node}).model_dump_json())
            for f in batch.flows]
    with ctx.store.transaction() as tx:
        tx.insert_flows(node, rows)
    return len(rows)


def find_flows(ctx: Context, denied: bool, principal: str | None, node: str | None, limit: int) -> list[FlowRecord]:
    """The newest ``limit`` matching records, oldest first."""
    with ctx.store.transaction() as tx:
        rows = tx.flows(denied, principal, node, limit)
    return [FlowRecord.model_validate_json(record) for _, record in rows]
