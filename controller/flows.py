"""The identity flow log: connections the nodes saw arrive, with who sent them.

Nodes report what they saw (denied connections and a sample of accepted
ones). The controller trusts a record no further than its sender: it stamps
the node from the caller's certificate, whatever the record says, so a node
cannot report in another's name. Verdict and principal are stored beside
the record, as columns, because they are what the admin filters on.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from meshcore.identity import Identity
from meshcore.wire.api import FlowBatch, FlowRecord

from .agents import authorized_by
from .context import Context
from .store import Tx

__all__ = ["FLOW_RETENTION", "MAX_FLOWS", "find_flows", "prune_flows", "record_flows"]

FLOW_RETENTION = timedelta(days=7)
"""How long a flow record is kept by default (``serve --flow-retention``): the log is for asking who
connected lately, not an archive."""
MAX_FLOWS = 1_000_000
"""At most this many records (a few hundred MB), whatever their age: every node may post 1,000 a second."""
PRUNE_EVERY = 100
"""Batches between two prunings (each is two indexed deletes)."""


def record_flows(ctx: Context, ident: Identity, batch: FlowBatch, now: datetime, *,
                 keep: int = MAX_FLOWS) -> int:
    """Store what the calling node saw; how many records. Every :data:`PRUNE_EVERY` batches, records
    older than the retention and all but the newest ``keep`` go (and hourly: :func:`prune_flows`)."""
    node = ident.spiffe_id.name
    ctx.flow_batches += 1
    with ctx.store.transaction() as tx:
        records = [_named(ctx, tx, f, now) for f in batch.flows]
        tx.insert_flows(node, [(f.at, f.verdict, f.principal, f.model_copy(update={"node": node}).model_dump_json())
                               for f in records])
        if ctx.flow_batches % PRUNE_EVERY == 0:
            tx.prune_flows(now - ctx.flow_retention, keep)
    return len(records)


def _named(ctx: Context, tx: Tx, flow: FlowRecord, now: datetime) -> FlowRecord:
    """``flow`` with its sender named from the registry when the node that saw it could not: an agent no rule
    admits to that node was never sent there (targeted distribution); the controller knows every agent."""
    if flow.agent is not None:
        return flow
    try:
        block = ctx.settings.prefixes.block_of(flow.source)
    except ValueError:  # not an address (a node's word): left as it is
        return flow
    row = tx.live_agent_at(block, flow.source, now) if block is not None else None
    if row is None:
        return flow
    return flow.model_copy(update={"principal": row.principal, "agent": row.id, "scopes": list(row.scopes),
                                   "authorized_by": authorized_by(row), "source_node": row.node})


def prune_flows(ctx: Context, now: datetime, keep: int = MAX_FLOWS) -> int:
    """Drop the records past the retention (a quiet mesh posts no batches to prune on); how many went."""
    with ctx.store.transaction() as tx:
        return tx.prune_flows(now - ctx.flow_retention, keep)


def find_flows(ctx: Context, denied: bool, principal: str | None, node: str | None, limit: int) -> list[FlowRecord]:
    """The newest ``limit`` matching records, oldest first."""
    with ctx.store.transaction() as tx:
        rows = tx.flows(denied, principal, node, limit)
    return [FlowRecord.model_validate_json(record) for _, record in rows]
