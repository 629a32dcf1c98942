"""A real OpenID Connect provider for idmesh's tests: panva's certified ``oidc-provider`` (npm, pinned in
``package.json`` / ``package-lock.json``, installed by ``make deps`` with ``npm ci --prefix tests/oidc``)
run by ``provider.mjs`` on 127.0.0.1 over HTTPS, with the device authorization grant (RFC 8628) on.

* ``harness`` starts it (:func:`start_oidc_provider`) and drives it (:class:`OidcProvider`);
* ``person`` plays the person approving or refusing a device code with plain HTTP forms;
* ``tls`` makes the per-session CA and server certificate;
* ``fixture`` is the pytest plugin (registered in ``tests/conftest.py``) with the session fixture
  ``oidc_provider``.

May import httpx, cryptography, pytest and ``tests.prerequisites``; nothing of idmesh.
"""

from tests.oidc.harness import (
    DEVICE_CODE_GRANT,
    PEOPLE,
    Account,
    Client,
    OidcProvider,
    ProviderSettings,
    default_settings,
    missing_prerequisites,
    start_oidc_provider,
)
from tests.oidc.person import ApprovalError

__all__ = [
    "DEVICE_CODE_GRANT", "PEOPLE", "Account", "ApprovalError", "Client", "OidcProvider", "ProviderSettings",
    "default_settings", "missing_prerequisites", "start_oidc_provider",
]
