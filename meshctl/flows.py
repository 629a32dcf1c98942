"""``meshctl flows``: the identity flow log — denied connections and a sample of accepted ones (admin credential).

Requests through ``meshctl serve`` appear with the request (``POST /mcp tools/call query``) after the
destination, and shadow MCP (MCP from a source that is not an agent) with ``shadow-mcp`` after the verdict."""

from __future__ import annotations

import argparse

from idmesh.cli import HelpFormatter, print_json

from .connect import controller, get_all
from .output import table, when

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    flows = commands.add_parser(
        "flows", help="the identity flow log: denied connections and a sample of accepted ones",
        description="Connections nodes saw arrive over the mesh, with the full identity of the "
        "sender (principal, agent, scopes, node), the destination, the verdict and the rule. "
        "Denied connections are logged (rate-limited), accepted ones sampled.",
        epilog="examples:\n  meshctl flows --denied\n  meshctl flows --principal nikita@acme.com --json",
        formatter_class=HelpFormatter)
    flows.add_argument("--denied", action="store_true", help="only denied connections")
    flows.add_argument("--principal", help="only connections made for this principal")
    flows.add_argument("--node", help="only connections seen by this node")
    flows.add_argument("--limit", type=int, default=200, help="the newest N (default %(default)s)")
    flows.add_argument("--json", action="store_true")
    flows.set_defaults(func=_flows)


def _flows(args: argparse.Namespace) -> int:
    from meshcore.wire.api import FlowRecord

    with controller(args) as api:
        flows = get_all(api, "/v1/flows", FlowRecord, denied="true" if args.denied else None,
                        principal=args.principal, node=args.node, limit=str(args.limit))
    if args.json:
        print_json(flows)
        return 0
    table([[when(f.at), f.verdict + (" shadow-mcp" if f.kind == "shadow-mcp" else ""),
            f.agent and f"agent {f.agent}" or f"node {f.source_node or f.source}",
            f.principal or "-", " ".join(f.scopes) or "-", _how(f.authorized_by),
            f"{f.node}:{f.port or ''}/{f.protocol}" + (f" {f.request}" if f.request else ""),
            f.rule] for f in flows], ["WHEN", "VERDICT", "FROM", "PRINCIPAL", "SCOPES", "AUTHORIZED", "TO", "RULE"])
    return 0


def _how(authorized_by: str | None) -> str:
    """``grant g...`` or ``delegation``, short enough for a column (the JSON has the whole sentence)."""
    if not authorized_by:
        return "-"
    return authorized_by.split("(", 1)[-1].rstrip(")") if "(" in authorized_by else authorized_by
