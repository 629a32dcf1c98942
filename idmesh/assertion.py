"""For services behind ``meshctl serve``: check the ``Idmesh-Assertion`` header of a request.

    from idmesh.assertion import InvalidAssertion, verify_assertion

    ca = open("/var/lib/idmesh/ca.crt", "rb").read()   # the mesh CA: the node's state directory has it
    try:
        claims = verify_assertion(request.headers["Idmesh-Assertion"], ca, audience="api")
    except InvalidAssertion as exc:
        ...   # refuse: str(exc) is one line saying why
    claims["principal"], claims.get("agent"), claims.get("scopes")

The audience is the service's name (``meshctl serve --name``; by default
``NODE:PORT``). The claims are listed in :mod:`meshcore.assertion`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from meshcore import assertion
from meshcore.errors import InvalidToken

__all__ = ["InvalidAssertion", "verify_assertion"]

InvalidAssertion = InvalidToken


def verify_assertion(token: str, ca_pem: bytes | str, audience: str, now: datetime | None = None) -> dict[str, Any]:
    """The assertion's claims, if a node of this mesh signed it for ``audience`` and it is still in force."""
    return assertion.verify_assertion(token, ca_pem, audience, now or datetime.now(UTC))
