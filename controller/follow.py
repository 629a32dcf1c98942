"""Each controller process follows the mesh's change log and applies it to its hub, in order.

Why a log rather than publishing in memory: with several replicas (or
worker processes) on one PostgreSQL database, a change committed by one
must reach the streams held by all, in the one order the commits took.
The writer logs the change in its own transaction
(:meth:`controller.netmap.NetmapHub.record_delta` and friends), and every
process reads the log after the last change it applied. What wakes a
follower: its own commits (at once, in-process), another replica's
(PostgreSQL ``NOTIFY``, on a listening connection of its own), and a poll
every :data:`POLL_SECONDS` in case a notification was missed (the
listening connection was being re-made after PostgreSQL restarted).

Reads happen in a worker thread, the applying on the event loop (the
subscriber queues are asyncio's); the log's order is kept because one task
does both. An API call that made a change waits (:meth:`Follower.settle`)
until its own process has applied it, so whoever calls next on this
replica sees the change (a node enrolled, then its stream opened, finds
itself in the map).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime

from meshcore.policy import Policy, load_policy
from meshcore.wire.stream import StreamMessage

from .context import Context
from .netmap import CHANNEL, NetmapHub

__all__ = ["POLL_SECONDS", "Follower", "apply_pending"]

log = logging.getLogger("idmesh.controller.follow")

POLL_SECONDS = 1.0
BATCH = 1000
"""Changes read at once; more are read in the next round straight away."""
SETTLE_SECONDS = 5.0
"""How long a call waits to see its change applied before answering anyway (the store is failing)."""


class Follower:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._applied = asyncio.Condition()
        self._stopping = threading.Event()

    def poke(self) -> None:
        """Read the log now (callable from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def settle(self) -> None:
        """Return once this process has applied every change it committed so far."""
        hub = self._ctx.hub
        target = hub.committed
        if self._loop is None or hub.applied >= target:
            return
        try:
            async with asyncio.timeout(SETTLE_SECONDS), self._applied:
                await self._applied.wait_for(lambda: hub.applied >= target)
        except TimeoutError:
            log.warning("change %d is not applied yet after %.0f s (the store is failing?)", target, SETTLE_SECONDS)

    async def run(self) -> None:
        """Follow the log until cancelled."""
        self._loop = asyncio.get_running_loop()
        hub = self._ctx.hub
        hub.on_commit = self.poke
        if self._ctx.store.shared:  # (a daemon thread: it ends with the process, or at the next notification)
            threading.Thread(target=self._listen, name="idmesh-listen", daemon=True).start()
        failing = False
        try:
            while True:
                try:
                    async with asyncio.timeout(POLL_SECONDS):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                hub.expire(datetime.now(UTC))
                try:
                    more = await self._catch_up()
                    if failing:
                        log.info("the controller database answers again; following the change log")
                    failing = False
                except Exception as exc:  # noqa: BLE001 (the store is down, whatever the driver raises: say so once, keep trying)
                    if not failing:
                        log.warning("cannot read the change log: %s", exc)
                    failing = True
                    more = False
                if more:
                    self._wake.set()
        finally:
            self._stopping.set()
            hub.on_commit = lambda: None

    async def _catch_up(self) -> bool:
        """Apply what the log holds after this hub's last change; True when there may be more."""
        found = await asyncio.to_thread(_read, self._ctx, self._ctx.hub.applied)
        more = _apply(self._ctx, found)
        async with self._applied:
            self._applied.notify_all()
        return more

    def _listen(self) -> None:
        """PostgreSQL notifications, in a thread; a lost connection is made again."""
        while not self._stopping.is_set():
            for _ in self._ctx.store.listen(CHANNEL):
                if self._stopping.is_set():
                    return
                self.poke()
            self._stopping.wait(POLL_SECONDS)  # PostgreSQL away: the poll covers until it is back


_Row = tuple[int, str, str | None, str | None, str, Policy | None]
_Found = tuple[int, list[_Row], NetmapHub | None]


def _read(ctx: Context, after: int) -> _Found:
    """The changes after ``after``, a policy's text parsed here, off the loop (or, when the log was pruned
    past them, the hub loaded again)."""
    with ctx.store.transaction() as tx:
        rows = tx.changes_after(after, BATCH)
        if rows and rows[0][0] != after + 1:  # this replica was away too long
            return after, [], NetmapHub.load(tx, ctx.settings.domain, ctx.settings.prefixes)
    return after, [(*row, _parsed(row[1], row[4])) for row in rows], None


def _parsed(kind: str, line: str) -> Policy | None:
    if kind != "policy":
        return None
    doc = StreamMessage.model_validate_json(line).policy
    return load_policy(doc.text, doc.filename) if doc is not None else None


def _apply(ctx: Context, found: _Found) -> bool:
    """Apply what :func:`_read` found, in order; True when there may be more."""
    after, rows, fresh = found
    hub = ctx.hub
    if fresh is not None:
        log.warning("the change log no longer holds change %d; the map is read again", after + 1)
        hub.reload(fresh)
    for seq, kind, node, about, line, parsed in rows:
        if seq > hub.applied + 1:
            break  # a reload happened meanwhile: read again from where it left off
        hub.apply(seq, kind, node, line, about, parsed)
    return len(rows) == BATCH


def apply_pending(ctx: Context) -> None:
    """Bring ``ctx``'s hub up to the log, in this thread (no event loop: a test or a command)."""
    while _apply(ctx, _read(ctx, ctx.hub.applied)):
        pass
