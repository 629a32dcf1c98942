"""``meshctl routes``: the routes nodes offer (subnet routers, exit nodes) and the rules that use them."""

from __future__ import annotations

import argparse

from idmesh.cli import print_json

from .connect import controller, get_all
from .output import table

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    routes = commands.add_parser("routes", help="routes nodes offer (subnet routers, exit nodes)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    listing = routes.add_parser(
        "list", help="every advertised route and the policy rules that make it usable",
        description="A node offers routes with 'meshd run --advertise-routes PREFIX' and '--advertise-exit-node'. "
        "An offer carries nobody's traffic until a policy 'routes' rule names the node (or its tag) for a prefix "
        "inside it; ENABLED BY lists those rules. See 'meshctl policy explain --to ADDRESS' for one identity's route.")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    from meshcore.wire.api import RouteInfo

    with controller(args) as api:
        offered = get_all(api, "/v1/routes", RouteInfo)
    if args.json:
        print_json(offered)
    else:
        table([[r.node, r.prefix, "exit" if r.exit else "subnet",
                "; ".join(e.split(": from ", 1)[0] for e in r.enabled_by) or "- (no rule uses it)"]
               for r in offered], ["NODE", "ROUTE", "KIND", "ENABLED BY"])
    return 0
