"""Fixtures every tier may use: ``oidc_provider`` (a real OpenID provider, tests/oidc)."""

pytest_plugins = ["tests.oidc.fixture"]
