"""The ``meshctl`` parser and its dispatch: each noun module registers its
subcommands, and the one the user named runs through :func:`idmesh.cli.run`
(one-line errors, exit codes)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from idmesh.cli import admin_option, parser, run

from . import agent, audit, deploy, flows, grant, login, nodes, policy, routes, serve, status, tokens, whois

__all__ = ["build_parser", "main"]

_NOUNS = (tokens, nodes, routes, policy, agent, serve, login, grant, whois, audit, flows, status, deploy)
"""In the order ``meshctl --help`` lists them."""

_EPILOG = """\
examples:
  meshctl token create --tag db --ttl 1h
  meshctl token create --owner nikita@acme.com --json
  meshctl nodes list
  meshctl nodes remove laptop-7
  meshctl routes list

Controller commands read the admin credential from --admin or IDMESH_ADMIN."""


def build_parser() -> argparse.ArgumentParser:
    p = parser("meshctl", "Control an idmesh mesh: enrollment tokens, nodes, and (on a node) its status.",
               epilog=_EPILOG)
    admin_option(p)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for noun in _NOUNS:
        noun.register(commands)
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    return handler(args)


def main() -> None:
    run("meshctl", _main)
