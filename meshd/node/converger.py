"""The one loop that applies changes to the data plane, and a way to wait for a change to be applied.

Changes are recorded on the event loop as they arrive (:class:`MeshView`
records them on the data plane); :meth:`Converger.wake` asks for a pass.
A pass snapshots the work on the loop and applies it in a worker thread
(the drivers block), so changes arriving meanwhile wait for the next pass
instead of racing it. A failed pass is retried whole after
:data:`RETRY_APPLY` seconds: nothing recorded is lost.

Passes are numbered. ``meshctl agent run`` must not start its command
before the agent's routes exist, so the caller notes :meth:`next_pass`
when it records its change and waits for that pass with :meth:`wait_for`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshcore.errors import IdmeshError
from meshd.mesh.dataplane import DataPlane, Work

__all__ = ["RETRY_APPLY", "Converger"]

log = logging.getLogger("meshd")
RETRY_APPLY = 2.0


class Converger:
    def __init__(self, plane: DataPlane, take: Callable[[], Work], applied: Callable[[], None]) -> None:
        self.plane = plane
        self._take = take
        self._applied_hook = applied
        self._dirty = asyncio.Event()
        self._taken = self._applied = 0  # passes begun / finished
        self._passed = asyncio.Condition()

    def wake(self) -> None:
        self._dirty.set()

    def next_pass(self) -> int:
        """The number of the first pass that begins from now on: it carries what was recorded before."""
        return self._taken + 1

    async def wait_for(self, number: int, timeout: float) -> bool:
        """Wait until pass ``number`` has been applied; False if that took longer than ``timeout``."""
        async with self._passed:
            try:
                async with asyncio.timeout(timeout):
                    await self._passed.wait_for(lambda: self._applied >= number)
            except TimeoutError:
                return False
        return True

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            work = self._take()
            self._taken += 1
            taken = self._taken
            try:
                await asyncio.to_thread(self.plane.apply, work)
            except IdmeshError as exc:
                log.error("could not apply the netmap: %s; retrying in %.0f s", exc, RETRY_APPLY)
                self.plane.restore(work)
                await asyncio.sleep(RETRY_APPLY)
                self._dirty.set()
                continue
            self._applied_hook()
            async with self._passed:
                self._applied = taken
                self._passed.notify_all()
