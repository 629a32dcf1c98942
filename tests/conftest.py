"""Fixtures every tier may use: ``oidc_provider`` (a real OpenID provider, tests/oidc) and ``pg_cluster``
(a PostgreSQL 15 cluster, tests/pg.py), each started once per session and only if a test asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import pg
from tests.prerequisites import require

pytest_plugins = ["tests.oidc.fixture"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.Cluster]:
    require("PostgreSQL 15 for the controller's store", pg.missing())
    cluster = pg.Cluster()
    try:
        yield cluster
    finally:
        cluster.close()
