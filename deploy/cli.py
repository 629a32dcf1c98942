"""``meshctl deploy``: the command line of :mod:`deploy`.

:func:`add_parser` adds the ``deploy`` subcommand to meshctl's subparsers and
:func:`run` executes it; ``python -m deploy`` runs the same code standalone.
The admin credential is meshctl's ``--admin`` (``IDMESH_ADMIN``).

Exit status: 0 when every host is deployed (or unchanged), 1 when at least
one host failed (each failure is reported with its reason, the others are
deployed regardless), 2/3/5/6 for problems before any host is touched
(a bad inventory, no admin credential, the controller unreachable...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from idmesh.cli import HelpFormatter, print_json
from meshcore.errors import InvalidInput

__all__ = ["add_arguments", "add_parser", "run"]

DESCRIPTION = """\
Install meshd on the inventory's hosts over SSH and join them to the mesh, all hosts at once:
upload the idmesh wheel and its dependencies (hosts install offline), install them into a
virtual environment, install meshd.service (or, with 'service: process', start 'meshd run'
detached with a pidfile), enroll each host with a fresh single-use token carrying its tags or
owner, and start meshd. A host that is already current (same wheel, enrolled in this mesh,
meshd running) is left alone and gets no token, so a second run changes nothing.
A failing host (wrong password, unreachable, install failure...) is reported with its reason;
the others are deployed regardless, and the exit status is 1."""

EPILOG = """\
examples:
  meshctl deploy --inventory hosts.yaml
  meshctl deploy -i hosts.yaml --limit db-1 --json
  meshctl deploy -i hosts.yaml --wheelhouse ./wheels     # wheels built beforehand (pip wheel -w wheels .)
  meshctl deploy -i hosts.yaml --dry-run                 # probe and show what would be done

inventory (YAML; see deploy/examples/hosts.yaml):
  defaults: {user: root, key_file: ~/.ssh/id_ed25519}
  hosts:
    db-1: {address: 10.0.0.5, tags: [db]}
    laptop-7: {address: 10.0.0.7, owner: nikita@acme.com, password_env: LAPTOP7_PASSWORD}"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``deploy`` to meshctl's subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "deploy", help="install meshd on hosts over SSH and join them to the mesh",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inventory", "-i", type=Path, required=True, metavar="FILE", help="the hosts, in YAML")
    p.add_argument("--limit", action="append", metavar="HOST", help="deploy only this host (repeatable)")
    p.add_argument("--wheel", type=Path, metavar="FILE", help="the idmesh wheel to install (default: build one)")
    p.add_argument("--wheelhouse", type=Path, metavar="DIR",
                   help="wheels of idmesh's dependencies (and maybe idmesh itself), for a machine without "
                   "access to a package index (default: collect them with pip wheel)")
    p.add_argument("--source", type=Path, metavar="DIR",
                   help="the idmesh source tree to build from and take systemd/meshd.service from "
                   "(default: the tree this command runs from)")
    p.add_argument("--parallel", type=int, default=8, metavar="N", help="hosts deployed at once (default 8)")
    p.add_argument("--dry-run", action="store_true", help="probe every host and print its plan; change nothing")
    p.add_argument("--json", action="store_true",
                   help="print {ok, hosts: [{host, ok, status, actions, reason, node, ...}]} on stdout")


def run(args: argparse.Namespace) -> int:
    import asyncio  # here, with the rest of what a deployment needs: meshctl imports this module to build its parser

    from idmesh.client import AdminCredential

    from .artifacts import Artifacts
    from .inventory import load_inventory
    from .progress import LiveProgress, event_line, format_row, make_progress
    from .runner import ControllerAdmin, DeployOptions, deploy_all, summarize
    from .ssh import connect
    from .units import find_unit

    if args.parallel < 1:
        raise InvalidInput("--parallel must be at least 1")
    hosts = load_inventory(args.inventory).select(args.limit)
    credential = AdminCredential.load(args.admin)
    unit = find_unit("meshd.service", args.source).read_text() if any(h.service == "systemd" for h in hosts) else None
    out = sys.stderr if args.json else sys.stdout
    with Artifacts(wheel=args.wheel, wheelhouse=args.wheelhouse, source=args.source) as artifacts:
        if args.wheel is None and args.wheelhouse is None and not args.json:
            print(f"building the idmesh wheel from {artifacts.source_tree()}", file=out, flush=True)
        project = artifacts.project()
        if not args.json:
            print(f"deploying idmesh {project.version} ({project.path.name}, sha256:{project.digest[:12]}) "
                  f"to {len(hosts)} host(s)", file=out, flush=True)
        admin = ControllerAdmin(credential)
        progress = make_progress(out, quiet=args.json and not out.isatty())
        try:
            results = asyncio.run(deploy_all(hosts, DeployOptions(
                artifacts=artifacts, admin=admin, connect=connect, progress=progress, unit_template=unit,
                parallel=args.parallel, dry_run=args.dry_run)))
        finally:
            admin.close()
    if args.json:
        print_json({"ok": all(r.ok for r in results), "version": project.version, "digest": project.digest,
                    "hosts": [r.to_json() for r in results]})
    else:
        rows = list(getattr(progress, "rows", {}).values())
        if isinstance(progress, LiveProgress):  # the table is on screen, cut to its width: the reasons in full
            for row in rows:
                if row.state == "failed":
                    print(event_line(row), file=out)
        else:
            width_n = max((len(r.name) for r in rows), default=0)
            width_t = max((len(r.target) for r in rows), default=0)
            for row in rows:
                print(format_row(row, width_n, width_t, 0.0), file=out)
        print(summarize(results), file=out)
    return 0 if all(r.ok for r in results) else 1
