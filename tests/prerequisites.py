"""What a test needs from the machine, and what happens when it is missing: in CI (``CI=true``) the
test fails — a skipped end-to-end test proves nothing — elsewhere it is skipped with the reason."""

from __future__ import annotations

import os

import pytest

__all__ = ["in_ci", "require"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(what: str, missing: list[str]) -> None:
    """Fail (in CI) or skip unless ``missing`` is empty; ``what`` names the check that cannot run."""
    if not missing:
        return
    message = f"{what}: " + "; ".join(missing)
    if in_ci():
        pytest.fail(message + " (CI=true: no skipping)", pytrace=False)
    pytest.skip(message)
