"""Enrollment tokens: made, listed and deleted by the admin.

Only a token's hash is stored; the line itself is returned once, by
:func:`create_token`. Checking a presented token belongs to enrollment,
where it is spent, in the same transaction that creates the node.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from meshcore.errors import InvalidInput, NotFound
from meshcore.tokens import new_token, token_hash
from meshcore.wire.api import TokenCreated, TokenCreateRequest, TokenInfo

from .context import Context
from .rows import TokenRow

__all__ = ["create_token", "delete_token", "list_tokens"]


def create_token(ctx: Context, actor: str, req: TokenCreateRequest, now: datetime) -> TokenCreated:
    if req.owner and req.tags:
        # As in Tailscale: a tagged node belongs to the mesh, not to a person.
        raise InvalidInput("a node is either owned by a principal (--owner) or tagged (--tag), not both")
    # every replica, this one first: a node enrolls through any that answers, and keeps the list
    urls = (ctx.settings.url, *(u for u in ctx.hub.controllers if u != ctx.settings.url))
    token = new_token(ctx.settings.url, ctx.ca.fingerprint, urls=urls)
    line = token.encode()
    row = TokenRow(token.id, token_hash(line), sorted(set(req.tags)), req.owner, req.reusable, now,
                   now + timedelta(seconds=req.ttl_seconds), 0, actor)
    with ctx.store.transaction() as tx:
        tx.insert_token(row)
        tx.audit(now, actor, "token.created", token.id, tags=row.tags, owner=row.owner,
                 reusable=row.reusable, expires=row.expires_at)
    return TokenCreated(token=line, **_token_info(row).model_dump())


def list_tokens(ctx: Context) -> list[TokenInfo]:
    with ctx.store.transaction() as tx:
        return [_token_info(t) for t in tx.tokens()]


def delete_token(ctx: Context, actor: str, token_id: str, now: datetime) -> None:
    with ctx.store.transaction() as tx:
        if not tx.delete_token(token_id):
            raise NotFound(f"no token with id {token_id!r}")
        tx.audit(now, actor, "token.deleted", token_id)


def _token_info(row: TokenRow) -> TokenInfo:
    return TokenInfo(id=row.id, tags=row.tags, owner=row.owner, reusable=row.reusable, expires=row.expires_at,
                     created=row.created_at, uses=row.uses)
