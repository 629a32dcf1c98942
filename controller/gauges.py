"""The controller's gauges, read at scrape time from the store and the netmap hub.

Counts that already live in the store or the hub are never kept a second
time in a counter that could drift from them; the counters and the
issuance histogram (:class:`idmesh.metrics.Metrics`) are for events.
"""

from __future__ import annotations

from datetime import UTC, datetime

from .context import Context

__all__ = ["Gauge", "snapshot", "watch"]

Gauge = tuple[str, str, dict[str, str], float]  # (name, help, labels, value)


def snapshot(ctx: Context, now: datetime) -> list[Gauge]:
    with ctx.store.transaction() as tx:
        nodes = len(tx.nodes())
        agents = len(tx.live_agents(now))
    hub = ctx.hub
    out = [
        ("idmesh_nodes", "Enrolled nodes", {}, float(nodes)),
        ("idmesh_identities_live", "Live identities, by kind", {"kind": "node"}, float(nodes)),
        ("idmesh_identities_live", "Live identities, by kind", {"kind": "agent"}, float(agents)),
        ("idmesh_netmap_version", "Current netmap version", {}, float(hub.version)),
        ("idmesh_policy_version", "Policy version in force (0: none)", {},
         float(hub.policy.version if hub.policy else 0)),
        ("idmesh_streams_connected", "Nodes with an open netmap stream", {}, float(hub.connected)),
    ]
    for node, backlog in hub.backlogs():
        out.append(("idmesh_stream_backlog_messages", "Messages queued for a node, not yet read (its lag)",
                    {"node": node}, float(backlog)))
    return out


def watch(ctx: Context) -> None:
    """Have ``ctx.metrics`` read :func:`snapshot` at every scrape."""
    ctx.metrics.snapshot(lambda: snapshot(ctx, datetime.now(UTC)))
