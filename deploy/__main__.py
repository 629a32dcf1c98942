"""``python -m deploy``: ``meshctl deploy`` without meshctl (same options, same code)."""

from __future__ import annotations

from collections.abc import Sequence

from idmesh.cli import env_path, parser, run
from idmesh.paths import DEFAULT_ADMIN

from .cli import DESCRIPTION, EPILOG, add_arguments
from .cli import run as run_deploy


def _main(argv: Sequence[str] | None) -> int:
    p = parser("meshctl deploy", DESCRIPTION, EPILOG)
    p.add_argument("--admin", type=lambda s: env_path("", s), default=env_path("IDMESH_ADMIN", DEFAULT_ADMIN),
                   help="admin credential written by 'mesh-controller init' (env IDMESH_ADMIN; default %(default)s)")
    add_arguments(p)
    return run_deploy(p.parse_args(argv))


if __name__ == "__main__":
    run("meshctl deploy", _main)
