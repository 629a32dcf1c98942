"""``meshctl status`` names the controller replica in use and its place among them, and reads an older meshd's
answer (no list) as it always did."""

from __future__ import annotations

from typing import Any

from meshctl.status import controller_line

A, B, C = "https://ctl-1:8443", "https://ctl-2:8443", "https://ctl-3:8443"


def link(**fields: Any) -> dict[str, Any]:
    return {"url": B, "urls": [A, B, C], "connected": True, "protocol": 4, "netmap_version": 42,
            "applied_version": 42, "last_error": None, **fields}


def test_the_replica_in_use_is_named_with_its_place_among_them() -> None:
    assert controller_line(link()) == "controller https://ctl-2:8443 (2 of 3): connected, netmap version 42"


def test_a_disconnected_node_names_the_replica_it_tries_and_why_it_left_the_last() -> None:
    line = controller_line(link(url=C, connected=False, last_error="cannot connect (Connection refused)"))
    assert line == ("controller https://ctl-3:8443 (3 of 3): disconnected (cannot connect (Connection refused)), "
                    "netmap version 42")


def test_a_single_controller_reads_as_before() -> None:
    assert controller_line(link(url=A, urls=[A])) == "controller https://ctl-1:8443: connected, netmap version 42"


def test_an_older_meshd_without_a_list_reads_as_before() -> None:
    ctl = link(url=A, netmap_version=None, connected=False)
    del ctl["urls"]
    assert controller_line(ctl) == "controller https://ctl-1:8443: disconnected (connecting), netmap version None"


def test_a_replica_no_longer_listed_is_said_to_be() -> None:
    assert controller_line(link(url="https://ctl-0:8443")) == (
        "controller https://ctl-0:8443 (not among the 3 listed): connected, netmap version 42")
