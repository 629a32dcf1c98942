"""Overlay addressing: node blocks never overlap, the node takes the first host,
agent slots stay inside the block in both families, block_of inverts block."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from meshcore.addressing import CGNAT, MeshPrefixes, NodeBlock, random_ula48
from meshcore.errors import Exhausted, InvalidInput

ULA = IPv6Network("fd12:3456:789a::/48")
DEFAULT = MeshPrefixes(CGNAT, ULA)


@st.composite
def any_sizes(draw: st.DrawFn) -> tuple[IPv4Network, IPv6Network, int, int]:
    """An IPv4 prefix inside 100.64.0.0/10, a ULA /48, and any block sizes."""
    v4_len = draw(st.integers(min_value=10, max_value=29))
    v4_index = draw(st.integers(min_value=0, max_value=2 ** (v4_len - 10) - 1))
    v4 = IPv4Network((int(CGNAT.network_address) + (v4_index << (32 - v4_len)), v4_len))
    global_id = draw(st.integers(min_value=0, max_value=2**40 - 1))
    v6 = IPv6Network((int(IPv6Address("fd00::")) | (global_id << 80), 48))
    block_v4 = draw(st.integers(min_value=v4_len + 1, max_value=30))
    block_v6 = draw(st.integers(min_value=49, max_value=120))
    return v4, v6, block_v4, block_v6


@st.composite
def mesh_prefixes(draw: st.DrawFn) -> MeshPrefixes:
    """Any mesh MeshPrefixes accepts."""
    v4, v6, block_v4, block_v6 = draw(any_sizes())
    try:
        return MeshPrefixes(v4, v6, block_v4, block_v6)
    except InvalidInput:
        reject()


@given(any_sizes())
def test_any_accepted_block_sizes_fit_every_agent_slot_in_both_families(
    sizes: tuple[IPv4Network, IPv6Network, int, int],
) -> None:
    try:
        prefixes = MeshPrefixes(*sizes)
    except InvalidInput as refused:
        assert "holds fewer addresses than the IPv4 block" in str(refused)
        return
    block = prefixes.block(prefixes.capacity - 1)
    v4, v6 = block.agent_address(block.agent_capacity - 1)
    assert v4 in block.v4 and v6 in block.v6


@given(mesh_prefixes(), st.data())
def test_node_blocks_never_overlap(prefixes: MeshPrefixes, data: st.DataObject) -> None:
    indices = st.integers(min_value=0, max_value=prefixes.capacity - 1)
    i, j = data.draw(indices), data.draw(indices)
    a, b = prefixes.block(i), prefixes.block(j)
    assert a.v4.subnet_of(prefixes.v4) and a.v6.subnet_of(prefixes.v6)
    assert (a.v4.prefixlen, a.v6.prefixlen) == (prefixes.block_v4, prefixes.block_v6)
    if i == j:
        assert a == b
    else:
        assert not a.v4.overlaps(b.v4)
        assert not a.v6.overlaps(b.v6)


@given(mesh_prefixes(), st.data())
def test_neighbouring_blocks_are_adjacent(prefixes: MeshPrefixes, data: st.DataObject) -> None:
    i = data.draw(st.integers(min_value=0, max_value=prefixes.capacity - 2))
    a, b = prefixes.block(i), prefixes.block(i + 1)
    assert a.v4.broadcast_address + 1 == b.v4.network_address
    assert a.v6.broadcast_address + 1 == b.v6.network_address


@given(mesh_prefixes(), st.data())
def test_node_address_is_the_first_host_of_its_block(prefixes: MeshPrefixes, data: st.DataObject) -> None:
    block = prefixes.block(data.draw(st.integers(min_value=0, max_value=prefixes.capacity - 1)))
    assert block.node_v4 == next(block.v4.hosts()) == block.v4.network_address + 1
    assert block.node_v6 == next(block.v6.hosts()) == block.v6.network_address + 1


@given(mesh_prefixes(), st.data())
def test_agent_slots_stay_inside_the_block_in_both_families(prefixes: MeshPrefixes, data: st.DataObject) -> None:
    block = prefixes.block(data.draw(st.integers(min_value=0, max_value=prefixes.capacity - 1)))
    slot = data.draw(st.integers(min_value=0, max_value=block.agent_capacity - 1))
    for edge in {0, slot, block.agent_capacity - 1}:
        v4, v6 = block.agent_address(edge)
        assert v4 in block.v4 and v6 in block.v6
        assert v4 not in (block.v4.network_address, block.v4.broadcast_address, block.node_v4)
        assert v6 not in (block.v6.network_address, block.node_v6)
        assert int(v4) - int(block.v4.network_address) == int(v6) - int(block.v6.network_address)
        assert block.contains(str(v4)) and block.contains(str(v6))
        assert prefixes.block_of(str(v4)) == prefixes.block_of(str(v6)) == block.index


def test_agent_slots_are_distinct_and_fill_the_block_exactly() -> None:
    block = MeshPrefixes(CGNAT, ULA, 28, 64).block(3)
    assert block.agent_capacity == 16 - 3
    addresses = [block.agent_address(s) for s in range(block.agent_capacity)]
    assert len({v4 for v4, _ in addresses}) == len({v6 for _, v6 in addresses}) == block.agent_capacity
    assert addresses[0] == (IPv4Address("100.64.0.50"), IPv6Address("fd12:3456:789a:3::2"))
    assert addresses[-1][0] == block.v4.broadcast_address - 1


@pytest.mark.parametrize("slot", [-1, 61, 1000])
def test_agent_slot_outside_the_block_is_refused(slot: int) -> None:
    block = DEFAULT.block(0)
    assert block.agent_capacity == 61
    with pytest.raises(Exhausted, match=f"agent slot {slot} is outside block 100.64.0.0/26"):
        block.agent_address(slot)


@given(mesh_prefixes(), st.data())
def test_block_of_inverts_block(prefixes: MeshPrefixes, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=0, max_value=prefixes.capacity - 1))
    block = prefixes.block(index)
    for address in (
        block.v4.network_address,
        block.node_v4,
        block.v4.broadcast_address,
        block.v6.network_address,
        block.node_v6,
        block.v6.broadcast_address,
    ):
        assert prefixes.block_of(str(address)) == index


def test_block_of_is_none_outside_the_mesh() -> None:
    small = MeshPrefixes(IPv4Network("100.64.0.0/24"), ULA, 26, 64)
    assert small.capacity == 4
    assert small.block_of("100.64.1.0") is None  # after the IPv4 prefix
    assert small.block_of("10.0.0.1") is None
    assert small.block_of("fd12:3456:789b::1") is None  # another ULA
    # Inside the IPv6 /48 but beyond the last block the smaller IPv4 side allows.
    assert small.block_of("fd12:3456:789a:4::1") is None
    assert small.block_of("fd12:3456:789a:3::1") == 3


def test_capacity_is_decided_by_the_smaller_family() -> None:
    assert DEFAULT.capacity == 2**16  # 100.64.0.0/10 in /26 and a /48 in /64: both 65536
    assert MeshPrefixes(IPv4Network("100.64.0.0/16"), ULA, 26, 64).capacity == 1024
    assert MeshPrefixes(CGNAT, ULA, 30, 56).capacity == 256
    last = DEFAULT.block(DEFAULT.capacity - 1)
    assert last.v4.broadcast_address == CGNAT.broadcast_address
    assert last.v6.broadcast_address == ULA.broadcast_address


@pytest.mark.parametrize("index", [-1, 2**16, 2**20])
def test_block_beyond_capacity_is_refused(index: int) -> None:
    with pytest.raises(Exhausted, match="the mesh has 65536 node blocks"):
        DEFAULT.block(index)


@pytest.mark.parametrize(
    "v4, v6, block_v4, block_v6, message",
    [
        ("10.0.0.0/8", str(ULA), 26, 64, "must lie inside 100.64.0.0/10"),
        ("100.0.0.0/8", str(ULA), 26, 64, "must lie inside 100.64.0.0/10"),
        ("100.128.0.0/16", str(ULA), 26, 64, "must lie inside 100.64.0.0/10"),
        ("100.64.0.0/10", "2001:db8::/48", 26, 64, "must be a ULA"),
        ("100.64.0.0/10", "fe80::/48", 26, 64, "must be a ULA"),
        ("100.64.0.0/24", str(ULA), 24, 64, "IPv4 block size /24"),
        ("100.64.0.0/24", str(ULA), 20, 64, "IPv4 block size /20"),
        ("100.64.0.0/10", str(ULA), 31, 64, "at most /30"),
        ("100.64.0.0/10", str(ULA), 32, 64, "at most /30"),
        ("100.64.0.0/10", str(ULA), 26, 48, "IPv6 block size /48"),
        ("100.64.0.0/10", str(ULA), 26, 121, "at most /120"),
        ("100.64.0.0/10", str(ULA), 22, 120, "holds fewer addresses than the IPv4 block"),
    ],
)
def test_invalid_prefixes_and_block_sizes_are_refused(
    v4: str, v6: str, block_v4: int, block_v6: int, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        MeshPrefixes(IPv4Network(v4), IPv6Network(v6), block_v4, block_v6)


def test_random_ula48_is_a_ula_slash_48() -> None:
    seen = set()
    for _ in range(200):
        prefix = random_ula48()
        assert prefix.prefixlen == 48
        assert prefix.subnet_of(IPv6Network("fd00::/8"))
        MeshPrefixes(CGNAT, prefix)  # usable as a mesh prefix
        seen.add(prefix)
    assert len(seen) > 190  # 40 random bits: collisions are (nearly) impossible


def test_node_block_contains_only_its_own_addresses() -> None:
    block = NodeBlock(0, IPv4Network("100.64.0.0/26"), IPv6Network("fd12:3456:789a::/64"))
    assert block.contains("100.64.0.63") and block.contains("fd12:3456:789a::ffff")
    assert not block.contains("100.64.0.64") and not block.contains("fd12:3456:789a:1::")
