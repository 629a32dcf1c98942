"""``python -m deploy``: ``meshctl deploy`` without meshctl (same options, same code)."""

from __future__ import annotations

from collections.abc import Sequence

from idmesh.cli import admin_option, parser, run

from .cli import DESCRIPTION, EPILOG, add_arguments
from .cli import run as run_deploy


def _main(argv: Sequence[str] | None) -> int:
    p = parser("meshctl deploy", DESCRIPTION, EPILOG)
    admin_option(p)
    add_arguments(p)
    return run_deploy(p.parse_args(argv))


if __name__ == "__main__":
    run("meshctl deploy", _main)
