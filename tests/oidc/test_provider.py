"""The test OpenID provider proves itself, with nothing of idmesh: discovery, the device flow end to end
with the Python approver, the errors a relying party must handle, and key rotation. The relying-party
side (device authorization request, polling, ID token verification with joserfc) is written out here
in a few lines, as the controller will do it."""

from __future__ import annotations

import time
from typing import Any, cast

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, KeySetSerialization

from tests.oidc import DEVICE_CODE_GRANT, ApprovalError, Client, OidcProvider


def discovery(provider: OidcProvider) -> dict[str, Any]:
    with provider.http() as http:
        response = http.get(provider.discovery_url)
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


def device_authorize(provider: OidcProvider, client: Client, scope: str = "openid email") -> dict[str, Any]:
    """The device's first request (RFC 8628 §3.1): client_secret_basic for a confidential client,
    client_id in the form for a public one."""
    form = {"scope": scope}
    if client.client_secret is None:
        form["client_id"] = client.client_id
    with provider.http() as http:
        response = http.post(discovery(provider)["device_authorization_endpoint"], data=form, auth=client.auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def poll(provider: OidcProvider, client: Client, device_code: str) -> httpx.Response:
    """One token request with the device code (RFC 8628 §3.4)."""
    form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code}
    if client.client_secret is None:
        form["client_id"] = client.client_id
    with provider.http() as http:
        return http.post(f"{provider.issuer}/token", data=form, auth=client.auth)


def poll_error(provider: OidcProvider, client: Client, device_code: str) -> str:
    response = poll(provider, client, device_code)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert isinstance(error, str)
    return error


def jwks(provider: OidcProvider) -> dict[str, Any]:
    with provider.http() as http:
        response = http.get(discovery(provider)["jwks_uri"])
    response.raise_for_status()
    keys: dict[str, Any] = response.json()
    return keys


def verified_id_token(provider: OidcProvider, id_token: str, client: Client) -> jwt.Token:
    """Verify signature (against the published JWKS), iss, aud, exp, iat and sub, as the controller must."""
    keys = KeySet.import_key_set(cast(KeySetSerialization, jwks(provider)))
    token = jwt.decode(id_token, keys, algorithms=["RS256"])
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": provider.issuer},
        aud={"essential": True, "value": client.client_id},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
    ).validate(token.claims)
    return token


def login(provider: OidcProvider, client: Client, person: str, *, by_user_code: bool = False) -> dict[str, Any]:
    """A whole device flow: authorize, the person approves, one poll gets the tokens."""
    grant = device_authorize(provider, client)
    provider.approve(grant["user_code"] if by_user_code else grant["verification_uri_complete"], login=person)
    response = poll(provider, client, grant["device_code"])
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def test_discovery_announces_the_device_flow(oidc_provider: OidcProvider) -> None:
    document = discovery(oidc_provider)
    assert document["issuer"] == oidc_provider.issuer
    assert document["device_authorization_endpoint"] == f"{oidc_provider.issuer}/device/auth"
    assert DEVICE_CODE_GRANT in document["grant_types_supported"]
    assert {"openid", "email"} <= set(document["scopes_supported"])
    assert {"email", "email_verified"} <= set(document["claims_supported"])
    assert {"client_secret_basic", "none"} <= set(document["token_endpoint_auth_methods_supported"])
    assert "RS256" in document["id_token_signing_alg_values_supported"]


def test_device_authorization_response(oidc_provider: OidcProvider) -> None:
    grant = device_authorize(oidc_provider, oidc_provider.confidential)
    assert set(grant) == {"device_code", "user_code", "verification_uri", "verification_uri_complete",
                          "expires_in", "interval"}
    assert grant["verification_uri"] == f"{oidc_provider.issuer}/device"
    assert grant["verification_uri_complete"] == f"{grant['verification_uri']}?user_code={grant['user_code']}"
    assert grant["expires_in"] == 600
    assert grant["interval"] == 1


def test_full_device_flow_with_the_confidential_client(oidc_provider: OidcProvider) -> None:
    client = oidc_provider.confidential
    tokens = login(oidc_provider, client, "nikita@acme.com")
    assert tokens["token_type"] == "Bearer"
    assert tokens["scope"] == "openid email"
    assert "refresh_token" not in tokens
    token = verified_id_token(oidc_provider, tokens["id_token"], client)
    claims = token.claims
    assert set(claims) == {"iss", "aud", "sub", "iat", "exp", "email", "email_verified"}  # no nonce, no azp
    assert claims["sub"] == "nikita@acme.com"
    assert claims["email"] == "nikita@acme.com"
    assert claims["email_verified"] is True
    assert claims["aud"] == client.client_id
    assert claims["exp"] - claims["iat"] == 3600
    assert token.header["alg"] == "RS256"
    assert token.header["kid"] in {k["kid"] for k in jwks(oidc_provider)["keys"]}


def test_public_client_and_a_typed_user_code(oidc_provider: OidcProvider) -> None:
    client = oidc_provider.public
    tokens = login(oidc_provider, client, "li@acme.com", by_user_code=True)
    claims = verified_id_token(oidc_provider, tokens["id_token"], client).claims
    assert (claims["email"], claims["email_verified"], claims["aud"]) == ("li@acme.com", True, "idmesh-cli")


def test_mallorys_email_is_not_verified(oidc_provider: OidcProvider) -> None:
    tokens = login(oidc_provider, oidc_provider.confidential, "mallory@acme.com")
    claims = verified_id_token(oidc_provider, tokens["id_token"], oidc_provider.confidential).claims
    assert claims["email"] == "mallory@acme.com"
    assert claims["email_verified"] is False


def test_pending_before_approval_then_tokens_once(oidc_provider: OidcProvider) -> None:
    client = oidc_provider.confidential
    grant = device_authorize(oidc_provider, client)
    assert poll_error(oidc_provider, client, grant["device_code"]) == "authorization_pending"
    oidc_provider.approve(grant["verification_uri_complete"])
    time.sleep(grant["interval"])  # an honest device waits the interval between two polls
    tokens = poll(oidc_provider, client, grant["device_code"])
    assert tokens.status_code == 200
    with oidc_provider.http() as http:
        userinfo = http.get(f"{oidc_provider.issuer}/me",
                            headers={"authorization": f"Bearer {tokens.json()['access_token']}"})
    assert userinfo.json() == {"sub": "nikita@acme.com", "email": "nikita@acme.com", "email_verified": True}
    # A device code is good for one token response; polling it again is taken as a replay and revokes
    # the whole grant, the access token just issued included.
    assert poll_error(oidc_provider, client, grant["device_code"]) == "invalid_grant"
    with oidc_provider.http() as http:
        revoked = http.get(f"{oidc_provider.issuer}/me",
                           headers={"authorization": f"Bearer {tokens.json()['access_token']}"})
    assert revoked.status_code == 401


def test_polling_too_fast_gets_slow_down(oidc_provider: OidcProvider) -> None:
    client = oidc_provider.confidential
    grant = device_authorize(oidc_provider, client)
    assert poll_error(oidc_provider, client, grant["device_code"]) == "authorization_pending"
    response = poll(oidc_provider, client, grant["device_code"])
    assert response.status_code == 400
    assert response.json()["error"] == "slow_down"
    assert "every 6 s" in response.json()["error_description"]


def test_deny_gives_access_denied(oidc_provider: OidcProvider) -> None:
    client = oidc_provider.confidential
    grant = device_authorize(oidc_provider, client)
    oidc_provider.deny(grant["verification_uri_complete"])
    assert poll_error(oidc_provider, client, grant["device_code"]) == "access_denied"
    with pytest.raises(ApprovalError, match="already been used|incorrect|error"):
        oidc_provider.approve(grant["verification_uri_complete"])


def test_cancel_at_consent_gives_access_denied(oidc_provider: OidcProvider) -> None:
    client = oidc_provider.public
    grant = device_authorize(oidc_provider, client)
    oidc_provider.approve(grant["user_code"], login="li@acme.com", consent=False)
    assert poll_error(oidc_provider, client, grant["device_code"]) == "access_denied"


def test_unknown_user_code_is_refused(oidc_provider: OidcProvider) -> None:
    with pytest.raises(ApprovalError, match="incorrect"):
        oidc_provider.approve("BCDF-GHJK")


def test_only_known_people_sign_in(oidc_provider: OidcProvider) -> None:
    with pytest.raises(ValueError, match="eve@acme.com"):
        oidc_provider.approve("BCDF-GHJK", login="eve@acme.com")


def test_device_code_expires(oidc_provider: OidcProvider) -> None:
    client = oidc_provider.brief
    grant = device_authorize(oidc_provider, client)
    assert grant["expires_in"] == 2
    errors = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "expired_token" not in errors:
        errors.append(poll_error(oidc_provider, client, grant["device_code"]))
        time.sleep(grant["interval"])
    assert errors[0] == "authorization_pending"
    assert errors[-1] == "expired_token"
    assert set(errors) == {"authorization_pending", "expired_token"}


def test_rotate_keys_signs_with_a_new_published_key(oidc_provider: OidcProvider) -> None:
    client = oidc_provider.confidential
    before = verified_id_token(oidc_provider, login(oidc_provider, client, "nikita@acme.com")["id_token"], client)
    in_flight = device_authorize(oidc_provider, client)

    new_kid = oidc_provider.rotate_keys()

    published = [k["kid"] for k in jwks(oidc_provider)["keys"]]
    assert new_kid != before.header["kid"]
    assert published[0] == new_kid and before.header["kid"] in published
    after = verified_id_token(oidc_provider, login(oidc_provider, client, "li@acme.com")["id_token"], client)
    assert after.header["kid"] == new_kid
    oidc_provider.approve(in_flight["verification_uri_complete"], login="nikita@acme.com")  # survived the swap
    survivor = poll(oidc_provider, client, in_flight["device_code"])
    assert survivor.status_code == 200, survivor.text
    assert verified_id_token(oidc_provider, survivor.json()["id_token"], client).header["kid"] == new_kid

    newest = oidc_provider.rotate_keys(retire_old=True)
    assert [k["kid"] for k in jwks(oidc_provider)["keys"]] == [newest]
