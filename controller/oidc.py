"""The controller as an OpenID Connect relying party: the organisation's identity provider says who a person is.

The person logs in on their device with the OAuth 2.0 Device Authorization
Grant (RFC 8628), but the controller, not the device, talks to the provider:
it holds the client secret (``--client-secret-file``), starts the device
authorization, polls the token endpoint while the device polls it, and
checks the ID token before it signs a principal certificate. The device
never sees a token.

An ID token is accepted when (joserfc does the JOSE): its signature
verifies with a key of the provider's JWKS, fetched from its discovery
document and cached (a token signed with a key not in the cache refetches
the JWKS once: the provider rotated its keys); ``iss`` is the issuer;
``aud`` holds the client id (and ``azp`` is it, when there are several
audiences); ``exp`` and ``iat`` hold within :data:`LEEWAY`; and the
principal claim (``email`` by default) is present and verified
(``email_verified`` true — an unverified address would let anyone register
``nikita@acme.com`` with the provider and be Nikita here). The device flow
needs no nonce: the token comes back to the party that started the flow,
over its own TLS connection, for its own device code.
"""

from __future__ import annotations

import json
import re
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc import jws, jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from meshcore.errors import InvalidInput, InvalidToken, PermissionDenied, Unavailable
from meshcore.names import PRINCIPAL_PATTERN, normal_principal

__all__ = ["LEEWAY", "DeviceAuthorization", "OidcConfig", "OidcProvider", "TokenPoll"]

LEEWAY = 60
"""Seconds of clock difference tolerated on ``exp`` and ``iat``."""
METADATA_TTL = 3600.0
JWKS_WINDOW = 10.0
JWKS_REFETCHES = 3
"""A token naming a key not in the cached JWKS refetches it, at most once for that key id and
:data:`JWKS_REFETCHES` times in all per :data:`JWKS_WINDOW` seconds: a rotation is picked up at once, and a flood
of made-up key ids cannot make the controller hammer the provider."""
_ALGORITHMS = ("RS256", "ES256", "PS256", "Ed25519", "EdDSA")
_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass(frozen=True)
class OidcConfig:
    """``mesh-controller oidc set``: which provider, which client; the secret stays in its file."""

    issuer: str
    client_id: str
    client_secret_file: str | None = None
    ca_file: str | None = None
    principal_claim: str = "email"
    scopes: str = "openid email"

    def __post_init__(self) -> None:
        url = urlsplit(self.issuer)
        if url.scheme != "https" or not url.hostname:
            raise InvalidInput(f"issuer {self.issuer!r} must be an https:// URL")
        if not self.client_id.strip():
            raise InvalidInput("the client id must not be empty")
        for name in ("client_secret_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_absolute():
                raise InvalidInput(f"--{name.replace('_', '-')} must be an absolute path, got {path!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OidcConfig:
        return cls(**json.loads(text))

    def secret(self) -> str | None:
        if self.client_secret_file is None:
            return None
        try:
            return Path(self.client_secret_file).read_text().strip()
        except OSError as exc:
            raise Unavailable(f"cannot read the OIDC client secret {self.client_secret_file}: "
                              f"{exc.strerror or exc}") from exc


@dataclass(frozen=True)
class DeviceAuthorization:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


@dataclass(frozen=True)
class TokenPoll:
    """One poll of the token endpoint: ``pending``, ``slow_down``, ``denied``, ``expired`` or ``ok``."""

    status: str
    id_token: str | None = None


class OidcProvider:
    """One identity provider, as :class:`OidcConfig` names it. Safe to share between requests."""

    def __init__(self, config: OidcConfig, clock: Any = time.monotonic,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``transport`` replaces the network (unit tests of the token checks); ``clock`` the cache's time."""
        self.config = config
        verify: ssl.SSLContext | bool = True
        if config.ca_file:
            try:
                verify = ssl.create_default_context(cafile=config.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise Unavailable(f"cannot load --ca-file {config.ca_file}: {exc}") from exc
        self._http = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(10.0), trust_env=False,
                                       transport=transport)
        self._clock = clock
        self._metadata: tuple[float, dict[str, Any]] | None = None
        self._jwks: KeySet | None = None
        self._refetches: list[tuple[float, str]] = []  # (when, for which kid) in the current window

    async def close(self) -> None:
        await self._http.aclose()

    # -- the provider's documents -----------------------------------------------------------------------
    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            resp = await self._http.get(url)
            resp.raise_for_status()
            doc = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unavailable(f"the identity provider's {what} ({url}) is unavailable: {exc}") from exc
        if not isinstance(doc, dict):
            raise Unavailable(f"the identity provider's {what} ({url}) is not a JSON object")
        return doc

    async def metadata(self) -> dict[str, Any]:
        """The discovery document (``/.well-known/openid-configuration``), cached for :data:`METADATA_TTL`."""
        now = self._clock()
        if self._metadata is None or now - self._metadata[0] > METADATA_TTL:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = await self._get_json(url, "discovery document")
            if doc.get("issuer") != self.config.issuer:
                raise Unavailable(f"the discovery document at {url} names issuer {doc.get('issuer')!r}, "
                                  f"not {self.config.issuer!r}")
            for key in ("jwks_uri", "token_endpoint", "device_authorization_endpoint"):
                if not isinstance(doc.get(key), str):
                    raise Unavailable(f"the identity provider {self.config.issuer} has no {key} "
                                      "(is the device flow enabled for it?)")
            self._metadata = (now, doc)
        return self._metadata[1]

    async def _keys(self, unknown_kid: str | None = None) -> KeySet:
        """The cached JWKS; fetched again when a token names ``unknown_kid`` (within :data:`JWKS_REFETCHES`)."""
        now = self._clock()
        if self._jwks is not None and unknown_kid is not None:
            self._refetches = [(t, k) for t, k in self._refetches if now - t < JWKS_WINDOW]
            if len(self._refetches) >= JWKS_REFETCHES or any(k == unknown_kid for _, k in self._refetches):
                return self._jwks
            self._refetches.append((now, unknown_kid))
        if self._jwks is None or unknown_kid is not None:
            doc = await self._get_json(str((await self.metadata())["jwks_uri"]), "JWKS")
            try:
                self._jwks = KeySet.import_key_set(doc)  # type: ignore[arg-type]
            except (JoseError, ValueError, KeyError, TypeError) as exc:
                raise Unavailable(f"the identity provider's JWKS is malformed: {exc}") from exc
        return self._jwks

    # -- the device flow ------------------------------------------------------------------------------------
    def _auth(self) -> tuple[dict[str, str], httpx.BasicAuth | None]:
        secret = self.config.secret()
        if secret is None:
            return {"client_id": self.config.client_id}, None
        return {}, httpx.BasicAuth(self.config.client_id, secret)

    async def start_device(self) -> DeviceAuthorization:
        """RFC 8628 §3.1: ask for a device code and a user code."""
        form, auth = self._auth()
        url = str((await self.metadata())["device_authorization_endpoint"])
        try:
            resp = await self._http.post(url, data={**form, "scope": self.config.scopes}, auth=auth or httpx.USE_CLIENT_DEFAULT)
            doc = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unavailable(f"the identity provider's device authorization endpoint failed: {exc}") from exc
        if resp.status_code != 200 or not isinstance(doc, dict):
            detail = doc.get("error_description") or doc.get("error") if isinstance(doc, dict) else None
            raise Unavailable(f"the identity provider refused to start a device login: {detail or resp.status_code}")
        try:
            return DeviceAuthorization(
                device_code=str(doc["device_code"]), user_code=str(doc["user_code"]),
                verification_uri=str(doc["verification_uri"]),
                verification_uri_complete=doc.get("verification_uri_complete"),
                expires_in=int(doc["expires_in"]), interval=int(doc.get("interval", 5)))
        except (KeyError, ValueError, TypeError) as exc:
            raise Unavailable(f"the identity provider's device authorization answer lacks {exc}") from exc

    async def poll(self, device_code: str) -> TokenPoll:
        """RFC 8628 §3.4: one token request; its errors (§3.5) become statuses."""
        form, auth = self._auth()
        url = str((await self.metadata())["token_endpoint"])
        try:
            resp = await self._http.post(url, data={**form, "grant_type": _DEVICE_GRANT, "device_code": device_code},
                                         auth=auth or httpx.USE_CLIENT_DEFAULT)
            doc = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unavailable(f"the identity provider's token endpoint failed: {exc}") from exc
        if resp.status_code == 200 and isinstance(doc, dict) and isinstance(doc.get("id_token"), str):
            return TokenPoll("ok", doc["id_token"])
        error = doc.get("error") if isinstance(doc, dict) else None
        known = {"authorization_pending": "pending", "slow_down": "slow_down", "access_denied": "denied",
                 "expired_token": "expired"}
        if error in known:
            return TokenPoll(known[error])
        raise Unavailable(f"the identity provider's token endpoint answered {resp.status_code} {error or ''}".rstrip())

    # -- the ID token ------------------------------------------------------------------------------------------
    async def principal(self, id_token: str, now: float | None = None) -> str:
        """Who the ID token says the person is (the principal claim, verified), or :class:`InvalidToken`."""
        meta = await self.metadata()
        allowed = [a for a in meta.get("id_token_signing_alg_values_supported", ["RS256"]) if a in _ALGORITHMS]
        try:
            try:
                token = jwt.decode(id_token, await self._keys(), algorithms=allowed)
            except InvalidKeyIdError:  # a key we have not seen: the provider may have rotated
                kid = str(jws.extract_compact(id_token.encode()).headers().get("kid"))
                token = jwt.decode(id_token, await self._keys(unknown_kid=kid), algorithms=allowed)
        except JoseError as exc:
            raise InvalidToken(f"ID token refused: its signature does not verify with {self.config.issuer}'s "
                               f"keys ({exc.error})") from exc
        except ValueError as exc:
            raise InvalidToken(f"ID token refused: malformed ({exc})") from exc
        claims = token.claims
        at = int(now if now is not None else time.time())
        registry = jwt.JWTClaimsRegistry(
            now=at, leeway=LEEWAY, iss={"essential": True, "value": self.config.issuer},
            aud={"essential": True, "value": self.config.client_id}, exp={"essential": True}, iat={"essential": True})
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise InvalidToken(f"ID token refused: {exc.description or exc.error}") from exc
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.config.client_id:
            raise InvalidToken("ID token refused: several audiences and azp is not this client")
        if isinstance(claims.get("iat"), int) and claims["iat"] > at + LEEWAY:
            raise InvalidToken("ID token refused: issued in the future")
        name = self.config.principal_claim
        value = claims.get(name)
        if not isinstance(value, str) or not value:
            raise PermissionDenied(f"the identity provider's token has no {name} claim to name the principal")
        verified = claims.get(f"{name}_verified", name != "email")
        if verified is not True:
            raise PermissionDenied(f"the identity provider has not verified {name} {value}: no principal "
                                   "certificate for it")
        if len(value) > 320 or not re.match(PRINCIPAL_PATTERN, value):
            raise PermissionDenied(f"the identity provider's {name} {value!r} is not a principal "
                                   "(local@domain, visible characters only)")
        return normal_principal(value)
