"""pytest plugin: ``oidc_provider``, one real oidc-provider per test session (see ``tests.oidc``).

In CI (``CI=true``) a missing node, npm or ``tests/oidc/node_modules`` fails the tests that ask for it;
elsewhere they are skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.oidc.harness import OidcProvider, missing_prerequisites, start_oidc_provider
from tests.prerequisites import require

__all__ = ["oidc_provider"]


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    require("the test OpenID provider (oidc-provider on Node.js)", missing_prerequisites())
    with start_oidc_provider(tmp_path_factory.mktemp("oidc-provider")) as provider:
        yield provider
