"""``meshctl nodes``: the mesh's nodes — list, remove (admin credential)."""

from __future__ import annotations

import argparse

from idmesh.cli import print_json

from .connect import controller, get_all
from .output import table, when

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    nodes = commands.add_parser("nodes", help="the mesh's nodes").add_subparsers(dest="action", required=True,
                                                                                 metavar="ACTION")
    listing = nodes.add_parser("list", help="list enrolled nodes")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)
    remove = nodes.add_parser("remove", help="remove a node and revoke its certificate")
    remove.add_argument("name")
    remove.add_argument("--json", action="store_true")
    remove.set_defaults(func=_remove)


def _list(args: argparse.Namespace) -> int:
    from meshcore.wire.api import NodeInfo

    with controller(args) as api:
        nodes = get_all(api, "/v1/nodes", NodeInfo)
    if args.json:
        print_json(nodes)
    else:
        table([[n.name, " ".join(n.addresses), n.owner or "-", ",".join(n.tags) or "-", when(n.cert_not_after)]
               for n in nodes], ["NAME", "ADDRESSES", "OWNER", "TAGS", "CERT VALID TO"])
    return 0


def _remove(args: argparse.Namespace) -> int:
    from meshcore.wire.api import NodeInfo

    with controller(args) as api:
        node = NodeInfo.model_validate(api.request("DELETE", f"/v1/nodes/{args.name}"))
    if args.json:
        print_json(node)
    else:
        print(f"removed {node.spiffe_id}; its certificate is revoked")
    return 0
