"""Problems found in a policy, before they are given a file location.

Validation works on paths (``("acls", 1, "to", 0)``), because the pydantic
models and the semantic checks know nothing of YAML; the policy loader (and
deploy's inventory) turn each path into ``file:line:column`` with the
source map of the text they parsed (:mod:`meshcore.yamlsource`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import PolicyError

__all__ = ["Path", "Problem", "ProblemsFound", "render_path"]

Path = tuple[str | int, ...]

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def render_path(path: Path) -> str:
    """``acls[1].to[0]``: indexes are 0-based, as in the policy's own error lines."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(top level)"


@dataclass(frozen=True)
class Problem:
    """What is wrong at ``path``.

    ``at_key`` points at the key rather than its value; ``where`` is a known
    ``(line, column)`` for problems found while reading the text itself.
    """

    path: Path
    message: str
    at_key: bool = False
    where: tuple[int, int] | None = None

    def __str__(self) -> str:
        return f"{render_path(self.path)}: {self.message}"


class ProblemsFound(PolicyError):
    """Raised by model validation; :func:`~meshcore.policy.load_policy` adds locations.

    Code that validates a policy from plain data (not from a file) sees this
    error directly, with paths but no line numbers.
    """

    def __init__(self, found: Sequence[Problem]) -> None:
        self.found = tuple(found)
        super().__init__([str(p) for p in self.found])
