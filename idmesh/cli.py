"""What every idmesh command shares: one-line errors, JSON output, path options.

A user never sees a traceback: :func:`run` turns an :class:`IdmeshError`
into ``<prog>: error: <message>`` and its exit code, and anything else into
one line that says it is a bug (``IDMESH_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from meshcore.durations import parse_duration
from meshcore.errors import IdmeshError, InvalidInput

from .paths import DEFAULT_ADMIN

__all__ = ["HelpFormatter", "admin_option", "duration", "env_path", "fail", "parser", "path_option", "print_json",
           "run"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the examples in descriptions and epilogs as written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


def env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


def path_option(p: argparse.ArgumentParser, flag: str, env: str, default: str, help: str | None = None) -> None:
    """Add ``flag``, a path; without it, the environment variable ``env`` (when set and not empty), else
    ``default``, as the environment is when the parser is built (so ``%(default)s`` in ``help`` shows it)."""
    p.add_argument(flag, type=Path, default=env_path(env, default), help=help)


def admin_option(p: argparse.ArgumentParser) -> None:
    """``--admin``, the admin credential (env ``IDMESH_ADMIN``): every command that acts as the mesh's
    administrator (``meshctl``, ``python -m deploy``)."""
    path_option(p, "--admin", "IDMESH_ADMIN", DEFAULT_ADMIN,
                help="admin credential written by 'mesh-controller init' (env IDMESH_ADMIN; default %(default)s)")


def duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # a pydantic model; duck-typed, so no command pays for importing pydantic
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def print_json(value: Any) -> None:
    print(json.dumps(_plain(value), indent=2, sort_keys=False))


def fail(message: str) -> NoReturn:
    raise IdmeshError(message)


def run(prog: str, main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    try:
        code = main(argv) or 0
    except IdmeshError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as exc:  # noqa: BLE001 — the last line of defence against tracebacks
        if os.environ.get("IDMESH_DEBUG"):
            traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (a bug; IDMESH_DEBUG=1 shows details)",
              file=sys.stderr)
        code = 70
    sys.exit(code)
