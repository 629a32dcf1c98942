"""``meshctl deploy``: meshd onto hosts over SSH — :mod:`deploy.cli`'s subcommand under meshctl's ``--admin``.

(This module is ``meshctl.deploy``; ``deploy`` below is the top-level package.)
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from deploy import cli  # its options only; what a deployment needs, cli.run imports

    cli.add_parser(commands).set_defaults(func=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    from deploy import cli

    return cli.run(args)
