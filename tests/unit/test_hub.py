"""The controller's netmap fan-out (:class:`controller.netmap.NetmapHub`), without HTTP.

Subscriber queues are plain ``asyncio.Queue`` objects; putting and taking
without waiting needs no event loop, so most tests are synchronous and one
runs a loop to show that a waiting subscriber is woken.
"""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

import controller.netmap as hubmod
from controller.netmap import AgentFacts, NetmapHub, Outgoing, Subscription
from controller.store import Store
from meshcore.addressing import MeshPrefixes
from meshcore.netmap import NodeView
from meshcore.wire.stream import AgentUpdate, NetmapDelta, PeerNode, StreamMessage

PREFIXES = ("100.64.0.0/10", "fd7a:1:2::/48")
MESH = MeshPrefixes(IPv4Network(PREFIXES[0]), IPv6Network(PREFIXES[1]), 26, 64)


def node(i: int, port: int = 51820) -> PeerNode:
    return PeerNode(name=f"n{i}", wireguard_public_key=f"{i:043d}=", addresses=(f"100.64.{i}.1", f"fd7a:1:2:{i:x}::1"),
                    blocks=(f"100.64.{i}.0/26", f"fd7a:1:2:{i:x}::/64"), endpoints=(f"198.51.100.{i}:{port}",))


def hub(version: int = 10, *nodes: PeerNode) -> NetmapHub:
    return NetmapHub("acme.mesh", PREFIXES, version, {n.name: n for n in nodes})


def drain(sub: Subscription) -> list[StreamMessage]:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait().message)
    return out


def facts(agent_id: str, on: str) -> AgentFacts:
    return AgentFacts(agent_id, "nikita@acme.com", ("db:read",), on, "t", "delegation", "2099-01-01T00:00:00.000000Z")


def birth(h: NetmapHub, agent_id: str, on: str) -> None:
    """Apply the birth of an agent on node ``on`` as the follower would (no policy: only its node needs it)."""
    line = Outgoing.of(StreamMessage(type="agents", agents=AgentUpdate())).line.decode()
    h.apply(h.applied + 1, "agents", None, line, json.dumps({"born": [facts(agent_id, on).doc()], "ended": []}))


def publish_moves(h: NetmapHub, count: int) -> list[NetmapDelta]:
    """``count`` endpoint changes of n1, one version each."""
    return [h.publish(h.version + 1, upsert=(node(1, 40000 + k),)) for k in range(count)]


# -- since ------------------------------------------------------------------------------------

def test_since_returns_exactly_the_missed_deltas() -> None:
    h = hub(10, node(1))
    deltas = publish_moves(h, 5)
    assert [(d.base, d.version) for d in deltas] == [(10, 11), (11, 12), (12, 13), (13, 14), (14, 15)]
    assert h.since(12) == deltas[2:]
    assert h.since(10) == deltas
    assert h.since(15) == []


def test_the_missed_deltas_bring_a_node_to_the_current_map() -> None:
    h = hub(10, node(1), node(2))
    view = NodeView(h.full())
    h.publish(11, upsert=(node(3),))
    h.publish(12, remove=("n2",))
    h.publish(13, upsert=(node(1, 1234),))
    missed = h.since(view.version)
    assert missed is not None
    for delta in missed:
        view.apply(delta)
    assert view.snapshot() == h.full()


@pytest.mark.parametrize("version", [16, 1000])
def test_since_a_version_from_the_future_needs_a_full_map(version: int) -> None:
    h = hub(10, node(1))
    publish_moves(h, 5)
    assert h.since(version) is None


def test_since_a_version_older_than_the_history_needs_a_full_map(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hubmod, "HISTORY", 3)
    h = hub(10, node(1))
    deltas = publish_moves(h, 5)  # only 12->13, 13->14, 14->15 are kept
    assert h.since(11) is None and h.since(9) is None and h.since(-1) is None
    assert h.since(12) == deltas[2:]


def test_after_a_restart_there_is_no_history_but_the_current_version_is_up_to_date() -> None:
    h = hub(10, node(1))
    assert h.since(10) == []
    assert h.since(9) is None
    assert h.since(11) is None


# -- versions ----------------------------------------------------------------------------------

def _follow(h: NetmapHub, store: Store) -> None:
    """What a controller's follower does: apply the log after the hub's last change, in order."""
    with store.transaction() as tx:
        for seq, kind, node_name, about, line in tx.changes_after(h.applied, 1000):
            h.apply(seq, kind, node_name, line, about)


def test_the_change_log_numbers_every_change_and_deltas_chain_across_the_others(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "c.db", create=True)
    try:
        h = hub(0)
        sub = h.subscribe("n1")
        with store.transaction() as tx:
            v1 = h.record_delta(tx, upsert=(node(1),))
        with store.transaction() as tx:
            h.record_agents(tx, AgentUpdate(), born=(facts("a1", "n1"),))
        with store.transaction() as tx:
            v3 = h.record_delta(tx, upsert=(node(2),))
        assert drain(sub) == [] and h.version == 0  # nothing is published before the log is applied
        _follow(h, store)
        assert [m.type for m in drain(sub)] == ["delta", "agents", "delta"]
        assert (v1, v3, h.version, h.applied) == (1, 3, 3, 3)
        assert h.since(1) == [NetmapDelta(base=1, version=3, upsert=(node(2),))]
        with store.transaction() as tx:  # another replica (or a restart) starts from the store: same history
            other = NetmapHub.load(tx, "acme.mesh", MESH)
        assert other.since(1) == h.since(1) and other.since(0) == h.since(0) and other.applied == 3
        with store.transaction() as tx:
            assert other.record_delta(tx, remove=("n1",)) == 4  # never reuses a number
        _follow(h, store)
        assert h.version == 4 and "n1" not in h.nodes
    finally:
        store.close()


def test_a_change_rolled_back_is_never_published(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "c.db", create=True)
    try:
        h = hub(0)
        with pytest.raises(RuntimeError), store.transaction() as tx:
            h.record_delta(tx, upsert=(node(1),))
            raise RuntimeError("a later step failed")
        _follow(h, store)
        assert h.version == 0 and h.committed == 0 and not h.nodes
    finally:
        store.close()


# -- fan-out -----------------------------------------------------------------------------------

def test_publish_updates_the_map_and_reaches_every_subscriber() -> None:
    h = hub(10, node(1), node(2))
    a, b = h.subscribe("n1"), h.subscribe("n2")
    assert h.connected == 2
    delta = h.publish(11, upsert=(node(3),), remove=())
    assert delta == NetmapDelta(base=10, version=11, upsert=(node(3),))
    assert drain(a) == drain(b) == [StreamMessage(type="delta", delta=delta)]
    assert h.version == 11 and set(h.full().nodes) == {"n1", "n2", "n3"}
    h.unsubscribe(b)
    h.publish(12, upsert=(node(1, 9),))
    assert len(drain(a)) == 1 and drain(b) == []
    assert h.connected == 1


def test_a_waiting_subscriber_is_woken_by_a_publish() -> None:
    async def scenario() -> StreamMessage:
        h = hub(10, node(1))
        sub = h.subscribe("n1")
        waiter = asyncio.create_task(sub.queue.get())
        await asyncio.sleep(0)
        h.publish(11, upsert=(node(2),))
        async with asyncio.timeout(1):
            return (await waiter).message

    message = asyncio.run(scenario())
    assert message.type == "delta" and message.delta is not None and message.delta.upsert == (node(2),)


def test_a_removed_nodes_subscription_is_closed_and_the_others_learn_of_it() -> None:
    h = hub(10, node(1), node(2), node(3))
    gone, stays = h.subscribe("n2"), h.subscribe("n3")
    delta = h.publish(11, remove=("n2",))
    assert gone.closed and not stays.closed
    # the removed node gets only a wake-up, never the map without itself
    assert [m.type for m in drain(gone)] == ["keepalive"]
    assert drain(stays) == [StreamMessage(type="delta", delta=delta)]
    assert "n2" not in h.full().nodes


def test_a_subscriber_that_does_not_read_is_switched_to_a_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hubmod, "QUEUE_LIMIT", 3)
    h = hub(10, node(1))
    slow, fast = h.subscribe("n1"), h.subscribe("n2")
    publish_moves(h, 3)
    assert not slow.resync
    drain(fast)
    publish_moves(h, 3)  # the slow queue is full: it is marked, and nothing more is queued for it
    assert slow.resync and not fast.resync
    assert slow.queue.qsize() == 3
    assert [m.delta.version for m in drain(fast) if m.delta] == [14, 15, 16]


def test_agent_updates_and_policies_to_a_subscriber_that_does_not_read_are_bounded_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, they bypassed the limit: a node that stopped reading grew the controller's memory without bound."""
    from meshcore.wire.stream import PolicyDoc

    monkeypatch.setattr(hubmod, "QUEUE_LIMIT", 3)
    h = hub(10, node(1))
    slow, fast = h.subscribe("n1"), h.subscribe("n2")
    for i in range(50):
        birth(h, f"a{i}", "n1")
        birth(h, f"b{i}", "n2")
        h.publish_policy(PolicyDoc(version=i + 1, hash=f"{i:064d}", filename="p.yaml", text="acls: []\n"))
        drain(fast)
    assert slow.resync and slow.queue.qsize() == 3  # resynced: its stream sends everything whole instead
    assert not fast.resync


# -- limits ------------------------------------------------------------------------------------

def test_a_node_holds_at_most_a_few_streams_and_its_oldest_goes_first() -> None:
    async def run() -> None:
        h = hub(10, node(1), node(2))
        first, *rest = [h.subscribe("n1") for _ in range(hubmod.STREAMS_PER_NODE)]
        other = h.subscribe("n2")
        newest = h.subscribe("n1")  # one too many: the oldest of n1's ends
        assert first.closed and not any(s.closed for s in (*rest, newest, other))
        assert h.connected == hubmod.STREAMS_PER_NODE + 2  # (the closed one goes when its stream notices)

    asyncio.run(run())


def test_the_policy_is_serialised_once_however_many_streams_open() -> None:
    from meshcore.wire.stream import PolicyDoc

    async def run() -> None:
        h = hub(10, node(1))
        assert h.policy_message() is None
        h.publish_policy(PolicyDoc(version=1, hash="0" * 64, filename="p.yaml", text="acls: []\n" + "# padding\n" * 100_000))
        first = h.policy_message()
        assert first is not None and h.policy_message() is first and first.line.startswith(b'{"type":"policy"')
        h.publish_policy(PolicyDoc(version=2, hash="1" * 64, filename="p.yaml", text="acls: []\n"))
        assert h.policy_message() is not first and b'"version":2' in h.policy_message().line  # type: ignore[union-attr]

    asyncio.run(run())
