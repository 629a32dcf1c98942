"""``meshctl token``: enrollment tokens — create, list, delete (admin credential)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from idmesh.cli import duration, print_json

from .connect import controller, get_all
from .output import remaining, table

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="enrollment tokens").add_subparsers(dest="action", required=True,
                                                                                  metavar="ACTION")
    create = token.add_parser("create", help="create a one-line enrollment token",
                              description="Create an enrollment token. It carries the controller URL and the CA "
                              "fingerprint, so 'meshd enroll TOKEN' needs nothing else. Single-use unless "
                              "--reusable; the controller keeps only its hash.")
    create.add_argument("--tag", action="append", default=[], dest="tags", metavar="TAG",
                        help="tag the enrolled node (repeatable), e.g. --tag db")
    create.add_argument("--owner", metavar="PRINCIPAL", help="the person who owns the node, e.g. nikita@acme.com")
    create.add_argument("--ttl", type=duration, default="1h", metavar="DURATION",
                        help="how long the token can be used (default 1h)")
    create.add_argument("--reusable", action="store_true", help="allow many enrollments with this token")
    create.add_argument("--json", action="store_true", help="print {token, id, expires, ...} as JSON")
    create.set_defaults(func=_create)
    listing = token.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)
    delete = token.add_parser("delete", help="delete a token so it can no longer be used")
    delete.add_argument("id")
    delete.set_defaults(func=_delete)


def _create(args: argparse.Namespace) -> int:
    from meshcore.wire.api import TokenCreated, TokenCreateRequest

    with controller(args) as api:
        req = TokenCreateRequest(tags=args.tags, owner=args.owner, ttl_seconds=int(args.ttl.total_seconds()),
                                 reusable=args.reusable)
        created = TokenCreated.model_validate(api.request("POST", "/v1/tokens", req.model_dump()))
    if args.json:
        print_json(created)
    else:
        print(created.token)
    return 0


def _list(args: argparse.Namespace) -> int:
    from meshcore.wire.api import TokenInfo

    with controller(args) as api:
        tokens = get_all(api, "/v1/tokens", TokenInfo)
    if args.json:
        print_json(tokens)
        return 0
    now = datetime.now(UTC)
    table([[t.id, ",".join(t.tags) or "-", t.owner or "-", "yes" if t.reusable else "no", str(t.uses),
            remaining(t.expires, now)] for t in tokens],
          ["ID", "TAGS", "OWNER", "REUSABLE", "USES", "EXPIRES IN"])
    return 0


def _delete(args: argparse.Namespace) -> int:
    with controller(args) as api:
        api.request("DELETE", f"/v1/tokens/{args.id}")
    print(f"deleted token {args.id}")
    return 0
