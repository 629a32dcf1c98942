"""A body that does not arrive in time is a 408, not a held connection (controller.middleware.BodyLimit)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controller import middleware
from controller.middleware import BodyLimit


async def reads_the_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def serve(messages: list[dict[str, Any]], then_wait: bool) -> list[dict[str, Any]]:
    """What the middleware sends for a request whose body comes as ``messages`` (and then nothing, if told)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if then_wait:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/enroll", "headers": [(b"content-length", b"100")]}
    asyncio.run(BodyLimit(reads_the_body)(scope, receive, send))
    return sent


def test_a_body_that_stops_arriving_is_answered_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(middleware, "BODY_TIMEOUT", 0.2)
    sent = serve([{"type": "http.request", "body": b"x" * 10, "more_body": True}], then_wait=True)
    assert sent[0]["status"] == 408 and b"not received within" in sent[1]["body"]


def test_a_body_that_arrives_whole_in_time_is_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(middleware, "BODY_TIMEOUT", 0.2)
    sent = serve([{"type": "http.request", "body": b"x" * 50, "more_body": True},
                  {"type": "http.request", "body": b"x" * 50, "more_body": False}], then_wait=False)
    assert sent[0]["status"] == 200
