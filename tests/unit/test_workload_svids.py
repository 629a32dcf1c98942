"""When a node's Workload API renews, keeps and drops what it hands an agent (meshd.workload.svids).

The controller is a stand-in that signs with a real CA on the test's clock;
what is under test is the node's timing: renewal at half an SVID's life, the
current SVID kept while the controller is away, nothing after the agent ended.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshcore.errors import PermissionDenied, Unavailable
from meshcore.identity import Claims, SpiffeId, build_leaf, cert_pem, key_pem, new_ca
from meshcore.wire.api import AgentInfo, AgentIssued
from meshd.agents.supervisor import LocalAgent
from meshd.workload import svids as svidmod
from meshd.workload.svids import Svids

World = tuple[Svids, 'FakeController', 'Clock', dict[str, LocalAgent]]
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CA = new_ca("acme.mesh", ed25519.Ed25519PrivateKey.generate(), T0 - timedelta(days=1))


class Clock:
    def __init__(self) -> None:
        self.now = T0.timestamp()

    def __call__(self) -> float:
        return self.now


class FakeController:
    """Signs a 60 s SVID for the agent's key (as controller.workload does), or fails as told."""

    def __init__(self, clock: Clock, key: ed25519.Ed25519PrivateKey) -> None:
        self.clock, self.key = clock, key
        self.calls: list[str] = []
        self.fail: Exception | None = None

    async def call(self, method: str, path: str, body: object = None) -> object:
        self.calls.append(path)
        if self.fail is not None:
            raise self.fail
        now = datetime.fromtimestamp(self.clock(), UTC)
        if path.endswith("/svid"):
            cert = build_leaf(CA, self.key.public_key(), SpiffeId("acme.mesh", "agent", "a1"), Claims(kind="agent"),
                              now, timedelta(seconds=60))
            return {"certificate": cert_pem(cert), "expires": cert.not_valid_after_utc.isoformat()}
        assert isinstance(body, dict)
        return {"token": f"jwt-{len(self.calls)}-{','.join(body['audience'])}",
                "expires": (now + timedelta(minutes=5)).isoformat()}


def local_agent(directory: Path, key: ed25519.Ed25519PrivateKey) -> LocalAgent:
    directory.mkdir()
    (directory / "agent.key").write_text(key_pem(key))
    info = AgentInfo(id="a1", name="t", spiffe_id="spiffe://acme.mesh/agent/a1", node="n1", principal="p@acme.com",
                     scopes=["db:read"], parent=None, addresses=["100.64.0.3", "fd00::3"], issued_at=T0,
                     expires=T0 + timedelta(hours=2), state="live")
    return LocalAgent("a1", 3, AgentIssued(agent=info, certificate=""), directory, info.expires)


@pytest.fixture
def world(tmp_path: Path) -> tuple[Svids, FakeController, Clock, dict[str, LocalAgent]]:
    clock = Clock()
    key = ed25519.Ed25519PrivateKey.generate()
    controller = FakeController(clock, key)
    agents = {"a1": local_agent(tmp_path / "a1", key)}
    return Svids(controller, agents, "acme.mesh", cert_pem(CA.cert).encode(), clock), controller, clock, agents


def test_an_svid_is_kept_until_half_its_life_then_renewed(world: World) -> None:
    svids, controller, clock, _ = world

    async def scenario() -> None:
        first = await svids.x509("a1")
        clock.now += 29
        assert await svids.x509("a1") is first and len(controller.calls) == 1
        clock.now += 2
        second = await svids.x509("a1")
        assert second is not first and second.not_after > first.not_after and second.key == first.key

    asyncio.run(scenario())


def test_a_controller_that_does_not_answer_leaves_the_current_svid_in_use_and_is_asked_again(
        world: World) -> None:
    svids, controller, clock, _ = world

    async def scenario() -> None:
        first = await svids.x509("a1")
        controller.fail = Unavailable("controller away")
        clock.now += 31
        assert await svids.x509("a1") is first
        clock.now += svidmod.RETRY_EVERY / 2
        assert await svids.x509("a1") is first and len(controller.calls) == 2  # not asked again before the retry
        clock.now += 40  # past its end: nothing valid to hand out
        with pytest.raises(Unavailable):
            await svids.x509("a1")

    asyncio.run(scenario())


def test_an_ended_agent_wakes_its_streams_and_gets_nothing_more(world: World) -> None:
    svids, _controller, _clock, agents = world

    async def scenario() -> None:
        first = await svids.x509("a1")
        waiting = asyncio.create_task(svids.changed("a1", first))
        await asyncio.sleep(0.01)
        del agents["a1"]
        svids.ended("a1")
        async with asyncio.timeout(1):
            await waiting
        with pytest.raises(PermissionDenied):
            await svids.x509("a1")
        with pytest.raises(PermissionDenied):
            await svids.jwt("a1", ("db",))

    asyncio.run(scenario())


def test_a_revocation_the_node_has_not_heard_of_yet_is_a_refusal(world: World) -> None:
    svids, controller, _clock, _ = world
    controller.fail = PermissionDenied("agent a1 is revoked: it gets no SVID")
    with pytest.raises(PermissionDenied, match="no longer live"):
        asyncio.run(svids.x509("a1"))


def test_jwt_svids_are_cached_per_audience_for_half_their_life(world: World) -> None:
    svids, controller, clock, _ = world

    async def scenario() -> None:
        first = await svids.jwt("a1", ("web", "db"))
        assert await svids.jwt("a1", ("db", "web", "db")) == first  # the same audience, however it is listed
        other = await svids.jwt("a1", ("mail",))
        assert other != first and len(controller.calls) == 2
        clock.now += 151
        assert await svids.jwt("a1", ("db", "web")) != first

    asyncio.run(scenario())
