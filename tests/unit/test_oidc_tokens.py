"""The controller's checks of an ID token (controller.oidc): each way a token can be wrong is refused, saying why.

The provider's documents come from an in-memory transport here, so tokens
can be signed with whatever claims a test needs; the real provider (panva's
oidc-provider) runs the whole flow in tests/integration/test_login.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from controller.oidc import LEEWAY, OidcConfig, OidcProvider
from meshcore.errors import InvalidToken, PermissionDenied

ISSUER = "https://idp.acme.test"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
NOW = int(time.time())


class Idp:
    """The provider's discovery document and JWKS, and how often each was fetched."""

    def __init__(self) -> None:
        self.keys: list[Any] = [KEY]
        self.fetched: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.fetched.append(request.url.path)
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={
                "issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks", "token_endpoint": f"{ISSUER}/token",
                "device_authorization_endpoint": f"{ISSUER}/device/auth",
                "id_token_signing_alg_values_supported": ["RS256"]})
        if request.url.path == "/jwks":
            return httpx.Response(200, json=KeySet(self.keys).as_dict(private=False))
        return httpx.Response(404)


def token(key: RSAKey = KEY, **claims: Any) -> str:
    body = {"iss": ISSUER, "aud": "idmesh", "sub": "u1", "iat": NOW, "exp": NOW + 3600, "email": "nikita@acme.com",
            "email_verified": True, **claims}
    return str(jwt.encode({"alg": "RS256", "kid": key.kid}, {k: v for k, v in body.items() if v is not None}, key))


def principal(idp: Idp, id_token: str, claim: str = "email") -> str:
    provider = OidcProvider(OidcConfig(ISSUER, "idmesh", principal_claim=claim),
                            transport=httpx.MockTransport(idp.handle))
    try:
        return asyncio.run(provider.principal(id_token, NOW))
    finally:
        asyncio.run(provider.close())


def test_a_good_token_names_its_verified_email() -> None:
    assert principal(Idp(), token()) == "nikita@acme.com"


@pytest.mark.parametrize(("claims", "reason"), [
    ({"iss": "https://evil.test"}, "iss"),
    ({"aud": "someone-else"}, "aud"),
    ({"exp": NOW - LEEWAY - 1}, "expired"),
    ({"iat": NOW + LEEWAY + 60}, "future"),
    ({"iss": None}, "iss"),
    ({"aud": ["idmesh", "other"], "azp": "other"}, "azp"),
])
def test_a_token_for_someone_else_or_out_of_time_is_refused(claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidToken, match=reason):
        principal(Idp(), token(**claims))


def test_a_token_signed_by_a_key_the_provider_never_published_is_refused() -> None:
    forged = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    with pytest.raises(InvalidToken, match="signature does not verify"):
        principal(Idp(), token(forged))


def test_an_unverified_or_missing_email_gets_no_certificate() -> None:
    with pytest.raises(PermissionDenied, match="has not verified email nikita@acme.com"):
        principal(Idp(), token(email_verified=False))
    with pytest.raises(PermissionDenied, match="has not verified email"):
        principal(Idp(), token(email_verified=None))
    with pytest.raises(PermissionDenied, match="no email claim"):
        principal(Idp(), token(email=None))


def test_a_verified_email_that_is_no_principal_gets_no_certificate() -> None:
    for email in ("niki\u200bta@acme.com", "nikita@acme.com\u202e", "nikita@a\u0000cme.com", "not-an-address"):
        with pytest.raises(PermissionDenied, match="is not a principal"):
            principal(Idp(), token(email=email))


def test_a_rotated_key_is_fetched_once_when_a_token_names_it() -> None:
    idp = Idp()
    rotated = RSAKey.generate_key(2048, parameters={"kid": "k2"})
    provider = OidcProvider(OidcConfig(ISSUER, "idmesh"), transport=httpx.MockTransport(idp.handle))

    async def run() -> list[str]:
        try:
            first = await provider.principal(token(), NOW)
            idp.keys = [rotated, KEY]
            second = await provider.principal(token(rotated), NOW)
            third = await provider.principal(token(rotated), NOW)
            return [first, second, third]
        finally:
            await provider.close()

    assert asyncio.run(run()) == ["nikita@acme.com"] * 3
    assert idp.fetched.count("/jwks") == 2  # once at first use, once for the new kid; then cached


def test_the_providers_address_is_taken_in_its_one_spelling() -> None:
    assert principal(Idp(), token(email="Nikita@ACME.com")) == "nikita@acme.com"


def test_another_claim_can_name_the_principal() -> None:
    # (Azure AD's preferred_username is the user principal name, an address like any other principal)
    upn = token(preferred_username="nikita.k@acme.onmicrosoft.com")
    assert principal(Idp(), upn, claim="preferred_username") == "nikita.k@acme.onmicrosoft.com"
    with pytest.raises(PermissionDenied, match="'nikita' is not a principal"):  # policy could not name it
        principal(Idp(), token(preferred_username="nikita"), claim="preferred_username")


def test_made_up_key_ids_cannot_make_the_controller_hammer_the_provider() -> None:
    idp = Idp()
    provider = OidcProvider(OidcConfig(ISSUER, "idmesh"), transport=httpx.MockTransport(idp.handle))

    async def run() -> None:
        try:
            for i in range(20):
                forged = RSAKey.generate_key(2048, parameters={"kid": f"bogus{i % 5}"})
                with pytest.raises(InvalidToken):
                    await provider.principal(token(forged), NOW)
        finally:
            await provider.close()

    asyncio.run(run())
    assert idp.fetched.count("/jwks") == 1 + 3  # the first fetch, then at most three refetches a window
