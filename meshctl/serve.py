"""``meshctl serve``: identity-aware HTTP for a service on this node — add, list, remove (root, this node's meshd)."""

from __future__ import annotations

import argparse

from idmesh.cli import HelpFormatter, print_json
from meshcore.errors import InvalidInput

from .connect import meshd, socket_option
from .output import table

__all__ = ["register"]

_DESCRIPTION = (
    "Terminate HTTP arriving over the mesh at PORT on this node's overlay addresses and forward it to UPSTREAM. "
    "meshd decides every request with the policy (acls may narrow a destination with http: methods and paths, and "
    "mcp_tools: for MCP servers), refuses with 403 and an OAuth insufficient_scope challenge, and forwards allowed "
    "requests with the caller's verified identity: Idmesh-Principal, Idmesh-Agent, Idmesh-Scopes, Idmesh-Node, "
    "Idmesh-Authorized-By, and Idmesh-Assertion, a JWT signed by this node (audience: --name) that the upstream "
    "checks with the mesh CA (idmesh.assertion.verify_assertion). Incoming headers of those names are removed. "
    "/.well-known/oauth-protected-resource (RFC 9728) is answered by meshd. Kept across restarts.")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="identity-aware HTTP and MCP for a service on this node",
                                description=_DESCRIPTION, formatter_class=HelpFormatter,
                                epilog="examples:\n  meshctl serve --port 8080 --to http://127.0.0.1:9000 --name api\n"
                                "  meshctl serve list --json\n  meshctl serve remove --port 8080")
    serve.add_argument("--port", type=int, help="the port to serve on the overlay addresses")
    serve.add_argument("--to", metavar="UPSTREAM", help="where requests go, e.g. http://127.0.0.1:9000")
    serve.add_argument("--name", help="the service's name: the assertion's audience (default NODE-PORT)")
    serve.add_argument("--mcp", action="store_true", help="the upstream is an MCP server: every node of the mesh "
                       "reports processes that are not agents connecting to this port (shadow MCP, meshctl flows)")
    serve.add_argument("--json", action="store_true")
    socket_option(serve)
    serve.set_defaults(func=_add)
    actions = serve.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="the ports this node serves")
    listing.add_argument("--json", action="store_true")
    socket_option(listing, described=False)
    listing.set_defaults(func=_list)
    remove = actions.add_parser("remove", help="stop serving a port")
    remove.add_argument("--port", type=int, required=True)
    socket_option(remove, described=False)
    remove.set_defaults(func=_remove)


def _add(args: argparse.Namespace) -> int:
    if args.port is None or args.to is None:
        raise InvalidInput("meshctl serve needs --port and --to (or: meshctl serve list, meshctl serve remove)")
    info = meshd(args).request("POST", "/v1/serve", {"port": args.port, "to": args.to, "name": args.name,
                                                     "mcp": args.mcp})
    if args.json:
        print_json(info)
    else:
        print(f"serving {', '.join(info['listening'])} -> {info['to']} as {info['name']}")
    return 0


def _list(args: argparse.Namespace) -> int:
    serves = meshd(args).get("/v1/serve")
    if args.json:
        print_json(serves)
    else:
        table([[s["port"], s["to"], s["name"], "mcp" if s.get("mcp") else "http", s["error"] or "serving"]
               for s in serves], ["PORT", "UPSTREAM", "NAME", "KIND", "STATE"])
    return 0


def _remove(args: argparse.Namespace) -> int:
    meshd(args).request("DELETE", f"/v1/serve/{args.port}")
    print(f"port {args.port} is no longer served")
    return 0
