"""People log in: a device starts a login, the person proves who they are, the device gets a principal certificate.

Two ways to prove it, one flow for the device (RFC 8628's shape: a user
code, a polling interval, a few well-defined answers):

* **with the organisation's OpenID provider** (``mesh-controller oidc set``):
  the controller starts the provider's device authorization, hands the
  device the provider's user code and verification URL, and polls the
  provider's token endpoint each time the device polls it (never more often
  than the provider's interval: a device polling faster is told
  ``slow_down``); the ID token is checked by :mod:`controller.oidc`;
* **without one** (the embedded default): the controller makes a user code
  (:data:`CODE_ALPHABET`, 40 bits) that an administrator approves with
  ``meshctl login approve CODE --principal P``, as Headscale registers
  nodes. Codes expire after :data:`APPROVAL_TTL`, are single use, stored
  only hashed, and wrong guesses are rate limited per source like
  enrollment tokens. A device's poll waits for the approval (up to the
  interval), so the certificate follows the approval at once.

Either way the key was made on the device (the login carries its CSR) and
the certificate is a ``user`` X509-SVID of the principal, bound in its
claims to the node the person logged in on. Every step is audited.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import datetime, timedelta

from meshcore.errors import InvalidInput, InvalidToken, NotFound, PermissionDenied, RateLimited
from meshcore.identity import Claims, Identity, cert_pem, load_certificate, load_csr
from meshcore.wire.api import GrantsRevoked, LoginApprove, LoginPoll, LoginStart, LoginStarted, PrincipalInfo

from .agents import count_ended
from .certificates import record_certificate, sign_timed
from .context import Context
from .grants import revoke_grants_locked
from .oidc import OidcConfig, OidcProvider
from .rows import LoginRow
from .store import Tx

__all__ = ["APPROVAL_TTL", "CODE_ALPHABET", "OIDC_META", "approve_login", "clear_oidc", "identity_provider",
           "logout", "oidc_config", "poll_login", "set_oidc", "start_login", "whoami"]

OIDC_META = "oidc"
APPROVAL_TTL = timedelta(minutes=10)
APPROVAL_INTERVAL = 5
CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
"""Consonants only (no words, no 0/O or 1/I to confuse); 20^8 codes, about 2^34.6 (RFC 8628 §6.1)."""
MAX_PENDING = 16
"""Logins a node may have waiting at once (a flood of starts must not fill the store)."""


# -- the identity provider's configuration ---------------------------------------------------------------
def oidc_config(tx: Tx) -> OidcConfig | None:
    text = tx.meta(OIDC_META)
    return OidcConfig.from_json(text) if text else None


def set_oidc(ctx: Context, actor: str, config: OidcConfig, now: datetime) -> None:
    with ctx.store.transaction() as tx:
        tx.set_meta(OIDC_META, config.to_json())
        tx.audit(now, actor, "oidc.set", config.issuer, client_id=config.client_id,
                 principal_claim=config.principal_claim, ca_file=config.ca_file,
                 client_secret_file=config.client_secret_file)


def clear_oidc(ctx: Context, actor: str, now: datetime) -> bool:
    with ctx.store.transaction() as tx:
        old = oidc_config(tx)
        if old is None:
            return False
        tx.set_meta(OIDC_META, "")
        tx.audit(now, actor, "oidc.cleared", old.issuer)
    return True


async def identity_provider(ctx: Context) -> OidcProvider | None:
    """The configured provider (None: the embedded approval), rebuilt when its configuration changed."""
    with ctx.store.transaction() as tx:
        config = oidc_config(tx)
    if config is None:
        return None
    text = config.to_json()
    if ctx.provider is None or ctx.provider[0] != text:
        if ctx.provider is not None:
            await ctx.provider[1].close()
        ctx.provider = (text, OidcProvider(config))
    return ctx.provider[1]


# -- a login --------------------------------------------------------------------------------------------------
def _code_hash(code: str) -> bytes:
    return hashlib.sha256(code.replace("-", "").strip().upper().encode()).digest()


def _new_code() -> str:
    letters = "".join(secrets.choice(CODE_ALPHABET) for _ in range(8))
    return f"{letters[:4]}-{letters[4:]}"


async def start_login(ctx: Context, caller: Identity, req: LoginStart, now: datetime) -> LoginStarted:
    """A node starts a login for a person on it; what the person must do comes back."""
    load_csr(req.csr)  # a CSR that cannot be signed fails now, not after the person approved
    node = caller.spiffe_id.name
    with ctx.store.transaction() as tx:
        if tx.pending_logins(node, now) >= MAX_PENDING:
            raise RateLimited(f"node {node} has {MAX_PENDING} logins waiting already; finish or let them expire")
    provider = await identity_provider(ctx)
    login_id = "l" + secrets.token_hex(16)
    if provider is not None:
        device = await provider.start_device()
        row = LoginRow(login_id, node, req.user, "oidc", None, device.device_code, req.csr, req.ttl_seconds,
                       device.interval, now, now + timedelta(seconds=device.expires_in), now, "pending")
        started = LoginStarted(id=login_id, mode="oidc", user_code=device.user_code,
                               verification_uri=device.verification_uri,
                               verification_uri_complete=device.verification_uri_complete,
                               expires_in=device.expires_in, interval=device.interval)
    else:
        code = _new_code()
        row = LoginRow(login_id, node, req.user, "approval", _code_hash(code), None, req.csr, req.ttl_seconds,
                       APPROVAL_INTERVAL, now, now + APPROVAL_TTL, now, "pending")
        started = LoginStarted(id=login_id, mode="approval", user_code=code,
                               expires_in=int(APPROVAL_TTL.total_seconds()), interval=APPROVAL_INTERVAL)
    with ctx.store.transaction() as tx:
        tx.insert_login(row)
        tx.audit(now, str(caller.spiffe_id), "login.started", login_id, node=node, local_user=req.user, uid=req.uid,
                 mode=row.mode, issuer=provider.config.issuer if provider else None)
    return started


def _mine(tx: Tx, caller: Identity, login_id: str) -> LoginRow:
    row = tx.login(login_id)
    if row is None or row.node != caller.spiffe_id.name:
        raise NotFound(f"no login {login_id!r} from this node")
    return row


def _done(row: LoginRow) -> LoginPoll:
    assert row.certificate is not None
    return LoginPoll(status="done", interval=row.interval, principal=row.principal, certificate=row.certificate,
                     not_after=load_certificate(row.certificate).not_valid_after_utc)


async def poll_login(ctx: Context, caller: Identity, login_id: str, now: datetime) -> LoginPoll:
    """One poll of the device (RFC 8628 §3.4-3.5, answered by the controller)."""
    with ctx.store.transaction() as tx:
        row = _mine(tx, caller, login_id)
        if row.state == "done":
            return _done(row)
        if row.state == "denied":
            raise PermissionDenied("the login was refused (access denied)")
        if now >= row.expires_at:
            raise InvalidToken("the login code expired; run meshctl login again")
        if row.mode == "oidc":
            if now < row.next_poll_at:
                interval = row.interval + 5
                tx.update_login(login_id, interval=interval, next_poll_at=now + timedelta(seconds=interval))
                return LoginPoll(status="slow_down", interval=interval)
            tx.update_login(login_id, next_poll_at=now + timedelta(seconds=row.interval))
    if row.mode == "approval":
        return await _wait_for_approval(ctx, caller, row)
    return await _poll_provider(ctx, caller, row, now)


async def _wait_for_approval(ctx: Context, caller: Identity, row: LoginRow) -> LoginPoll:
    event = ctx.approvals.setdefault(row.id, asyncio.Event())
    try:
        async with asyncio.timeout(row.interval):
            await event.wait()
    except TimeoutError:
        pass
    with ctx.store.transaction() as tx:
        fresh = _mine(tx, caller, row.id)
    if fresh.state == "done":
        ctx.approvals.pop(row.id, None)
        return _done(fresh)
    return LoginPoll(status="pending", interval=row.interval)


async def _poll_provider(ctx: Context, caller: Identity, row: LoginRow, now: datetime) -> LoginPoll:
    provider = await identity_provider(ctx)
    if provider is None:
        raise PermissionDenied("the identity provider was unconfigured during this login; run meshctl login again")
    assert row.device_code is not None
    answer = await provider.poll(row.device_code)
    actor = str(caller.spiffe_id)
    if answer.status == "pending":
        return LoginPoll(status="pending", interval=row.interval)
    if answer.status == "slow_down":
        interval = row.interval + 5
        with ctx.store.transaction() as tx:
            tx.update_login(row.id, interval=interval, next_poll_at=now + timedelta(seconds=interval))
        return LoginPoll(status="slow_down", interval=interval)
    if answer.status in ("denied", "expired"):
        with ctx.store.transaction() as tx:
            tx.update_login(row.id, state="denied")
            tx.audit(now, actor, "login.refused", row.id, node=row.node, reason=f"identity provider: {answer.status}")
        if answer.status == "expired":
            raise InvalidToken("the login code expired at the identity provider; run meshctl login again")
        raise PermissionDenied("the login was refused at the identity provider (access denied)")
    assert answer.id_token is not None
    try:
        principal = await provider.principal(answer.id_token, now.timestamp())
    except (InvalidToken, PermissionDenied) as exc:
        with ctx.store.transaction() as tx:
            tx.update_login(row.id, state="denied")
            tx.audit(now, actor, "login.refused", row.id, node=row.node, reason=str(exc))
        raise
    with ctx.store.transaction() as tx:
        fresh = _mine(tx, caller, row.id)
        if fresh.state == "done":  # a concurrent poll finished it
            return _done(fresh)
        done = _issue(ctx, tx, fresh, principal, actor, now, via=provider.config.issuer)
    return _done(done)


def _issue(ctx: Context, tx: Tx, row: LoginRow, principal: str, actor: str, now: datetime, via: str) -> LoginRow:
    """Sign the principal certificate for ``row``'s key (inside ``tx``), and mark the login done."""
    try:
        sid = ctx.settings.spiffe_id("user", principal)
    except InvalidInput as exc:
        raise PermissionDenied(str(exc)) from exc
    claims = Claims(kind="user", node=row.node, principal=principal)
    cert = sign_timed(ctx, load_csr(row.csr), sid, claims, now, timedelta(seconds=row.ttl_seconds))
    serial = record_certificate(tx, cert, sid, row.node, now)
    pem = cert_pem(cert)
    tx.update_login(row.id, state="done", principal=principal, serial=serial, certificate=pem)
    tx.audit(now, actor, "principal.logged_in", str(sid), principal=principal, node=row.node,
             local_user=row.local_user, serial=serial, not_after=cert.not_valid_after_utc, via=via)
    ctx.metrics.identities_issued.labels("user").inc()
    fresh = tx.login(row.id)
    assert fresh is not None
    return fresh


def approve_login(ctx: Context, caller: Identity, req: LoginApprove, source: str, now: datetime) -> PrincipalInfo:
    """The administrator approves a pending login by its user code: the device gets its certificate at once."""
    ctx.limiter.check(source, now)
    actor = str(caller.spiffe_id)
    with ctx.store.transaction() as tx:
        tx.lock("login approvals")  # one code approved on two replicas at once: one certificate
        row = tx.pending_login_by_code(_code_hash(req.code), now)
        done = _issue(ctx, tx, row, req.principal, actor, now, via=f"approval by {actor}") if row else None
        if row is not None:
            tx.audit(now, actor, "login.approved", row.id, source, principal=req.principal, node=row.node)
    if done is None:
        ctx.limiter.record_failure(source, now)
        with ctx.store.transaction() as tx:
            tx.audit(now, actor, "login.refused", None, source, reason="no pending login has this code")
        raise InvalidToken(f"no login is waiting for code {req.code!r} (wrong, already used or expired)")
    event = ctx.approvals.get(done.id)
    if event is not None:  # a device polling this replica: woken on its loop (this runs in a worker thread)
        ctx.on_loop(event.set)
    assert done.serial is not None and done.certificate is not None
    return _principal_info(ctx, req.principal, done.node, done.serial, done.certificate)


def _principal_info(ctx: Context, principal: str, device: str | None, serial: str, pem: str) -> PrincipalInfo:
    cert = load_certificate(pem)
    return PrincipalInfo(principal=principal, spiffe_id=str(ctx.settings.spiffe_id("user", principal)),
                         device=device, serial=serial, issued_at=cert.not_valid_before_utc,
                         not_after=cert.not_valid_after_utc)


def whoami(ctx: Context, caller: Identity) -> PrincipalInfo:
    """The calling principal certificate, as the controller knows it."""
    return PrincipalInfo(principal=caller.spiffe_id.name, spiffe_id=str(caller.spiffe_id), device=caller.claims.node,
                         serial=caller.serial_hex, issued_at=caller.not_before, not_after=caller.not_after)


def logout(ctx: Context, caller: Identity, now: datetime) -> GrantsRevoked:
    """Revoke the calling principal certificate, every grant it signed and the agents born from them."""
    actor = str(caller.spiffe_id)
    with ctx.store.transaction() as tx:
        tx.revoke_certificate(caller.serial_hex, now)
        tx.audit(now, actor, "principal.logged_out", actor, principal=caller.spiffe_id.name, serial=caller.serial_hex,
                 node=caller.claims.node)
        rows = [g for g in tx.grants(signer=caller.serial_hex) if g.revoked_at is None]
        ended = revoke_grants_locked(ctx, tx, actor, rows, now)
    count_ended(ctx, ended, revoked=True)
    return GrantsRevoked(grants=[g.id for g in rows], agents=ended)
