"""What the Workload API hands a local agent: its X509-SVID (renewed), JWT-SVIDs, and the mesh's bundles.

An X509-SVID is signed by the controller for the agent's own key (the key
never changes and never leaves the node: only the certificate rotates, so
a program that loaded the key once keeps a valid one). It lives at most
the controller's ``--svid-ttl`` and is renewed when half of its life has
passed, as SPIRE's agent does (counted from its arrival: the controller
backdates notBefore for clock skew); a renewal the controller does not answer is
tried again every :data:`RETRY_EVERY` while the current one is still
valid. JWT-SVIDs are cached per audience until half their life (at most
five minutes, controller.workload). The JWT bundle is the controller's
JWKS, fetched again every :data:`JWKS_EVERY`.

When an agent ends (exit, expiry, revocation) :meth:`Svids.ended` drops
what was cached for it and wakes its streams, which then refuse it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from meshcore.errors import IdmeshError, InvalidInput, NotFound, PermissionDenied, Unavailable
from meshcore.wire.api import JwtSvid, WorkloadSvid
from meshd.agents.supervisor import LocalAgent

__all__ = ["Svids", "X509Svid"]

RETRY_EVERY = 5.0
JWKS_EVERY = 300.0
JWT_CACHE = 16
"""Audiences whose JWT-SVID is cached per agent (the oldest goes first)."""


class Controller(Protocol):
    async def call(self, method: str, path: str, body: object = None) -> object: ...


@dataclass(frozen=True)
class X509Svid:
    spiffe_id: str
    certificate: bytes  # DER
    key: bytes  # PKCS#8 DER
    not_after: float
    renew_at: float
    """Half the life left when it arrived (not from its notBefore: the controller backdates that for skew)."""


@dataclass
class _Agent:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    svid: X509Svid | None = None
    retry_at: float = 0.0
    jwts: dict[tuple[str, ...], tuple[str, float]] = field(default_factory=dict)  # audience -> (token, renew at)


class Svids:
    def __init__(self, controller: Controller, agents: Mapping[str, LocalAgent], trust_domain: str,
                 ca_pem: bytes, clock: Callable[[], float] = time.time) -> None:
        self._controller = controller
        self._agents = agents  # the supervisor's live local agents, by id
        self.trust_domain = trust_domain
        self.bundle = x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)  # the mesh CA
        self._clock = clock
        self._state: dict[str, _Agent] = {}
        self._jwks: tuple[bytes, float] | None = None  # (JSON, fetched at)
        self._jwks_lock = asyncio.Lock()

    def _entry(self, agent_id: str) -> _Agent:
        if agent_id not in self._agents:
            raise PermissionDenied(f"agent {agent_id} has ended")
        return self._state.setdefault(agent_id, _Agent())

    def spiffe_id(self, agent_id: str) -> str:
        return self._agents[agent_id].issued.agent.spiffe_id

    def ended(self, agent_id: str) -> None:
        entry = self._state.pop(agent_id, None)
        if entry is not None:
            entry.ended.set()

    async def x509(self, agent_id: str) -> X509Svid:
        """The agent's current X509-SVID: a new one once half the current one's life has passed."""
        entry = self._entry(agent_id)
        async with entry.lock:
            now = self._clock()
            current = entry.svid
            if current is not None and (now < current.renew_at or now < entry.retry_at):
                return current
            try:
                answer = WorkloadSvid.model_validate(await self._controller.call("POST", f"/v1/agents/{agent_id}/svid"))
            except (PermissionDenied, NotFound):
                raise PermissionDenied(f"agent {agent_id} is no longer live") from None
            except IdmeshError:
                if current is None or now >= current.not_after:
                    raise
                entry.retry_at = now + RETRY_EVERY  # the current one is still good: keep it, ask again soon
                return current
            entry.svid = self._svid(agent_id, answer)
            return entry.svid

    def _svid(self, agent_id: str, answer: WorkloadSvid) -> X509Svid:
        cert = x509.load_pem_x509_certificate(answer.certificate.encode())
        pem = (self._agents[agent_id].directory / "agent.key").read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        now, not_after = self._clock(), cert.not_valid_after_utc.timestamp()
        return X509Svid(self.spiffe_id(agent_id), cert.public_bytes(serialization.Encoding.DER), der, not_after,
                        now + (not_after - now) / 2)

    async def changed(self, agent_id: str, svid: X509Svid) -> None:
        """Return once ``svid`` is due for renewal (or to be retried), or the agent ended."""
        entry = self._entry(agent_id)
        wait = max(svid.renew_at, entry.retry_at) - self._clock()
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                await entry.ended.wait()
        except TimeoutError:
            pass

    async def until_ended(self, agent_id: str) -> None:
        await self._entry(agent_id).ended.wait()

    async def jwt(self, agent_id: str, audience: tuple[str, ...]) -> str:
        if not audience or any(not a for a in audience):
            raise InvalidInput("a JWT-SVID needs an audience")
        entry = self._entry(agent_id)
        key = tuple(sorted(set(audience)))
        cached = entry.jwts.get(key)
        now = self._clock()
        if cached is not None and now < cached[1]:
            return cached[0]
        try:
            answer = JwtSvid.model_validate(await self._controller.call(
                "POST", f"/v1/agents/{agent_id}/jwt", {"audience": list(key)}))
        except (PermissionDenied, NotFound):
            raise PermissionDenied(f"agent {agent_id} is no longer live") from None
        entry.jwts.pop(key, None)
        while len(entry.jwts) >= JWT_CACHE:
            entry.jwts.pop(next(iter(entry.jwts)))
        entry.jwts[key] = (answer.token, now + (answer.expires.timestamp() - now) / 2)
        return answer.token

    async def jwks(self) -> bytes:
        """The mesh's JWT bundle (a JWKS, as JSON), refreshed every :data:`JWKS_EVERY`."""
        async with self._jwks_lock:
            now = self._clock()
            if self._jwks is not None and now - self._jwks[1] < JWKS_EVERY:
                return self._jwks[0]
            try:
                answer = await self._controller.call("GET", "/v1/jwks")
            except IdmeshError:
                if self._jwks is None:
                    raise
                return self._jwks[0]  # the keys we have still verify what was signed with them
            if not isinstance(answer, dict) or not isinstance(answer.get("keys"), list):
                raise Unavailable("the controller's JWKS is not a key set")
            self._jwks = (json.dumps(answer, separators=(",", ":")).encode(), now)
            return self._jwks[0]

    async def validate(self, token: str, audience: str) -> tuple[str, dict[str, Any]]:
        """A JWT-SVID's SPIFFE ID and claims, if the mesh signed it for ``audience`` and it is current."""
        if not audience:
            raise InvalidInput("validating a JWT-SVID needs the audience")
        # a SPIFFE bundle marks its JWT keys "use": "jwt-svid", which joserfc (RFC 7517: sig or enc) refuses
        bundle = json.loads(await self.jwks())
        keys = KeySet.import_key_set({"keys": [{k: v for k, v in key.items() if k != "use"}
                                               for key in bundle["keys"] if key.get("use") == "jwt-svid"]})
        try:
            decoded = jwt.decode(token, keys, algorithms=["ES256"])
            jwt.JWTClaimsRegistry(exp={"essential": True}, sub={"essential": True}).validate(decoded.claims)
        except (JoseError, ValueError) as exc:
            raise InvalidInput(f"not a valid JWT-SVID: {exc}") from None
        claims = decoded.claims
        aud = claims.get("aud")
        if audience not in (aud if isinstance(aud, list) else [aud]):
            raise InvalidInput(f"the JWT-SVID is not for audience {audience}")
        sub = str(claims["sub"])
        if not sub.startswith(f"spiffe://{self.trust_domain}/"):
            raise InvalidInput(f"the JWT-SVID's subject {sub} is not of trust domain {self.trust_domain}")
        return sub, claims

