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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime

from meshcore.errors import NotFound, Outdated
from meshcore.turn import turn_credentials
from meshcore.wire import MIN_PROTOCOL, PROTOCOL, negotiate
from meshcore.wire.stream import NatConfig, NetmapDelta, ProbeRequest, RelayCredentials, StreamMessage

from .agents import agent_update_for
from .context import Context
from .netmap import KEEPALIVE, Outgoing, Subscription

__all__ = ["KEEPALIVE_SECONDS", "agree", "ask_probe", "nat_config", "open_stream"]

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


async def open_stream(ctx: Context, node: str, since: int | None, clock: Callable[[], datetime],
                      protocol: int = PROTOCOL) -> AsyncGenerator[bytes, None]:
    """Subscribe ``node`` and yield its stream's lines: a full map, or the
    deltas after ``since`` when the hub still has them, then deltas as they happen.

    The subscription is made when the body starts, under the finally that
    ends it: a stream whose body never starts (the client went away first)
    subscribes nothing, and one that fails putting its first messages
    together is unsubscribed. ``protocol`` is what :func:`agree` settled on;
    every message of this version is one a protocol-2 node reads, so
    nothing depends on it yet.
    """
    sub = ctx.hub.subscribe(node, protocol)
    try:
        backlog = ctx.hub.since(since) if since is not None else None
        first = await _everything(ctx, backlog, clock(), node)
        async for line in _lines(ctx, sub, first, clock):
            yield line
    finally:
        ctx.hub.unsubscribe(sub)


def nat_config(ctx: Context, node: str, now: datetime) -> NatConfig:
    """The STUN servers, and TURN credentials made for ``node`` alone (SPEC §7)."""
    nat = ctx.nat
    relay = None
    if nat.relay is not None and nat.relay_secret is not None:
        username, password = turn_credentials(nat.relay_secret, node, now, nat.credential_ttl)
        relay = RelayCredentials(server=nat.relay, username=username, password=password,
                                 expires=int((now + nat.credential_ttl).timestamp()))
    return NatConfig(stun=nat.stun, relay=relay)


async def _everything(ctx: Context, deltas: list[NetmapDelta] | None, now: datetime, node: str) -> list[Outgoing]:
    """What a node needs to be whole: policy first, then the map, then the agents (and its NAT help).

    The policy and the map are the hub's as the node subscribed (the loop changes them, so they are read
    on it); the agents are read from the store off the loop, and any change of them committed meanwhile
    is queued for the node as well, which a node applies twice harmlessly."""
    hub = ctx.hub
    policy = hub.policy_message()
    out = [policy] if policy is not None else []
    out += ([Outgoing.of(StreamMessage(type="delta", delta=d)) for d in deltas] if deltas is not None
            else [Outgoing.of(StreamMessage(type="full", full=hub.full()))])
    out.append(await _agents_of(ctx, node, now))
    if ctx.nat.stun or ctx.nat.relay:
        out.append(Outgoing.of(StreamMessage(type="nat", nat=nat_config(ctx, node, now))))
    return out


async def _agents_of(ctx: Context, node: str, now: datetime) -> Outgoing:
    """The live agents ``node`` needs, whole: which on the loop (the hub's index), their certificates off it."""
    wanted = ctx.hub.live.of_node(node)
    return Outgoing.of(StreamMessage(type="agents", agents=await asyncio.to_thread(agent_update_for, ctx, wanted, now)))


async def _lines(ctx: Context, sub: Subscription, first: list[Outgoing],
                 clock: Callable[[], datetime]) -> AsyncIterator[bytes]:
    refresh_at = clock() + ctx.nat.credential_ttl / 2
    for message in first:
        yield message.line
    while not sub.closed:
        if sub.resync:  # it fell behind: drop its queue, send it whole again
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.resync = False
            for message in await _everything(ctx, None, clock(), sub.node):
                yield message.line
            continue
        if sub.agents_stale:  # the policy or a node changed what it needs
            sub.agents_stale = False
            yield (await _agents_of(ctx, sub.node, clock())).line
            continue
        try:
            async with asyncio.timeout(KEEPALIVE_SECONDS):
                message = await sub.queue.get()
        except TimeoutError:
            message = KEEPALIVE
            now = clock()
            if ctx.nat.relay is not None and now >= refresh_at:  # fresh credentials before the old expire
                message = Outgoing.of(StreamMessage(type="nat", nat=nat_config(ctx, sub.node, now)))
                refresh_at = now + ctx.nat.credential_ttl / 2
        if sub.closed:
            break
        yield message.line


def ask_probe(ctx: Context, caller: str, peer: str) -> bool:
    """Call me maybe: ``caller`` is probing ``peer``'s candidates; tell ``peer`` to probe back at once,
    through the change log, so the replica holding ``peer``'s stream sends it (a peer with no open stream
    probes when it connects). True: the request is on its way."""
    if peer == caller or peer not in ctx.hub.nodes:
        raise NotFound(f"no node named {peer!r} to probe")
    with ctx.store.transaction() as tx:
        ctx.hub.record_for(tx, peer, StreamMessage(type="probe", probe=ProbeRequest(peer=caller)))
    return True
