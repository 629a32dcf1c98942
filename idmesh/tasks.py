"""Short tasks a component starts and owns, outside any TaskGroup: kept, their failures logged, awaited at close.

asyncio keeps only a weak reference to a task, so a task nobody holds may
vanish mid-flight; and an exception in a task nobody awaits is reported,
if at all, as "Task exception was never retrieved" when it is collected.
:class:`Tasks` holds each task until it is done, logs a failure the moment
it happens (with its traceback), and :meth:`Tasks.close` cancels what is
still running and waits for it, so a component that stops leaves nothing
running behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["Tasks"]


class Tasks:
    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._running.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("%s failed: %s", task.get_name(), exc, exc_info=exc)

    def __len__(self) -> int:
        return len(self._running)

    async def close(self, grace: float = 0.0) -> None:
        """Cancel what still runs (after letting it finish for up to ``grace`` seconds) and wait until it stopped."""
        running = list(self._running)
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
