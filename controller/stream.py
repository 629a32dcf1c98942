"""One node's netmap stream: what makes it whole, then what changes, and a keepalive when nothing does.

The node is subscribed before its first messages are put together, so no
change can fall between the two: anything published meanwhile is queued
and follows. What makes a node whole is always the same three parts in the
same order — the policy, the map (or only the deltas since the version it
already has), the live agents — whether it is just connecting or fell so
far behind that its queue was dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from meshcore.errors import Outdated
from meshcore.wire import MIN_PROTOCOL, PROTOCOL, negotiate
from meshcore.wire.stream import NetmapDelta, StreamMessage

from .agents import agent_update_full
from .context import Context
from .netmap import KEEPALIVE, Outgoing, Subscription

__all__ = ["KEEPALIVE_SECONDS", "agree", "open_stream"]

# A keepalive line this often keeps NATs open and lets a node notice a dead
# controller within KEEPALIVE + its read timeout.
KEEPALIVE_SECONDS = 10.0


def agree(node: str, announced: str | None) -> int:
    """The protocol to speak with ``node``, which announced ``announced`` (nothing: a node older than the
    handshake, which reads protocol 2), or :class:`Outdated` for one this controller no longer serves."""
    protocol = negotiate(announced)
    if protocol is None:
        raise Outdated(f"node {node} speaks wire protocol {announced!r}; this controller serves "
                       f"{MIN_PROTOCOL} to {PROTOCOL}: upgrade meshd on {node}")
    return protocol


def open_stream(ctx: Context, node: str, since: int | None, clock: Callable[[], datetime],
                protocol: int = PROTOCOL) -> AsyncIterator[bytes]:
    """Subscribe ``node`` and return its stream's lines: a full map, or the
    deltas after ``since`` when the hub still has them, then deltas as they happen.

    ``protocol`` is what :func:`agree` settled on; every message of this
    version is one a protocol-2 node reads, so nothing depends on it yet.
    """
    sub = ctx.hub.subscribe(node, protocol)
    backlog = ctx.hub.since(since) if since is not None else None
    first = _everything(ctx, backlog, clock())
    return _lines(ctx, sub, first, clock)


def _everything(ctx: Context, deltas: list[NetmapDelta] | None, now: datetime) -> list[Outgoing]:
    """What a node needs to be whole: policy first, then the map, then the agents."""
    hub = ctx.hub
    out = [Outgoing.of(StreamMessage(type="policy", policy=hub.policy))] if hub.policy else []
    out += ([Outgoing.of(StreamMessage(type="delta", delta=d)) for d in deltas] if deltas is not None
            else [Outgoing.of(StreamMessage(type="full", full=hub.full()))])
    out.append(Outgoing.of(StreamMessage(type="agents", agents=agent_update_full(ctx, now))))
    return out


async def _lines(ctx: Context, sub: Subscription, first: list[Outgoing],
                 clock: Callable[[], datetime]) -> AsyncIterator[bytes]:
    try:
        for message in first:
            yield message.line
        while not sub.closed:
            if sub.resync:  # it fell behind: drop its queue, send it whole again
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.resync = False
                for message in _everything(ctx, None, clock()):
                    yield message.line
                continue
            try:
                message = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                message = KEEPALIVE
            if sub.closed:
                break
            yield message.line
    finally:
        ctx.hub.unsubscribe(sub)
