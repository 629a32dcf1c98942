"""meshd's TURN relay end to end: two WireGuard nodes behind symmetric NATs, coturn on the public host.

Hole punching cannot work between two symmetric NATs (tests/e2e/test_natlab.py
shows it), so each node's WireGuard gets, as the other's endpoint, a local
socket of its :class:`~meshd.nat.relay.Relay` (run in the node's namespace by
tests/e2e/relaynode.py), and everything goes through coturn.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from meshcore.turn import turn_credentials
from meshd.wg import DeviceConfig, PeerConfig, generate_private_key, public_key_of
from tests.e2e.coturn import Coturn
from tests.e2e.mesh import ping, tcp_hello, tcp_server, wait_until
from tests.e2e.natlab import NatLab
from tests.e2e.netns import Host
from tests.e2e.relaynode import RelayNode
from tests.e2e.wgnode import WgNode

WG_PORT = 51820
MESH = "100.64.0.0/10"
MARKER = "49444d45534850"  # "IDMESHP": ping -p fills the payload with it
LabFactory = Callable[..., NatLab]


@dataclass
class Side:
    host: Host
    name: str
    overlay: str
    private_key: str
    wg: WgNode
    relay: RelayNode
    relayed: tuple[str, int] = ("", 0)

    @property
    def public_key(self) -> str:
        return public_key_of(self.private_key)

    def apply(self, other: Side, endpoint: str | None) -> None:
        peer = PeerConfig(other.public_key, (f"{other.overlay}/32",), endpoint)
        self.wg.apply(DeviceConfig(self.private_key, WG_PORT, (peer,)), [f"{self.overlay}/32"], [MESH])


@dataclass
class Relayed:
    lab: NatLab
    turn: Coturn
    a: Side
    b: Side

    def credentials(self, name: str, ttl: timedelta = timedelta(hours=1)) -> tuple[str, str]:
        return turn_credentials(self.turn.secret, name, datetime.now(UTC), ttl)

    def logs(self) -> str:
        return "\n".join([f"--- {s.name} relay\n{s.relay.logs()}\n--- {s.name} wg\n{s.wg.logs()}" for s in (self.a, self.b)]
                         + [f"--- coturn\n{self.turn.logs()}"])


@contextmanager
def relayed_pair(nat_lab: LabFactory, tmp_path: Path, coturn_extra: Sequence[str] = (),
                 **options: Any) -> Iterator[Relayed]:
    """Two hosts behind symmetric NATs, WireGuard between them through their relays and coturn."""
    lab = nat_lab(homes=2, nat="symmetric")
    turn = Coturn(lab.public, tmp_path / "coturn", extra=coturn_extra)
    turn.start()
    sides = []
    for home, name, overlay in ((lab.homes[0], "a", "100.64.1.1"), (lab.homes[1], "b", "100.64.2.1")):
        host = home.hosts[0]
        sides.append(Side(host, name, overlay, generate_private_key(), WgNode(host, tmp_path / f"{name}-wg.log"),
                          RelayNode(host, tmp_path / f"{name}-relay.log")))
    pair = Relayed(lab, turn, *sides)
    try:
        for side in sides:
            side.relayed = side.relay.start(turn.server, *pair.credentials(side.name), WG_PORT, **options)
            assert side.relayed[0] == turn.address
        pair.a.apply(pair.b, pair.a.relay.open(pair.b.public_key, pair.b.relayed))
        pair.b.apply(pair.a, pair.b.relay.open(pair.a.public_key, pair.a.relayed))
        yield pair
    finally:
        for side in sides:
            side.relay.close()
            side.wg.close()
        turn.stop()


@pytest.fixture
def relayed(nat_lab: LabFactory, tmp_path: Path) -> Iterator[Relayed]:
    with relayed_pair(nat_lab, tmp_path) as pair:
        yield pair


def sniff(host: Host, seconds: float) -> subprocess.Popen[str]:
    proc = host.popen([sys.executable, "-m", "tests.e2e.sniff", str(seconds), MARKER], stdout=subprocess.PIPE,
                      text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready and proc.stdout.readline().strip() == "ready"
    return proc


def sniffed(proc: subprocess.Popen[str]) -> dict[str, int]:
    out, _ = proc.communicate(timeout=60)
    counts: dict[str, int] = json.loads(out)
    return counts


def test_two_nodes_behind_symmetric_nats_talk_through_coturn_which_sees_only_ciphertext(relayed: Relayed) -> None:
    a, b = relayed.a, relayed.b
    assert wait_until(lambda: ping(a.host, b.overlay), 20, "a ping through the relay", on_fail=relayed.logs)
    assert ping(b.host, a.overlay, count=3)
    tcp_server(b.host, b.overlay, 7001)
    assert tcp_hello(a.host, b.overlay, 7001) == f"hello {a.overlay}"

    capture = sniff(relayed.lab.public, 4)
    pinged = a.host.run(["ping", "-c", "5", "-i", "0.2", "-p", MARKER, b.overlay], check=False)
    assert pinged.returncode == 0, pinged.stdout
    counts = sniffed(capture)
    assert counts["wireguard"] >= 20 and counts["channel_data"] >= 10, counts  # 5 pings, 4 legs each way
    assert counts["marker"] == 0, counts  # the plaintext never reaches the TURN server's host
    capture = sniff(relayed.lab.public, 2)  # the sniffer would see it: the same ping in the clear
    assert a.host.run(["ping", "-c", "2", "-i", "0.2", "-p", MARKER, relayed.turn.address], check=False).returncode == 0
    assert sniffed(capture)["marker"] >= 2

    for side, other in ((a, b), (b, a)):
        [(key, counters)] = side.relay.state()["counters"].items()
        assert key == other.public_key
        assert counters["to_peer_packets"] >= 10 and counters["from_peer_packets"] >= 10, counters
        assert counters["to_peer_bytes"] > 1000 and counters["from_peer_bytes"] > 1000, counters
    for side in (a, b):
        side.relay.call("stop")  # deletes the allocation: coturn logs its usage
    usage = wait_until(lambda: [u for u in relayed.turn.usage() if u.get("rb", 0) > 1000], 10,
                       "coturn's usage lines", on_fail=relayed.logs)
    assert len(usage) >= 2, usage


def test_new_credentials_move_each_node_to_a_new_allocation_and_the_tunnel_stays(relayed: Relayed) -> None:
    a, b = relayed.a, relayed.b
    assert wait_until(lambda: ping(a.host, b.overlay), 20, "a ping through the relay", on_fail=relayed.logs)
    new = {s.name: s.relay.refresh(*relayed.credentials(s.name, timedelta(hours=2))) for s in (a, b)}
    for side in (a, b):
        assert new[side.name] != side.relayed
        assert side.relay.state()["allocations"] == [list(new[side.name]), list(side.relayed)]
    assert ping(a.host, b.overlay, count=2)  # the old allocations still carry it: nobody knows the new yet
    # The controller tells each node the other's new relayed address; WireGuard's endpoints do not change.
    assert a.relay.open(b.public_key, new["b"]) == a.wg.state()["state"]["peers"][0]["endpoint"]
    assert b.relay.open(a.public_key, new["a"]) == b.wg.state()["state"]["peers"][0]["endpoint"]
    assert ping(a.host, b.overlay, count=3) and ping(b.host, a.overlay, count=3)
    for side in (a, b):
        wait_until(lambda side=side: ping(side.host, (b if side is a else a).overlay)
                   and side.relay.state()["allocations"] == [list(new[side.name])], 20,
                   f"{side.name}'s old allocation retired", on_fail=relayed.logs)
        assert side.relay.state()["lost"] == 0
    tcp_server(b.host, b.overlay, 7002)
    assert tcp_hello(a.host, b.overlay, 7002) == f"hello {a.overlay}"


def test_a_refused_credential_is_one_line_naming_the_server_and_breaks_nothing(
        nat_lab: LabFactory, tmp_path: Path) -> None:
    lab = nat_lab(homes=1, nat="symmetric")
    turn = Coturn(lab.public, tmp_path / "coturn")
    turn.start()
    host = lab.homes[0].hosts[0]
    node = RelayNode(host, tmp_path / "relay.log")
    try:
        wrong = turn_credentials(b"not-the-secret", "a", datetime.now(UTC), timedelta(hours=1))
        answer = node.try_start(turn.server, *wrong, WG_PORT)
        assert answer["ok"] is False
        error: str = answer["error"]
        assert error.startswith(f"PermissionDenied: TURN server {turn.address}:{turn.port}: cannot allocate as "), error
        assert "401" in error and "\n" not in error
        expired = turn_credentials(turn.secret, "a", datetime.now(UTC) - timedelta(hours=2), timedelta(hours=1))
        answer = node.try_start(turn.server, *expired, WG_PORT)
        assert answer["ok"] is False and answer["error"].startswith("PermissionDenied: TURN server"), answer
        # The same process goes on: the right credential works at once.
        relayed = node.start(turn.server, *turn_credentials(turn.secret, "a", datetime.now(UTC), timedelta(hours=1)),
                             WG_PORT)
        assert relayed[0] == turn.address
        log = node.logs()
        assert "Traceback" not in log, log
        assert len([line for line in log.splitlines() if "PermissionDenied" in line or "refused" in line]) == 2, log
    finally:
        node.close()
        turn.stop()


def test_a_turn_server_that_does_not_answer_is_unavailable_in_bounded_time(
        nat_lab: LabFactory, tmp_path: Path) -> None:
    lab = nat_lab(homes=1, nat="eim")
    node = RelayNode(lab.homes[0].hosts[0], tmp_path / "relay.log")
    try:
        answer = node.try_start((lab.public.underlay4, 3478), "1:a", "x", WG_PORT, timeout=1.5)
        assert answer == {"ok": False, "error": f"Unavailable: TURN server {lab.public.underlay4}:3478: "
                                                "cannot allocate as 1:a: no answer in 1.5 s"}
    finally:
        node.close()


def test_an_idle_peer_keeps_its_permission_and_the_nat_mapping_to_the_server(
        nat_lab: LabFactory, tmp_path: Path) -> None:
    """With permissions that last 4 s at coturn and NAT mappings that the routers forget after 3 s unanswered
    (kept short for the test), a tunnel idle for 8 s still works: the relay rebinds its channels (which refreshes
    the permissions) and keeps its mapping warm with Binding indications."""
    options = {"keepalive": 0.5, "rebind_every": 1.0}
    with relayed_pair(nat_lab, tmp_path, ["permission-lifetime=4", "channel-lifetime=6"], **options) as pair:
        for router in pair.lab.routers:
            router.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=3",
                        "net.netfilter.nf_conntrack_udp_timeout_stream=3"])
        assert wait_until(lambda: ping(pair.a.host, pair.b.overlay), 20, "a ping through the relay",
                          on_fail=pair.logs)
        time.sleep(8)  # idle on purpose: longer than a permission and a mapping live
        assert ping(pair.a.host, pair.b.overlay, count=2), pair.logs()
        assert ping(pair.b.host, pair.a.overlay, count=2), pair.logs()
        assert all(side.relay.state()["lost"] == 0 for side in (pair.a, pair.b))
    assert "CHANNEL_BIND processed, success" in pair.turn.logs(400)
