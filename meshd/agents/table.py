"""The agents' nftables table, ``inet idmesh_agents``, as data and text (pure, no I/O).

What the table does and why is told in :mod:`meshd.agents.net`, the shell
that installs it; here are its pieces — the mark field that numbers agents
(:class:`MarkField`), what the table depends on (:class:`AgentTable`), one
agent's place (:class:`AgentSlot`) — and the scripts that create the table
and add or remove one agent, each one atomic transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from meshcore.errors import InvalidInput
from meshd.mesh.firewall import FLOW_GROUP

__all__ = [
    "DEFAULT_MARK_MASK",
    "TABLE",
    "AgentSlot",
    "AgentTable",
    "MarkField",
    "render_add",
    "render_remove",
    "render_table",
]

TABLE = "idmesh_agents"
DEFAULT_MARK_MASK = 0xFFF00000
"""Bits 20-31: 4095 agents per node. Clear of Tailscale (0x40000/0x80000 under 0xff0000), kube-proxy
(0x4000, 0x8000), Cilium's 0x0f00, Istio's 1337 and wg-quick's 51820; overlaps Calico's default
0xffff0000 (pass another mask there)."""



@dataclass(frozen=True)
class MarkField:
    """The bits of the packet (and conntrack) mark that carry an agent number; the rest is left alone."""

    mask: int = DEFAULT_MARK_MASK

    def __post_init__(self) -> None:
        if not 0 < self.mask <= 0xFFFFFFFF:
            raise InvalidInput(f"mark mask {self.mask:#x} must be a non-zero 32-bit value")
        run = self.mask >> self.shift
        if run & (run + 1):
            raise InvalidInput(f"mark mask {self.mask:#010x} must be one contiguous run of bits")

    @property
    def shift(self) -> int:
        return (self.mask & -self.mask).bit_length() - 1

    @property
    def capacity(self) -> int:
        """The largest agent number the field holds (0 means "no agent")."""
        return self.mask >> self.shift

    @property
    def keep(self) -> int:
        """The other bits, kept when the field is written."""
        return ~self.mask & 0xFFFFFFFF

    def value(self, number: int) -> int:
        if not 0 < number <= self.capacity:
            raise InvalidInput(f"agent number {number} does not fit mark mask {self.mask:#010x}")
        return number << self.shift


@dataclass(frozen=True)
class AgentTable:
    """Everything the table's text depends on, apart from the agents."""

    node: str
    ifname: str
    block4: IPv4Network
    block6: IPv6Network
    field: MarkField = MarkField()
    level: int = 2
    """``socket cgroupv2 level``: depth of an agent's cgroup below the cgroup2 root."""

    @property
    def node4(self) -> IPv4Address:
        return self.block4.network_address + 1

    @property
    def node6(self) -> IPv6Address:
        return self.block6.network_address + 1


@dataclass(frozen=True)
class AgentSlot:
    """One agent's place on this node: its cgroup, its mark, its addresses."""

    agent_id: str
    cgroup: Path
    """The agent's cgroup directory (write a pid to ``cgroup.procs`` to move a process in)."""
    mark: int
    """Its value in the mark field (``number << shift``)."""
    number: int
    """The offset of its IPv4 address in the node's block; names its chain ``agent_<number>``."""
    ipv4: str
    ipv6: str
    nft_cgroup: str
    """The cgroup as nft names it: relative to /sys/fs/cgroup."""

    @property
    def chain(self) -> str:
        return f"agent_{self.number}"

    @property
    def inbound_chain(self) -> str:
        return f"agent_{self.number}_in"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped so that it enters the agent's cgroup before it runs (no window outside it).

        For a supervisor that spawns the agent: the wrapper (``/bin/sh``) writes
        its own pid to ``cgroup.procs`` and then ``exec``\\ s ``argv`` in place.
        """
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroup / "cgroup.procs"), *argv]


def _ranges(block: IPv4Network | IPv6Network, node: IPv4Address | IPv6Address) -> str:
    """The block without the node's own address, as nft interval elements."""
    make = type(block.network_address)
    parts = []
    for lo, hi in ((int(block.network_address), int(node) - 1), (int(node) + 1, int(block.broadcast_address))):
        if lo <= hi:
            parts.append(str(make(lo)) if lo == hi else f"{make(lo)}-{make(hi)}")
    return ", ".join(parts)


def _hex(value: int) -> str:
    return f"{value:#010x}"


def render_table(t: AgentTable) -> str:
    """The whole table, no agents, for ``nft -f``: created if missing, emptied, filled, in one transaction."""
    m, keep, oif, lvl = _hex(t.field.mask), _hex(t.field.keep), f'"{t.ifname}"', t.level
    watch_log = f'limit rate 20/second burst 40 packets log group {FLOW_GROUP} prefix "mcp"'
    return "\n".join([
        f"add table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f'  comment "idmesh agents of node {t.node}: mark field {m}, cgroup level {lvl}"',
        "  counter spoofed { }",
        "  counter refused { }",
        f"  set agent_pool4 {{ type ipv4_addr; flags interval; elements = {{ {_ranges(t.block4, t.node4)} }}; }}",
        f"  set agent_pool6 {{ type ipv6_addr; flags interval; elements = {{ {_ranges(t.block6, t.node6)} }}; }}",
        f"  set mesh_ifaces {{ type ifname; elements = {{ {oif} }}; }}",
        f"  map agent_cgroups {{ typeof socket cgroupv2 level {lvl} : verdict; }}",
        "  map agent_flows { typeof ct mark : verdict; }",
        "  map agent_src4 { typeof meta mark : ip saddr; }",
        "  map agent_src6 { typeof meta mark : ip6 saddr; }",
        "  set agent_owner4 { typeof ip saddr . meta mark; }",
        "  set agent_owner6 { typeof ip6 saddr . meta mark; }",
        "  map agent_in4 { type ipv4_addr : verdict; }",
        "  map agent_in6 { type ipv6_addr : verdict; }",
        "  set mcp_ports4 { type ipv4_addr . inet_service; }",
        "  set mcp_ports6 { type ipv6_addr . inet_service; }",
        "  chain classify {",
        "    type route hook output priority mangle; policy accept;",
        f"    meta mark set meta mark & {keep}",
        f"    socket cgroupv2 level {lvl} vmap @agent_cgroups",
        f"    ct mark & {m} vmap @agent_flows",
        "  }",
        "  chain translate {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    oifname @mesh_ifaces snat ip to meta mark & {m} map @agent_src4",
        f"    oifname @mesh_ifaces snat ip6 to meta mark & {m} map @agent_src6",
        "  }",
        "  chain antispoof {",
        "    type filter hook postrouting priority srcnat + 10; policy accept;",
        "    oifname != @mesh_ifaces accept",
        f"    ip saddr . meta mark & {m} @agent_owner4 accept",
        f"    ip6 saddr . meta mark & {m} @agent_owner6 accept",
        "    ip saddr @agent_pool4 counter name spoofed drop",
        "    ip6 saddr @agent_pool6 counter name spoofed drop",
        "  }",
        "  chain watch {",
        "    type filter hook output priority mangle + 10; policy accept;",
        f"    meta mark & {m} != 0 accept",
        f"    ct state new ip daddr . tcp dport @mcp_ports4 {watch_log}",
        f"    ct state new ip6 daddr . tcp dport @mcp_ports6 {watch_log}",
        "  }",
        "  chain inbound {",
        "    type filter hook input priority filter; policy accept;",
        "    ct state established,related accept",
        "    ip daddr vmap @agent_in4",
        "    ip6 daddr vmap @agent_in6",
        "    ip daddr @agent_pool4 counter name refused drop",
        "    ip6 daddr @agent_pool6 counter name refused drop",
        "  }",
        "}",
    ]) + "\n"


def _cgroup_element(slot: AgentSlot) -> str:
    return f'"{slot.nft_cgroup}" comment "{slot.agent_id}" : goto {slot.chain}'


def render_add(t: AgentTable, slot: AgentSlot) -> str:
    """One agent in: its chain, then the elements pointing at it (one transaction)."""
    v, keep, tb = _hex(slot.mark), _hex(t.field.keep), f"inet {TABLE}"
    return "\n".join([
        f"add chain {tb} {slot.chain}",
        f"flush chain {tb} {slot.chain}",
        f"add rule {tb} {slot.chain} meta mark set meta mark & {keep} | {v}",
        f"add rule {tb} {slot.chain} ct mark set ct mark & {keep} | {v}",
        f"add chain {tb} {slot.inbound_chain}",
        f"flush chain {tb} {slot.inbound_chain}",
        (f'add rule {tb} {slot.inbound_chain} socket cgroupv2 level {t.level} "{slot.nft_cgroup}" '
         f"ct mark set ct mark & {keep} | {v} accept"),
        f"add rule {tb} {slot.inbound_chain} counter name refused drop",
        f"add element {tb} agent_cgroups {{ {_cgroup_element(slot)} }}",
        f'add element {tb} agent_flows {{ {v} comment "{slot.agent_id}" : goto {slot.chain} }}',
        f"add element {tb} agent_src4 {{ {v} : {slot.ipv4} }}",
        f"add element {tb} agent_src6 {{ {v} : {slot.ipv6} }}",
        f"add element {tb} agent_owner4 {{ {slot.ipv4} . {v} }}",
        f"add element {tb} agent_owner6 {{ {slot.ipv6} . {v} }}",
        f'add element {tb} agent_in4 {{ {slot.ipv4} comment "{slot.agent_id}" : goto {slot.inbound_chain} }}',
        f'add element {tb} agent_in6 {{ {slot.ipv6} comment "{slot.agent_id}" : goto {slot.inbound_chain} }}',
    ]) + "\n"


def render_remove(t: AgentTable, slot: AgentSlot, *, cgroup_gone: bool = False,
                  others: Iterable[AgentSlot] = ()) -> str:
    """One agent out: its elements, then its chain (one transaction).

    nft names a cgroup element by its path, resolved when the command is
    loaded. If the directory is already gone (removed behind our back), the
    element cannot be named: the cgroup map is then flushed and ``others``
    put back in the same transaction, which no packet can observe half-done.
    """
    v, tb = _hex(slot.mark), f"inet {TABLE}"
    if cgroup_gone:
        lines = [f"flush map {tb} agent_cgroups"]
        rest = [_cgroup_element(o) for o in sorted(others, key=lambda o: o.number) if o.agent_id != slot.agent_id]
        if rest:
            lines.append(f"add element {tb} agent_cgroups {{ {', '.join(rest)} }}")
    else:
        lines = [f'delete element {tb} agent_cgroups {{ "{slot.nft_cgroup}" }}']
    return "\n".join([
        *lines,
        f"delete element {tb} agent_flows {{ {v} }}",
        f"delete element {tb} agent_src4 {{ {v} }}",
        f"delete element {tb} agent_src6 {{ {v} }}",
        f"delete element {tb} agent_owner4 {{ {slot.ipv4} . {v} }}",
        f"delete element {tb} agent_owner6 {{ {slot.ipv6} . {v} }}",
        f"delete element {tb} agent_in4 {{ {slot.ipv4} }}",
        f"delete element {tb} agent_in6 {{ {slot.ipv6} }}",
        f"delete chain {tb} {slot.chain}",
        f"delete chain {tb} {slot.inbound_chain}",
    ]) + "\n"
