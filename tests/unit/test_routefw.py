"""The route firewall's nft text, checked by libnftables' dry run, and its driver against a fake nft.

The dry run (``nft -c``) reads the kernel's ruleset and so needs root; in CI
(``CI=true``) it may not skip. The kernel's verdict on the loaded table is
given by tests/e2e/test_routing_drivers.py.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

from meshcore.errors import InvalidInput, Unavailable
from meshd.kernel.nft import Libnftables
from meshd.routes.firewall import TABLE, RouteFirewall, RouteFirewallConfig, render_element_changes, render_table
from tests.prerequisites import require

SENDER = RouteFirewallConfig("idmesh0", "100.64.0.0/10", "fd12:3456:789a::/48",
                             route_ifnames=frozenset({"rt-gw1", "rt-gw2"}))
GATEWAY = RouteFirewallConfig(
    "idmesh0", "100.64.0.0/10", "fd12:3456:789a::/48", gateway_ifname="idmesh-gw",
    grants4=frozenset({("100.64.0.5", "10.20.0.0/16"), ("100.64.0.6", "0.0.0.0/0")}),
    grants6=frozenset({("fd12:3456:789a::5", "2001:db8::/32")}))


def _need_root() -> None:
    require("cannot check the nft text", [] if os.geteuid() == 0 else ["needs root (nft -c reads the kernel's ruleset)"])


@pytest.mark.parametrize("cfg", [SENDER, GATEWAY, RouteFirewallConfig("idmesh0", "100.64.0.0/10", "fd00:1::/48")],
                         ids=["sender", "gateway", "empty"])
def test_libnftables_dry_run_accepts_the_rendered_table(cfg: RouteFirewallConfig) -> None:
    _need_root()
    nft = Libnftables(check=True)
    try:
        nft(render_table(cfg))
        with pytest.raises(Unavailable):
            nft(render_table(cfg).replace("@route_ifaces", "@route_nowhere"))  # the check does check
    finally:
        nft.close()
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30, check=False).stdout
    assert TABLE not in listed  # a dry run commits nothing


def test_the_table_is_replaced_whole_in_one_script() -> None:
    text = render_table(SENDER)
    assert text.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n")
    assert 'set route_ifaces { type ifname; elements = { "rt-gw1", "rt-gw2" }; }' in text
    assert text.rstrip().endswith("}")


def test_a_sender_drops_what_its_tunnels_did_not_ask_for_and_keeps_non_overlay_traffic_off_the_mesh() -> None:
    text = render_table(SENDER)
    assert text.index("iifname @route_ifaces ct state established,related accept") < text.index(
        "iifname @route_ifaces counter drop")
    assert 'oifname "idmesh0" ip daddr != 100.64.0.0/10 reject with icmpx admin-prohibited' in text
    assert ('oifname "idmesh0" ip6 daddr != { fd12:3456:789a::/48, fe80::/10, ff00::/8 } '
            "reject with icmpx admin-prohibited") in text


def test_gateway_chains_are_left_out_when_the_node_is_not_a_gateway() -> None:
    text = render_table(SENDER)
    for absent in ("chain replies", "chain nat", "masquerade", "ct mark set", "counter name refused"):
        assert absent not in text
    assert "set grant4 { type ipv4_addr . ipv4_addr; flags interval; }" in text  # empty: no elements clause
    assert "counter refused { }" in text  # always there, so refused() can always read it


def test_a_gateway_forwards_granted_pairs_marks_them_masquerades_and_counts_the_rest() -> None:
    text = render_table(GATEWAY)
    assert "elements = { 100.64.0.5 . 10.20.0.0/16, 100.64.0.6 . 0.0.0.0/0 };" in text
    assert "elements = { fd12:3456:789a::5 . 2001:db8::/32 };" in text
    gw = '"idmesh-gw"'
    order = [f"iifname {gw} ip saddr . ip daddr @grant4 ct mark set ct mark | 0x00080000 accept",
             f"iifname {gw} ip6 saddr . ip6 daddr @grant6 ct mark set ct mark | 0x00080000 accept",
             f"iifname {gw} counter name refused drop",
             f"oifname {gw} ct state established,related accept",
             f"oifname {gw} drop"]
    assert [text.index(line) for line in order] == sorted(text.index(line) for line in order)
    assert f"iifname {gw} counter drop" in text  # input: nothing through it is for the gateway itself
    assert f"iifname != {gw} ct mark & 0x00080000 == 0x00080000 meta mark set meta mark | 0x00080000" in text
    assert f"oifname != {gw} ct mark & 0x00080000 == 0x00080000 masquerade" in text


def test_grants_are_made_canonical_and_collapsed_so_interval_elements_never_overlap() -> None:
    cfg = RouteFirewallConfig("idmesh0", "100.64.0.0/10", "fd12:3456:789a::/48", gateway_ifname="gw0",
                              grants4=frozenset({("100.64.0.5", "10.0.0.0/8"), ("100.64.0.5", "10.20.0.0/16"),
                                                 ("100.64.0.7", "10.0.0.0/9"), ("100.64.0.7", "10.128.0.0/9")}),
                              grants6=frozenset({("fd12:3456:789a:0::5", "2001:db8::/32")}))
    assert cfg.grants4 == {("100.64.0.5", "10.0.0.0/8"), ("100.64.0.7", "10.0.0.0/8")}
    assert cfg.grants6 == {("fd12:3456:789a::5", "2001:db8::/32")}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mesh_ifname": "idmesh 0"}, "interface name"),
    ({"overlay4": "100.64.0.1/10"}, "without host bits"),
    ({"overlay6": "100.64.0.0/10"}, "IPv6 prefix"),
    ({"route_ifnames": frozenset({"idmesh0"})}, "two roles"),
    ({"gateway_ifname": "idmesh0"}, "two roles"),
    ({"gateway_ifname": "gw0", "grants4": frozenset({("fd00::1", "10.0.0.0/8")})}, "IPv4 address"),
    ({"gateway_ifname": "gw0", "grants4": frozenset({("100.64.0.5", "10.0.0.1/8")})}, "without host bits"),
    ({"gateway_ifname": "gw0", "grants6": frozenset({("fd00::1", "10.0.0.0/8")})}, "IPv6 prefix"),
])
def test_bad_configurations_are_refused(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"mesh_ifname": "idmesh0", "overlay4": "100.64.0.0/10", "overlay6": "fd00:1::/48"}
    with pytest.raises(InvalidInput, match=message):
        RouteFirewallConfig(**(base | kwargs))  # type: ignore[arg-type]


class FakeNft:
    def __init__(self, refused: int = 0) -> None:
        self.scripts: list[str] = []
        self.refused = refused

    def __call__(self, script: str) -> str:
        self.scripts.append(script)
        if script.startswith("list counter"):
            return f"table inet {TABLE} {{\n\tcounter refused {{\n\t\tpackets {self.refused} bytes 840\n\t}}\n}}\n"
        return ""


def test_the_driver_sends_the_table_only_when_the_configuration_changes() -> None:
    nft = FakeNft(refused=7)
    fw = RouteFirewall(nft)
    assert fw.refused() == 0 and nft.scripts == []  # nothing installed: nothing to ask
    fw.apply(SENDER)
    fw.apply(RouteFirewallConfig("idmesh0", "100.64.0.0/10", "fd12:3456:789a::/48",
                                 route_ifnames=frozenset({"rt-gw2", "rt-gw1"})))  # equal
    assert nft.scripts == [render_table(SENDER)]
    assert fw.refused() == 0 and len(nft.scripts) == 1  # not a gateway
    fw.apply(GATEWAY)
    assert nft.scripts[-1] == render_table(GATEWAY)
    assert fw.refused() == 7
    fw.close()
    assert nft.scripts[-1] == f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
    fw.apply(GATEWAY)  # after close, the table is sent again
    assert nft.scripts[-1] == render_table(GATEWAY)


def test_nft_errors_name_the_table() -> None:
    def broken(script: str) -> str:
        raise Unavailable("Could not process rule: No buffer space available")

    with pytest.raises(Unavailable, match=rf"nftables refused the route table \(table inet {TABLE}\)"):
        RouteFirewall(broken).apply(SENDER)


def test_an_agent_coming_or_going_changes_set_elements_only_and_keeps_the_counter() -> None:
    nft = FakeNft()
    fw = RouteFirewall(nft)
    fw.apply(GATEWAY)
    more = dataclasses.replace(GATEWAY, grants4=GATEWAY.grants4 | {("100.64.0.9", "10.20.0.0/16")})
    fw.apply(more)
    assert nft.scripts[-1] == f"add element inet {TABLE} grant4 {{ 100.64.0.9 . 10.20.0.0/16 }}\n"
    fw.apply(GATEWAY)
    assert nft.scripts[-1] == f"delete element inet {TABLE} grant4 {{ 100.64.0.9 . 10.20.0.0/16 }}\n"
    tunnels = dataclasses.replace(GATEWAY, route_ifnames=frozenset({"rt-x"}))
    assert render_element_changes(GATEWAY, tunnels) == f'add element inet {TABLE} route_ifaces {{ "rt-x" }}\n'
    other = dataclasses.replace(GATEWAY, gateway_ifname="gw-2")
    assert render_element_changes(GATEWAY, other) is None  # an interface changes: the whole table
    fw.apply(other)
    assert nft.scripts[-1] == render_table(other)
