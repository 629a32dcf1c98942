"""NAT traversal's decisions on a fake network: probes, answers, call-me-maybe, paths (meshd.nat.paths, .traversal).

Two Traversals exchange STUN through an in-memory "network" that can drop
what a NAT would drop; the real sockets and NATs are tests/e2e's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aioice import stun

from meshcore.wire.stream import PeerNode, Reachability
from meshd.nat.paths import BETTER, RELAY_AFTER, TRUST, Choice, PeerPaths
from meshd.nat.traversal import Traversal

KEY = {"a": "A" * 43 + "=", "b": "B" * 43 + "="}


def test_a_direct_path_is_trusted_while_it_answers_then_the_relay_takes_over() -> None:
    p = PeerPaths()
    p.start(0.0)
    assert p.choose(1.0, relay_possible=True) == Choice("none", None)  # still probing
    p.answer("203.0.113.7:4242", 1.5, 0.002)
    assert p.choose(2.0, relay_possible=True) == Choice("direct", "203.0.113.7:4242")
    p.relay_endpoint = "127.0.0.1:40000"
    assert p.choose(1.5 + TRUST + 0.1, relay_possible=True) == Choice("relay", "127.0.0.1:40000")
    assert p.choose(1.5 + TRUST + 0.1, relay_possible=False) == Choice("none", None)


def test_no_answer_for_relay_after_seconds_means_the_relay_when_both_have_one() -> None:
    p = PeerPaths()
    p.start(10.0)
    assert p.choose(10.0 + RELAY_AFTER - 0.1, True).kind == "none"
    assert p.choose(10.0 + RELAY_AFTER, True).kind == "relay"


def test_the_fastest_path_wins_but_only_clearly_faster_ones_displace_the_current() -> None:
    p = PeerPaths()
    p.answer("10.0.0.2:51820", 0.0, 0.010)
    assert p.direct(0.1) == "10.0.0.2:51820"
    p.answer("203.0.113.7:4242", 0.1, 0.010 * (BETTER + 0.05))  # a little faster: not worth a switch
    assert p.direct(0.2) == "10.0.0.2:51820"
    p.answer("198.51.100.9:4242", 0.2, 0.010 * (BETTER - 0.05))  # clearly faster
    assert p.direct(0.3) == "198.51.100.9:4242"


class Net:
    """Delivers what one Traversal sends to the one whose address it is sent to, as from the sender's address."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, int], Traversal] = {}
        self.blocked: set[tuple[tuple[str, int], tuple[str, int]]] = set()
        self.sent: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []

    def attach(self, address: tuple[str, int], t: Traversal) -> None:
        self.nodes[address] = t
        net = self

        class Port:
            received = 0

            def send(self, payload: bytes, destination: tuple[str, int]) -> None:
                net.sent.append((address, destination, payload))
                target = net.nodes.get(destination)
                if target is not None and (address, destination) not in net.blocked:
                    target._on_stun(payload, address)

            def close(self) -> None:
                pass

        t.port = Port()  # type: ignore[assignment]
        t.enabled = True


def peer(name: str, t: Traversal, endpoints: tuple[str, ...]) -> PeerNode:
    return PeerNode(name=name, wireguard_public_key=KEY[name], addresses=("100.64.0.1", "fd00::1"),
                    blocks=("100.64.0.0/26", "fd00::/64"), endpoints=endpoints,
                    reach=Reachability(probe_ufrag=t.ufrag, probe_pwd=t.pwd))


def pair(clock: Callable[[], float]) -> tuple[Net, Traversal, Traversal, list[str], list[str]]:
    changed: dict[str, list[str]] = {"a": [], "b": []}
    asked: list[str] = []

    async def ask(name: str) -> None:
        asked.append(name)

    async def report() -> None:
        return None

    a = Traversal(51820, lambda: ["10.1.0.2"], report, changed["a"].append, ask, clock=clock)
    b = Traversal(51820, lambda: ["10.2.0.2"], report, changed["b"].append, ask, clock=clock)
    net = Net()
    net.attach(("198.51.100.1", 51820), a)
    net.attach(("198.51.100.2", 51820), b)
    nodes = {"a": peer("a", a, ("198.51.100.1:51820",)), "b": peer("b", b, ("198.51.100.2:51820",))}
    a.set_peers(nodes, "a")
    b.set_peers(nodes, "b")
    return net, a, b, changed["a"], asked


def run(coro: Any) -> None:
    asyncio.run(coro)


def test_a_probe_answered_sets_a_direct_path_and_asks_the_peer_to_probe_back() -> None:
    now = [0.0]

    async def body() -> None:
        _net, a, b, changed, asked = pair(lambda: now[0])
        a._tick(now[0])
        await asyncio.sleep(0)
        assert a.endpoints() == {KEY["b"]: "198.51.100.2:51820"}
        assert changed == [KEY["b"]] and asked == ["b"]
        assert a.status(KEY["b"])["path"] == "direct" and "answered by 198.51.100.2:51820" in a.status(KEY["b"])[
            "last_probe"]
        assert b.endpoints() == {KEY["a"]: None}  # b answered; its own probes find a's path on its next tick
        b._tick(now[0])
        assert b.endpoints() == {KEY["a"]: "198.51.100.1:51820"}

    run(body())


def test_a_quiet_direct_path_is_dropped_after_trust_seconds() -> None:
    now = [0.0]

    async def body() -> None:
        net, a, _b, _, _ = pair(lambda: now[0])
        a._tick(now[0])
        assert a.status(KEY["b"])["path"] == "direct"
        net.blocked.add((("198.51.100.1", 51820), ("198.51.100.2", 51820)))  # the NAT closed
        for step in range(1, 40):
            now[0] = step * 0.2
            a._tick(now[0])
        assert a.status(KEY["b"])["path"] == "none" and a.endpoints() == {KEY["b"]: None}

    run(body())


def test_probes_from_strangers_or_with_a_wrong_key_are_dropped_and_unanswered() -> None:
    now = [0.0]

    async def body() -> None:
        net, a, b, _, _ = pair(lambda: now[0])
        before = len(net.sent)
        forged = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        forged.attributes["USERNAME"] = f"{a.ufrag}:{b.ufrag}"
        forged.add_message_integrity(b"not-a's-password")
        a._on_stun(bytes(forged), ("203.0.113.66", 4444))
        a._on_stun(b"\x00\x01 not stun at all", ("203.0.113.66", 4444))
        stranger = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        stranger.attributes["USERNAME"] = f"{a.ufrag}:nobody"
        stranger.add_message_integrity(a.pwd.encode())
        a._on_stun(bytes(stranger), ("203.0.113.66", 4444))
        unsolicited = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE)
        a._on_stun(bytes(unsolicited), ("203.0.113.66", 4444))
        assert a.dropped == 4 and len(net.sent) == before and a.endpoints() == {KEY["b"]: None}

    run(body())


def test_a_probe_request_for_a_peer_the_node_does_not_have_is_ignored() -> None:
    async def body() -> None:
        _, a, _, _, _ = pair(lambda: 0.0)
        a.probe_requested("mallory")
        assert a.dropped == 1

    run(body())


def test_an_answer_from_another_address_than_probed_proves_nothing() -> None:
    now = [0.0]

    async def body() -> None:
        net, a, b, _, _ = pair(lambda: now[0])
        net.nodes.pop(("198.51.100.2", 51820))  # b's answers will not come from where a probes
        a._tick(now[0])
        (_, _, payload), = [s for s in net.sent if s[1] == ("198.51.100.2", 51820)]
        request = stun.parse_message(payload)
        answer = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                              transaction_id=request.transaction_id)
        answer.add_message_integrity(b.pwd.encode())
        a._on_stun(bytes(answer), ("203.0.113.99", 51820))  # right key, wrong address: a reflection
        assert a.endpoints() == {KEY["b"]: None} and a.dropped == 1

    run(body())


@pytest.mark.parametrize("relay", [True, False])
def test_with_no_answer_the_peer_goes_through_the_relay_only_when_both_have_one(relay: bool) -> None:
    now = [0.0]

    opened: list[tuple[str, tuple[str, int]]] = []

    class FakeRelay:

        async def start(self) -> tuple[str, int]:
            return ("203.0.113.1", 49152)

        async def open(self, peer_key: str, peer_relayed: tuple[str, int]) -> str:
            opened.append((peer_key, peer_relayed))
            return "127.0.0.1:40001"

        async def close_peer(self, peer_key: str) -> None: ...

        async def refresh_credentials(self, username: str, password: str) -> tuple[str, int]:
            return ("203.0.113.1", 49152)

        async def stop(self) -> None: ...

        bytes_sent = bytes_received = 0

    async def body() -> None:
        net, a, b, _, _ = pair(lambda: now[0])
        net.nodes.clear()  # nothing gets through directly
        if relay:
            a._relay, a.relayed = FakeRelay(), "203.0.113.1:49152"
        nodes = {"a": peer("a", a, ("198.51.100.1:51820",)),
                 "b": peer("b", b, ("198.51.100.2:51820",)).model_copy(
                     update={"reach": Reachability(probe_ufrag=b.ufrag, probe_pwd=b.pwd, relay="203.0.113.1:49153")})}
        a.set_peers(nodes, "a")
        for step in range(int(RELAY_AFTER / 0.2) + 2):
            now[0] = step * 0.2
            a._tick(now[0])
            await asyncio.sleep(0)
        assert a.status(KEY["b"])["path"] == ("relay" if relay else "none")
        assert a.endpoints() == {KEY["b"]: "127.0.0.1:40001" if relay else None}
        if relay:
            assert opened == [(KEY["b"], ("203.0.113.1", 49153))]

    run(body())
