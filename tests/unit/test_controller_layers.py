"""What the controller package may import, as its docstring says (read from the source, not run)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "controller"
PLUMBING = {"store", "rows", "migrations", "authority", "netmap", "ratelimit", "middleware", "oidc", "stun"}
CONCERNS = {"auth", "tokens", "enrollment", "nodes", "endpoints", "policies", "routes", "agents", "flows", "audit",
            "gauges", "stream", "certificates", "logins", "grants", "workload"}
TOP = {"api", "server", "cli", "follow"}
FORBIDDEN = ("meshd", "deploy", "meshctl")


def imports(module: str) -> set[str]:
    """Every module ``controller/<module>.py`` imports, anywhere in it, as absolute names."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "controller" + (f".{base}" if base else "")
                if not node.module:  # from . import a, b
                    out |= {f"controller.{alias.name}" for alias in node.names}
                    continue
            out.add(base)
    return out


def siblings(module: str) -> set[str]:
    return {name.split(".")[1] for name in imports(module) if name.startswith("controller.")}


def test_every_module_is_in_one_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == PLUMBING | {"context"} | CONCERNS | TOP


@pytest.mark.parametrize("module", sorted(PLUMBING | {"context"} | CONCERNS | TOP))
def test_nothing_imports_the_node_side_or_the_admin_command(module: str) -> None:
    bad = {name for name in imports(module) if name.startswith(FORBIDDEN)}
    assert not bad, f"controller/{module}.py imports {bad}"


@pytest.mark.parametrize("module", sorted(PLUMBING | {"context"}))
def test_plumbing_and_the_context_use_no_concern(module: str) -> None:
    assert siblings(module) <= PLUMBING, f"controller/{module}.py imports {siblings(module) - PLUMBING}"


@pytest.mark.parametrize("module", sorted(CONCERNS))
def test_concerns_never_reach_up_to_http(module: str) -> None:
    assert not siblings(module) & TOP, f"controller/{module}.py imports {siblings(module) & TOP}"
    assert not {name for name in imports(module) if name.split(".")[0] in ("fastapi", "starlette", "uvicorn")}


def test_mesh_controller_init_and_help_load_no_web_framework() -> None:
    code = "import sys, controller.cli; print(sorted({'fastapi', 'uvicorn', 'starlette'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
