"""Addresses and routes: the plan, checked through the fake that prints ``ip addr`` / ``ip route`` text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.errors import InvalidInput, NotFound
from meshd.kernel.netconf import (
    AddAddress,
    AddRoute,
    FakeNetConf,
    LinkConfig,
    LinkState,
    RemoveAddress,
    RemoveRoute,
    SetLink,
    plan_link,
)

NODE = LinkConfig("wg0", ("100.64.0.1/32", "fd00:1::1/128"), ("100.64.0.0/10", "fd00:1::/48"))


def fake() -> FakeNetConf:
    net = FakeNetConf()
    net.add_link("wg0")
    return net


def test_first_apply_brings_the_link_up_then_addresses_then_routes() -> None:
    net = fake()
    assert net.apply(NODE) == [
        SetLink(1420, True),
        AddAddress("100.64.0.1/32"), AddAddress("fd00:1::1/128"),
        AddRoute("100.64.0.0/10"), AddRoute("fd00:1::/48"),
    ]
    assert net.text() == (
        "2: wg0: <UP> mtu 1420\n"
        "    inet 100.64.0.1/32\n"
        "    inet6 fd00:1::1/128\n"
        "100.64.0.0/10 dev wg0 proto 108\n"
        "fd00:1::/48 dev wg0 proto 108\n"
    )
    assert net.apply(NODE) == []


def test_stale_own_routes_and_addresses_go_foreign_routes_stay() -> None:
    net = fake()
    net.apply(LinkConfig("wg0", ("100.64.0.1/32", "100.64.0.9/32"), ("100.64.0.0/10", "100.80.0.0/12")))
    net.add_foreign_route("wg0", "10.0.0.0/8")
    assert net.apply(NODE) == [
        RemoveRoute("100.80.0.0/12"), RemoveAddress("100.64.0.9/32"),
        AddAddress("fd00:1::1/128"), AddRoute("fd00:1::/48"),
    ]
    assert "10.0.0.0/8 dev wg0 proto static" in net.text()


def test_mtu_change_alone() -> None:
    net = fake()
    net.apply(NODE)
    assert net.apply(LinkConfig("wg0", NODE.addresses, NODE.routes, mtu=1280)) == [SetLink(1280, True)]


def test_a_link_that_went_down_comes_up_without_touching_the_mtu() -> None:
    current = LinkState("wg0", 1420, False, frozenset(NODE.addresses), frozenset(NODE.routes))
    assert plan_link(current, NODE) == [SetLink(None, True)]


def test_missing_interface() -> None:
    with pytest.raises(NotFound, match="wg9"):
        fake().apply(LinkConfig("wg9"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"routes": ("100.64.0.1/10",)}, "host bits"),
    ({"addresses": ("100.64.0.300/32",)}, "not an address"),
    ({"mtu": 1000}, "1280"),
])
def test_meaningless_configs_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        LinkConfig("wg0", **kwargs)  # type: ignore[arg-type]


ADDRESSES = ["100.64.0.1/32", "100.64.0.65/32", "fd00:1::1/128", "fd00:1:0:1::1/128"]
ROUTES = ["100.64.0.0/10", "100.64.0.0/26", "fd00:1::/48", "fd00:2::/48", "0.0.0.0/0"]


@st.composite
def link_configs(draw: st.DrawFn) -> LinkConfig:
    return LinkConfig("wg0", tuple(draw(st.lists(st.sampled_from(ADDRESSES), unique=True))),
                      tuple(draw(st.lists(st.sampled_from(ROUTES), unique=True))),
                      draw(st.sampled_from([1280, 1420])))


@settings(max_examples=200, deadline=None)
@given(st.lists(link_configs(), max_size=5), link_configs())
def test_any_sequence_of_applies_ends_in_the_same_text(history: list[LinkConfig], target: LinkConfig) -> None:
    net = fake()
    net.add_foreign_route("wg0", "10.0.0.0/8")
    for desired in history:
        net.apply(desired)
    net.apply(target)
    fresh = fake()
    fresh.add_foreign_route("wg0", "10.0.0.0/8")
    fresh.apply(target)
    assert net.text() == fresh.text()
    assert net.apply(target) == []
