"""The NAT lab behaves like the NATs it claims to be, proven with plain UDP sockets (nothing of idmesh).

A reflector on the public host answers with the source ip:port it saw, on
two ports; LAN hosts ask it from one socket and compare the answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.mesh import tcp_hello, tcp_server
from tests.e2e.natlab import PUBLIC_ADDRESS, NatKind, NatLab, eim_mask
from tests.e2e.udptool import UdpSession, start_echo

ECHO_A, ECHO_B = 3478, 3479
LabFactory = Callable[..., NatLab]


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[Callable[..., UdpSession]]:
    made: list[UdpSession] = []

    def open_session(host: Any, port: int = 0) -> UdpSession:
        one = UdpSession(host, tmp_path / f"udp-{host.name}-{len(made)}.log", port)
        made.append(one)
        return one

    yield open_session
    for one in made:
        one.close()


def lab_with_echo(nat_lab: LabFactory, tmp_path: Path, **kwargs: Any) -> NatLab:
    lab = nat_lab(**kwargs)
    start_echo(lab.public, tmp_path / "echo.log", ECHO_A, ECHO_B)
    return lab


def both(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Run two blocking calls at the same time (two hosts punching at once)."""
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(first), pool.submit(second)
        return a.result(), b.result()


def test_eim_maps_one_socket_to_one_public_address_whatever_the_destination(
        nat_lab: LabFactory, sessions: Callable[..., UdpSession], tmp_path: Path) -> None:
    lab = lab_with_echo(nat_lab, tmp_path, homes=1, hosts_per_home=2, nat="eim")
    home = lab.homes[0]
    first, second = sessions(home.hosts[0], 40000), sessions(home.hosts[1], 40000)
    seen_a = first.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}")
    seen_b = first.ask(f"{PUBLIC_ADDRESS}:{ECHO_B}")
    assert seen_a == seen_b == f"{home.router.wan}:{40000 ^ eim_mask(0, 0)}", home.router.mappings()
    other = second.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}")  # same LAN port, another host: another public port
    assert other == second.ask(f"{PUBLIC_ADDRESS}:{ECHO_B}") == f"{home.router.wan}:{40000 ^ eim_mask(0, 1)}"
    assert other != seen_a


def test_symmetric_nat_maps_each_destination_to_another_port(
        nat_lab: LabFactory, sessions: Callable[..., UdpSession], tmp_path: Path) -> None:
    lab = lab_with_echo(nat_lab, tmp_path, homes=1, nat="symmetric")
    one = sessions(lab.homes[0].hosts[0], 40000)
    seen_a, seen_b = one.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}"), one.ask(f"{PUBLIC_ADDRESS}:{ECHO_B}")
    assert seen_a is not None and seen_b is not None
    assert seen_a.split(":")[0] == seen_b.split(":")[0] == lab.homes[0].router.wan
    assert seen_a != seen_b
    assert one.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}") == seen_a  # the same destination keeps its mapping


def test_open_router_routes_the_lan_as_it_is(
        nat_lab: LabFactory, sessions: Callable[..., UdpSession], tmp_path: Path) -> None:
    lab = lab_with_echo(nat_lab, tmp_path, homes=2, nat="open")
    a, b = lab.homes[0].hosts[0], lab.homes[1].hosts[0]
    sa, sb = sessions(a, 40000), sessions(b, 40001)
    assert sa.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}") == f"{a.underlay4}:40000"
    sb.send(f"{a.underlay4}:40000", "unsolicited but routed")  # no NAT, no filter
    assert sa.recv(0.5) == [("unsolicited but routed", f"{b.underlay4}:40001")]


@pytest.mark.parametrize("kind", ["eim", "symmetric"])
def test_only_the_destination_a_host_sent_to_may_answer(
        kind: NatKind, nat_lab: LabFactory, sessions: Callable[..., UdpSession]) -> None:
    lab = nat_lab(homes=1, nat=kind)
    inside = sessions(lab.homes[0].hosts[0], 40000)
    asked, stranger = sessions(lab.public, 6000), sessions(lab.public, 6001)
    inside.send(f"{PUBLIC_ADDRESS}:6000", "out")
    [(data, mapping)] = asked.recv(0.5)
    assert data == "out" and mapping.startswith(lab.homes[0].router.wan + ":")
    stranger.send(mapping, "same address, other port")  # address-and-port-dependent filtering
    asked.send(f"{lab.homes[0].router.wan}:40001", "a port nobody mapped")
    assert inside.recv(0.5) == []
    asked.send(mapping, "the reply")
    assert inside.recv(0.5) == [("the reply", f"{PUBLIC_ADDRESS}:6000")]
    assert tcp_hello(lab.homes[0].hosts[0], PUBLIC_ADDRESS, 7000) is None  # nothing listens yet: refused
    tcp_server(lab.public, "0.0.0.0", 7000)
    assert tcp_hello(lab.homes[0].hosts[0], PUBLIC_ADDRESS, 7000) == f"hello {lab.homes[0].router.wan}"


def test_hole_punching_works_between_two_eim_homes(
        nat_lab: LabFactory, sessions: Callable[..., UdpSession], tmp_path: Path) -> None:
    lab = lab_with_echo(nat_lab, tmp_path, homes=2, nat="eim")
    a, b = sessions(lab.homes[0].hosts[0], 51820), sessions(lab.homes[1].hosts[0], 51820)
    map_a, map_b = a.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}"), b.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}")
    assert map_a and map_b
    a.send(map_b, "too early")  # b has not sent to a: its router drops this
    assert b.recv(0.3) == []
    got_a, got_b = both(lambda: a.punch(map_b, 5), lambda: b.punch(map_a, 5))
    assert got_a == {"ok": True, "reached": True, "from": map_b}
    assert got_b == {"ok": True, "reached": True, "from": map_a}
    a.recv(0.2)
    b.send(map_a, "through the hole")
    assert ("through the hole", map_b) in a.recv(0.5)


def test_hole_punching_fails_between_two_symmetric_homes(
        nat_lab: LabFactory, sessions: Callable[..., UdpSession], tmp_path: Path) -> None:
    lab = lab_with_echo(nat_lab, tmp_path, homes=2, nat="symmetric")
    a, b = sessions(lab.homes[0].hosts[0], 51820), sessions(lab.homes[1].hosts[0], 51820)
    map_a, map_b = a.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}"), b.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}")
    assert map_a and map_b
    got_a, got_b = both(lambda: a.punch(map_b, 2), lambda: b.punch(map_a, 2))
    assert not got_a["reached"] and not got_b["reached"]
    assert a.recv(0) == [] and b.recv(0) == []


def test_a_rebooted_router_gives_a_new_public_port_and_forgets_the_old(
        nat_lab: LabFactory, sessions: Callable[..., UdpSession], tmp_path: Path) -> None:
    lab = lab_with_echo(nat_lab, tmp_path, homes=2, nat="eim")
    a, b = sessions(lab.homes[0].hosts[0], 51820), sessions(lab.homes[1].hosts[0], 51820)
    map_a, map_b = a.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}"), b.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}")
    assert map_a and map_b
    assert all(r["reached"] for r in both(lambda: a.punch(map_b, 5), lambda: b.punch(map_a, 5)))
    a.recv(0.3), b.recv(0.3)  # the last punches
    lab.homes[0].router.reboot()
    b.send(map_a, "to the old mapping")
    assert a.recv(0.5) == []
    new_a = a.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}")
    assert new_a is not None and new_a != map_a and new_a.split(":")[0] == map_a.split(":")[0]
    assert all(r["reached"] for r in both(lambda: a.punch(map_b, 5), lambda: b.punch(new_a, 5)))


def test_the_nat_kind_can_be_switched_while_running(
        nat_lab: LabFactory, sessions: Callable[..., UdpSession], tmp_path: Path) -> None:
    lab = lab_with_echo(nat_lab, tmp_path, homes=1, nat="eim")
    router, host = lab.homes[0].router, lab.homes[0].hosts[0]
    one = sessions(host, 40000)

    def answers() -> tuple[str | None, str | None]:
        return one.ask(f"{PUBLIC_ADDRESS}:{ECHO_A}"), one.ask(f"{PUBLIC_ADDRESS}:{ECHO_B}")

    first, second = answers()
    assert first == second != f"{host.underlay4}:40000"
    router.set_nat("symmetric")
    first, second = answers()
    assert first != second
    router.set_nat("open")
    assert answers() == (f"{host.underlay4}:40000",) * 2
    router.set_nat("eim")
    first, second = answers()
    assert first == second == f"{router.wan}:{40000 ^ eim_mask(0, 0)}"
    with pytest.raises(ValueError, match="unknown NAT kind"):
        router.set_nat("full-cone")  # type: ignore[arg-type]
