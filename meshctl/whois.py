"""``meshctl whois``: who holds an overlay address, as this node's meshd has verified it."""

from __future__ import annotations

import argparse

from idmesh.cli import print_json

from .connect import meshd, socket_option

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    whois = commands.add_parser("whois", help="who holds an overlay address, as this node has verified it",
                                description="Ask the local meshd which identity holds ADDRESS: a node, or an agent "
                                "with its principal, scopes, parent and expiry (from a certificate this node checked "
                                "itself).")
    whois.add_argument("address")
    socket_option(whois, described=False)
    whois.add_argument("--json", action="store_true")
    whois.set_defaults(func=_whois)


def _whois(args: argparse.Namespace) -> int:
    info = meshd(args).get("/v1/whois", params={"address": args.address})
    if args.json:
        print_json(info)
    elif info["kind"] == "agent":
        print(f"agent {info['agent']} ({info['name']}) on node {info['node']}, acting for {info['principal']}")
        print(f"  scopes  {' '.join(info['scopes'])}")
        print(f"  parent  {info['parent'] or '-'}")
        print(f"  expires {info['expires']}")
        if info.get("authorized_by"):
            print(f"  authorized by {info['authorized_by']}")
    else:
        print(f"node {info['node']} ({info['principal'] or ','.join('tag:' + t for t in info.get('tags', []))})")
    return 0
