"""The node's side of the netmap protocol (:class:`meshcore.netmap.NodeView`): pure, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.netmap import NodeView, ResyncNeeded
from meshcore.wire.stream import Netmap, NetmapDelta, PeerNode, StreamMessage

PREFIXES = ("100.64.0.0/10", "fd7a:1:2::/48")


def node(i: int, endpoints: tuple[str, ...] = (), tags: tuple[str, ...] = ("db",)) -> PeerNode:
    return PeerNode(
        name=f"n{i}",
        wireguard_public_key=f"{i:043d}=",
        addresses=(f"100.64.{i}.1", f"fd7a:1:2:{i:x}::1"),
        blocks=(f"100.64.{i}.0/26", f"fd7a:1:2:{i:x}::/64"),
        endpoints=endpoints,
        tags=tags,
    )


def netmap(version: int, *nodes: PeerNode) -> Netmap:
    return Netmap(version=version, domain="acme.mesh", prefixes=PREFIXES, nodes={n.name: n for n in nodes})


def test_a_view_starts_as_a_copy_of_the_full_map() -> None:
    full = netmap(7, node(1), node(2))
    view = NodeView(full)
    assert view.version == 7 and view.nodes == full.nodes
    view.nodes.pop("n1")
    assert "n1" in full.nodes  # the view owns its dict: changing it never reaches the message


def test_a_delta_adds_changes_and_removes_nodes() -> None:
    view = NodeView(netmap(7, node(1), node(2), node(3)))
    moved = node(2, endpoints=("198.51.100.12:51820",))
    changed, removed = view.apply(NetmapDelta(base=7, version=8, upsert=(node(4), moved), remove=("n3",)))
    assert changed == [node(4), moved]
    assert removed == ["n3"]
    assert view.version == 8
    assert view.nodes == {"n1": node(1), "n2": moved, "n4": node(4)}


def test_an_unchanged_upsert_or_an_unknown_removal_is_not_reported() -> None:
    view = NodeView(netmap(7, node(1)))
    changed, removed = view.apply(NetmapDelta(base=7, version=8, upsert=(node(1),), remove=("ghost",)))
    assert (changed, removed) == ([], [])
    assert view.version == 8  # the version still moves: the next delta is based on 8


@pytest.mark.parametrize("version", [5, 7])
def test_a_stale_delta_is_ignored(version: int) -> None:
    view = NodeView(netmap(7, node(1)))
    stale = NetmapDelta(base=version - 1, version=version, remove=("n1",))
    assert view.apply(stale) == ([], [])
    assert view.version == 7 and "n1" in view.nodes


@pytest.mark.parametrize("base", [8, 9, 20])
def test_a_gap_raises_resync_needed_and_leaves_the_view_as_it_was(base: int) -> None:
    view = NodeView(netmap(7, node(1), node(2)))
    before = view.snapshot()
    with pytest.raises(ResyncNeeded, match=f"delta {base}->{base + 1} does not follow version 7"):
        view.apply(NetmapDelta(base=base, version=base + 1, upsert=(node(3),), remove=("n1",)))
    assert view.snapshot() == before


def test_snapshot_round_trips_through_the_wire() -> None:
    view = NodeView(netmap(7, node(1), node(2, endpoints=("[2001:db8::12]:51820",))))
    view.apply(NetmapDelta(base=7, version=8, upsert=(node(3, tags=()),), remove=("n1",)))
    snap = view.snapshot()
    assert snap == netmap(8, node(2, endpoints=("[2001:db8::12]:51820",)), node(3, tags=()))
    line = StreamMessage(type="full", full=snap).model_dump_json(exclude_none=True)
    again = StreamMessage.model_validate_json(line)
    assert again.type == "full" and again.full == snap
    assert NodeView(Netmap.model_validate_json(snap.model_dump_json())).snapshot() == snap


# -- property: any sequence of deltas lands on the map built directly ------------------------------

_names = st.integers(min_value=0, max_value=11)
_change = st.tuples(
    st.lists(st.tuples(_names, st.integers(min_value=0, max_value=3)), max_size=4),  # upserts: (node, endpoint variant)
    st.lists(_names, unique=True, max_size=3),  # removals
)


def _variant(i: int, v: int) -> PeerNode:
    return node(i, endpoints=(f"198.51.100.{v}:51820",) if v else ())


@settings(max_examples=200, deadline=None)
@given(initial=st.lists(_names, unique=True, max_size=8), changes=st.lists(_change, max_size=12))
def test_applying_deltas_equals_building_the_final_map(
    initial: list[int], changes: list[tuple[list[tuple[int, int]], list[int]]]
) -> None:
    expected = {f"n{i}": node(i) for i in initial}
    view = NodeView(netmap(100, *expected.values()))
    version = 100
    for upserts, removals in changes:
        remove = tuple(f"n{i}" for i in removals)
        # the controller never upserts and removes one node in the same delta; removal wins if it did
        upsert = tuple({_variant(i, v).name: _variant(i, v) for i, v in upserts if f"n{i}" not in remove}.values())
        before = dict(view.nodes)
        changed, removed = view.apply(NetmapDelta(base=version, version=version + 1, upsert=upsert, remove=remove))
        version += 1
        for name in remove:
            expected.pop(name, None)
        for peer in upsert:
            expected[peer.name] = peer
        assert removed == [n for n in remove if n in before]
        assert changed == [p for p in upsert if before.get(p.name) != p]
    assert view.version == version
    assert view.snapshot() == netmap(version, *expected.values())
