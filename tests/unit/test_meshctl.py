"""``meshctl``'s wiring: every command has a handler, and a command loads only what it uses.

Start-up time is part of every agent's birth, so ``meshctl agent run`` must
not pay for the policy compiler, the wire models or a web framework, and
building the parser must pay for none of them. Imports are observed in a
fresh interpreter: this process has loaded everything already.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator

from meshctl.main import build_parser

Parser = argparse.ArgumentParser

HEAVY = ("meshcore.policy", "meshcore.wire", "meshcore.identity", "pydantic", "fastapi", "cryptography", "httpx",
         "asyncssh", "yaml", "deploy.runner")


def commands(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Parser]]:
    """Every command path that takes no further subcommand, with its parser."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, p
    for action in subs:
        for name, child in action.choices.items():
            yield from commands(child, (*path, name))


def loaded_by(code: str) -> set[str]:
    """Every module a fresh interpreter has loaded after running ``code``."""
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> set[str]:
    return {h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in modules)}


def test_every_command_has_a_handler() -> None:
    found = {" ".join(path): p.get_default("func") for path, p in commands(build_parser())}
    assert set(found) == {"token create", "token list", "token delete", "nodes list", "nodes remove", "routes list",
                          "policy check", "policy apply", "policy show", "policy history", "policy explain",
                          "agent run", "agent list", "agent revoke", "login approve", "whoami", "logout",
                          "grant create", "grant list", "grant revoke", "whois", "audit", "flows", "status", "deploy"}
    assert all(callable(func) for func in found.values()), found
    assert callable(build_parser().parse_args(["login"]).func)  # login itself runs; login approve is its action


def test_building_the_parser_loads_nothing_heavy() -> None:
    assert heavy(loaded_by("from meshctl.main import build_parser; build_parser()")) == set()


def test_agent_run_loads_only_the_local_client() -> None:
    # As far as meshctl gets without a meshd: the request to the socket.
    modules = loaded_by(
        "from meshcore.errors import Unavailable\n"
        "from meshctl.main import build_parser\n"
        "args = build_parser().parse_args(['agent', 'run', '--socket', '/nonexistent/meshd.sock',\n"
        "                                  '--principal', 'p', '--scope', 's:r', '--', 'true'])\n"
        "try:\n"
        "    args.func(args)\n"
        "except Unavailable:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('meshctl agent run reached meshd at /nonexistent')")
    assert heavy(modules) == {"httpx"}
