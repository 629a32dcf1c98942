"""``meshctl audit``: the controller's audit log, filtered (admin credential)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from idmesh.cli import HelpFormatter, print_json
from meshcore.durations import parse_duration
from meshcore.errors import InvalidInput

from .connect import controller, get_all
from .output import when

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit", help="the controller's audit log: enrollments, certificates, agents, policies",
        description="Read the audit log: every identity event (tokens, enrollments, certificates "
        "issued/renewed/revoked, agents issued/refused/retired/revoked, policy versions with their "
        "diff) with who, what, when and from where. Filters combine.",
        epilog="examples:\n  meshctl audit --since 1h\n  meshctl audit --principal nikita@acme.com "
        "--action agent\n  meshctl audit --node db-1 --json", formatter_class=HelpFormatter)
    audit.add_argument("--since", metavar="TIME",
                       help="an ISO time (2026-11-28T09:00:00Z) or a duration ago (15m, 2h, 7d)")
    audit.add_argument("--principal", help="events about this principal's nodes and agents")
    audit.add_argument("--node", help="events about or by this node")
    audit.add_argument("--action", help="an action (agent.revoked) or a family (agent)")
    audit.add_argument("--limit", type=int, default=1000, help="the newest N events (default %(default)s)")
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=_audit)


def _since(text: str) -> str:
    """``--since``: a duration ago or an ISO time, as the ISO time the controller filters by."""
    try:
        return (datetime.now(UTC) - parse_duration(text)).isoformat()
    except InvalidInput:
        pass
    try:
        # not redundant on 3.11: the replace also lets a bare date end in Z (2026-11-28Z)
        return datetime.fromisoformat(text.replace("Z", "+00:00")).isoformat()  # noqa: FURB162
    except ValueError as exc:
        raise InvalidInput(f"--since {text!r}: expected an ISO time or a duration such as 15m or 2h") from exc


def _audit(args: argparse.Namespace) -> int:
    from meshcore.wire.api import AuditEntry

    with controller(args) as api:
        rows = get_all(api, "/v1/audit", AuditEntry, since=_since(args.since) if args.since else None,
                       principal=args.principal, node=args.node, action=args.action, limit=str(args.limit))
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        detail = {k: v for k, v in r.detail.items() if k != "diff"}
        extra = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(detail.items()))
        print(f"{when(r.at)}  {r.action:<20} {r.target or '-'}  by {r.actor}"
              + (f" from {r.source}" if r.source else "") + (f"  {extra}" if extra else ""))
        if r.detail.get("diff"):
            print("    " + str(r.detail["diff"]).rstrip().replace("\n", "\n    "))
    return 0
