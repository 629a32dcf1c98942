"""``meshctl deploy``'s wiring: the subcommand parses as meshctl will add it, and bad input stops before any host."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deploy import cli
from meshcore.errors import InvalidInput, NotFound
from meshctl.main import build_parser


def meshctl(*argv: str) -> argparse.Namespace:
    """Parsed by meshctl's own parser (deploy added by add_parser), with an admin credential that is nowhere."""
    return build_parser().parse_args(["--admin", "/nonexistent/admin.conf", *argv])


def test_the_subcommand_parses() -> None:
    args = meshctl("deploy", "-i", "hosts.yaml", "--limit", "a", "--limit", "b", "--json",
                   "--parallel", "3", "--wheelhouse", "w", "--dry-run")
    assert (args.command, args.inventory, args.limit, args.json, args.parallel, args.dry_run) == (
        "deploy", Path("hosts.yaml"), ["a", "b"], True, 3, True)
    assert args.wheelhouse == Path("w") and args.wheel is None and args.source is None


def test_bad_input_stops_before_any_host(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no inventory at"):
        cli.run(meshctl("deploy", "-i", str(tmp_path / "none.yaml")))
    bad = tmp_path / "hosts.yaml"
    bad.write_text("hosts:\n  a: {address: x}\n")
    with pytest.raises(InvalidInput, match=r"hosts.yaml:2:6: hosts.a: say what the node is"):
        cli.run(meshctl("deploy", "-i", str(bad)))
    with pytest.raises(InvalidInput, match="--parallel must be at least 1"):
        cli.run(meshctl("deploy", "-i", str(bad), "--parallel", "0"))
    good = tmp_path / "good.yaml"
    good.write_text("hosts:\n  a: {address: x, tags: [t], known_hosts: ignore}\n")
    with pytest.raises(NotFound, match="no admin credential at /nonexistent/admin.conf"):
        cli.run(meshctl("deploy", "-i", str(good)))
