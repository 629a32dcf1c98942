"""idmesh.tasks: a component's short tasks are kept, their failures logged at once, and awaited at close."""

from __future__ import annotations

import asyncio
import logging

import pytest

from idmesh.tasks import Tasks


def test_a_failing_task_is_logged_when_it_fails_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise ValueError("the controller said no")

    async def run() -> None:
        tasks = Tasks(logging.getLogger("idmesh.test"))
        tasks.spawn(fail(), name="revoke a1")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(tasks) == 0

    with caplog.at_level(logging.ERROR):
        asyncio.run(run())
    (record,) = [r for r in caplog.records if r.name == "idmesh.test"]
    assert record.getMessage() == "revoke a1 failed: the controller said no" and record.exc_info is not None


def test_close_lets_quick_tasks_finish_within_the_grace_then_cancels_and_awaits_the_rest() -> None:
    finished, cancelled = [], []

    async def work(seconds: float, name: str) -> None:
        try:
            await asyncio.sleep(seconds)
            finished.append(name)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def run() -> None:
        tasks = Tasks(logging.getLogger("idmesh.test"))
        tasks.spawn(work(0.01, "quick"))
        tasks.spawn(work(60, "slow"))
        await tasks.close(grace=0.5)
        assert len(tasks) == 0

    asyncio.run(run())
    assert finished == ["quick"] and cancelled == ["slow"]  # and close() returned only after "slow" had stopped
