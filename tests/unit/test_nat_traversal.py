"""The traversal loop's lifetime (:class:`meshd.nat.traversal.Traversal`), without its raw socket."""

from __future__ import annotations

import asyncio

import pytest

from meshd.nat.traversal import Traversal


def test_a_traversal_cancelled_as_it_is_woken_stops() -> None:
    """meshd's shutdown waits for this loop: a cancellation lost to a wake-up left meshd running after SIGTERM.

    Python 3.11's ``asyncio.wait_for`` returns the result instead of raising when the awaited thing completes just
    as the cancellation arrives; the loop then waited again, for ever (a CI run's meshd ignored SIGTERM for 20 s).
    """
    async def nothing() -> None:
        return None

    async def scenario() -> None:
        traversal = Traversal(51820, list, nothing, lambda key: None, lambda key: nothing())
        traversal.port.open = lambda: None  # type: ignore[method-assign]  # the raw socket needs CAP_NET_RAW
        traversal.port.close = lambda: None  # type: ignore[method-assign]
        running = asyncio.create_task(traversal.run())
        await asyncio.sleep(0.05)  # in its wait between ticks
        traversal._wake.set()
        await asyncio.sleep(0)  # the wake-up is complete, its waiter not yet resumed
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(2):
                await running

    asyncio.run(scenario())
