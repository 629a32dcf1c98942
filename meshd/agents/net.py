"""Agents' own source addresses on the sending node: cgroup -> mark -> SNAT, and anti-spoofing.

An agent is a set of processes in its own cgroup (:mod:`meshd.agents.cgroups`).
Whatever they send into the mesh leaves with the agent's overlay addresses,
without their code changing, and nothing else on the node can send with
those addresses. Everything lives in one nftables table of its own,
``inet idmesh_agents`` (``inet idmesh`` belongs to :mod:`meshd.mesh.firewall`,
which replaces it whole on every policy change and never touches this one).
Every packet an agent sends is marked, whatever interface routing chose
first, so that policy routing can steer it by identity (:mod:`meshd.routes.routing`:
the new mark re-routes it); only packets leaving through a *mesh interface*
(the overlay interface, and the tunnels to gateways, set ``mesh_ifaces``)
are translated and policed::

    chain classify: output, type route, priority mangle  (a new mark re-routes the packet)
      1. clear the agent field of the mark          a forged SO_MARK cannot pose as an agent
      2. socket cgroupv2 level L vmap @agent_cgroups  -> goto agent_<n>   the sending socket's cgroup
      3. ct mark & FIELD vmap @agent_flows            -> goto agent_<n>   packets the kernel sends for an
                                                       agent's connection without its socket (RST, TIME_WAIT ACK)
      agent_<n>: mark field := n, ct mark field := n (other bits of both kept)
    chain translate: postrouting, type nat, priority srcnat
      snat ip/ip6 to (meta mark & FIELD) map @agent_src4 / @agent_src6
    chain antispoof: postrouting, type filter, priority srcnat + 10 (after the translation)
      saddr . (meta mark & FIELD) in @agent_owner4/6 -> accept
      saddr in @agent_pool4/6 -> counter spoofed, drop

SNAT cannot happen in the output hook (the kernel refuses it) and the socket
expression cannot be used in postrouting, hence the mark in between. A
legitimate agent packet only gets its pool address from the SNAT, so the
anti-spoofing check runs after it: a packet leaving with a pool source must
carry the mark of the agent owning that address. Packets not from an agent
find no map entry: no mark, no translation (they leave as the node).

The mark field (:class:`MarkField`) is a contiguous run of bits, by default
``0xfff00000``: the agent number is the offset of its IPv4 address in the
node's block (100.64.0.2 in 100.64.0.0/26 is agent 2, mark ``0x00200000``).
Bits outside the field are preserved in the packet mark and in the conntrack
mark, so other software's routing marks keep working.

An agent's birth or death is one atomic nftables transaction that adds or
deletes its chain and its map and set elements; other agents' entries and
flows are not touched. On death its conntrack entries (found by the mark
field of the conntrack mark) are deleted too, so a flow of the dead agent
cannot be revived by a later agent given the same address. Rendering is pure (:func:`render_table`,
:func:`render_add`, :func:`render_remove`); :class:`AgentNet` is the shell
that runs it through in-process libnftables (no fork/exec per change) and
drives the cgroups.

What the anti-spoofing does not cover:

* root: it can write its pid into an agent's cgroup, or delete this table.
  The check stops root's raw and IP_TRANSPARENT sockets (and forged
  SO_MARKs) — defence in depth against mistakes, not against a hostile root;
  agents should run unprivileged (an unprivileged process cannot send from a
  non-local address at all);
* packets forged to match the untranslated 5-tuple of a live agent flow
  (root only) inherit the flow's conntrack mark and leave as that agent;
* a socket made before its process entered the cgroup is not the agent's
  (it leaves as the node), and one the agent hands to another process
  (SCM_RIGHTS) stays the agent's until the agent is removed;
* only traffic through the mesh interfaces is translated and policed;
  the receiving side (an address accepted only from the tunnel of the node
  owning its block) is WireGuard's allowed-IPs, not this module.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from types import TracebackType
from typing import Self

from meshcore.errors import Conflict, IdmeshError, InvalidInput, NotFound, Unavailable
from meshcore.identity import NODE_NAME
from meshd.agents.cgroups import AgentCgroups, CgroupTree, check_agent_name
from meshd.kernel.nft import Libnftables

__all__ = [
    "DEFAULT_MARK_MASK",
    "TABLE",
    "AgentNet",
    "AgentSlot",
    "AgentTable",
    "ConntrackFlusher",
    "Libnftables",
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

log = logging.getLogger("meshd.agents.net")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")


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

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped so that it enters the agent's cgroup before it runs (no window outside it).

        For a supervisor that spawns the agent: the wrapper (``/bin/sh``) writes
        its own pid to ``cgroup.procs`` and then ``exec``\\ s ``argv`` in place.
        """
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroup / "cgroup.procs"), *argv]


# -- rendering (pure) -------------------------------------------------------------------------------------------
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
    return "\n".join([
        f"add table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f'  comment "idmesh agents of node {t.node}: mark field {m}, cgroup level {lvl}"',
        "  counter spoofed { }",
        f"  set agent_pool4 {{ type ipv4_addr; flags interval; elements = {{ {_ranges(t.block4, t.node4)} }}; }}",
        f"  set agent_pool6 {{ type ipv6_addr; flags interval; elements = {{ {_ranges(t.block6, t.node6)} }}; }}",
        f"  set mesh_ifaces {{ type ifname; elements = {{ {oif} }}; }}",
        f"  map agent_cgroups {{ typeof socket cgroupv2 level {lvl} : verdict; }}",
        "  map agent_flows { typeof ct mark : verdict; }",
        "  map agent_src4 { typeof meta mark : ip saddr; }",
        "  map agent_src6 { typeof meta mark : ip6 saddr; }",
        "  set agent_owner4 { typeof ip saddr . meta mark; }",
        "  set agent_owner6 { typeof ip6 saddr . meta mark; }",
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
        f"add element {tb} agent_cgroups {{ {_cgroup_element(slot)} }}",
        f'add element {tb} agent_flows {{ {v} comment "{slot.agent_id}" : goto {slot.chain} }}',
        f"add element {tb} agent_src4 {{ {v} : {slot.ipv4} }}",
        f"add element {tb} agent_src6 {{ {v} : {slot.ipv6} }}",
        f"add element {tb} agent_owner4 {{ {slot.ipv4} . {v} }}",
        f"add element {tb} agent_owner6 {{ {slot.ipv6} . {v} }}",
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
        f"delete chain {tb} {slot.chain}",
    ]) + "\n"


def _delete_table() -> str:
    return f"add table inet {TABLE}\ndelete table inet {TABLE}\n"


# -- the shell --------------------------------------------------------------------------------------------------
_NETLINK_NETFILTER = 12
_CT_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
_CTA_MARK, _CTA_MARK_MASK = 8, 21
_NLM_F_REQUEST, _NLM_F_ACK, _NLMSG_ERROR = 1, 4, 2


class ConntrackFlusher:
    """Deletes conntrack entries by mark through one ctnetlink socket kept open (closing one costs ~10 ms).

    ``flusher(mark, mask)`` deletes every entry, IPv4 and IPv6, whose
    ``ct mark & mask == mark``: a ctnetlink DELETE without a tuple is a flush,
    filtered by mark in the kernel (what ``conntrack -D --mark mark/mask`` sends).
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self._sock.settimeout(5)
        self._seq = 0

    def __call__(self, mark: int, mask: int) -> None:
        self._seq += 1
        attrs = (struct.pack("=HH", 8, _CTA_MARK) + struct.pack("!I", mark)
                 + struct.pack("=HH", 8, _CTA_MARK_MASK) + struct.pack("!I", mask))
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0) + attrs  # nfgenmsg: family, version, res_id
        header = struct.pack("=IHHII", 16 + len(body), _CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK, self._seq, 0)
        self._sock.send(header + body)
        while True:
            reply = self._sock.recv(65536)
            _, kind, _, seq = struct.unpack_from("=IHHI", reply)
            if kind == _NLMSG_ERROR and seq == self._seq:
                break
        (error,) = struct.unpack_from("=i", reply, 16)
        if error < 0 and -error != errno.ENOENT:
            raise OSError(-error, f"conntrack flush by mark {mark:#010x}: {os.strerror(-error)}")

    def close(self) -> None:
        self._sock.close()


Nft = Callable[[str], str]


class AgentNet:
    """The agents of one node in this network namespace: their cgroups, marks, translation, anti-spoofing.

    ``pool4``/``pool6`` are the node's blocks (``100.64.0.0/26``,
    ``fd00:1::/64``); the node's own addresses are their first hosts, every
    other address is policed as an agent address. Not usable before
    :meth:`start`; :meth:`close` leaves no table, cgroup or process. Methods
    may be called from several threads (they serialise).

    The cgroup hierarchy is the machine's, shared by every network namespace:
    the node's directory (``cgroup_parent``, by default ``idmesh-<node>``) must
    be unique on the machine, because :meth:`start` takes over (kills) what it
    finds there. ``nft``, ``cgroups`` and ``conntrack`` replace the real
    libnftables, cgroupfs and ctnetlink (tests).
    """

    def __init__(self, node: str, ifname: str, pool4: str, pool6: str, cgroup_root: Path = Path("/sys/fs/cgroup"),
                 *, mark_mask: int = DEFAULT_MARK_MASK, nft: Nft | None = None, cgroups: AgentCgroups | None = None,
                 conntrack: Callable[[int, int], None] | None = None, cgroup_parent: str | None = None) -> None:
        if not NODE_NAME.match(node):
            raise InvalidInput(f"node name {node!r} is not a DNS label (a-z 0-9 -)")
        if not _IFNAME.match(ifname):
            raise InvalidInput(f"interface name {ifname!r} is not 1-15 of A-Z a-z 0-9 _ . -")
        try:
            block4, block6 = IPv4Network(pool4), IPv6Network(pool6)
        except ValueError as exc:
            raise InvalidInput(f"agent pools {pool4!r}, {pool6!r}: {exc}") from exc
        field = MarkField(mark_mask)
        if block4.num_addresses < 4:
            raise InvalidInput(f"block {block4} of node {node} has no room for agents")
        if block4.num_addresses - 2 > field.capacity:
            raise InvalidInput(f"block {block4} of node {node} holds {block4.num_addresses - 3} agents; "
                               f"mark mask {mark_mask:#010x} numbers only {field.capacity}: use a wider mask")
        self.node, self.ifname = node, ifname
        self.table = AgentTable(node, ifname, block4, block6, field)
        parent = check_agent_name(cgroup_parent) if cgroup_parent else f"idmesh-{node}"
        self._cgroups: AgentCgroups = cgroups or CgroupTree(cgroup_root, parent)
        self._nft: Nft | None = nft
        self._own_nft: Libnftables | None = None
        self._conntrack = conntrack
        self._own_conntrack: ConntrackFlusher | None = None
        self._slots: dict[str, AgentSlot] = {}
        self._nft_prefix = ""
        self._started = False
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def slots(self) -> Mapping[str, AgentSlot]:
        with self._lock:
            return dict(self._slots)

    def _run(self, script: str, what: str) -> str:
        assert self._nft is not None
        try:
            return self._nft(script)
        except IdmeshError as exc:
            raise type(exc)(f"nftables refused {what} (table inet {TABLE}): {exc}") from exc

    def start(self) -> None:
        """Mount/locate cgroup2, take over what a crashed run left (killed, removed), install the table."""
        with self._lock:
            if self._started:
                return
            try:
                if self._nft is None:
                    self._own_nft = Libnftables()
                    self._nft = self._own_nft
                if self._conntrack is None:
                    try:
                        self._own_conntrack = self._conntrack = ConntrackFlusher()
                    except OSError as exc:
                        raise Unavailable(f"cannot open ctnetlink for the agents of node {self.node}: "
                                          f"{exc.strerror}") from exc
                where = self._cgroups.prepare()
                self._nft_prefix = where.nft_prefix
                t = self.table
                self.table = AgentTable(t.node, t.ifname, t.block4, t.block6, t.field, where.agent_level)
                self._run(render_table(self.table), f"the agent table of node {self.node}")
            except BaseException:
                self._close_locked(quiet=True)
                raise
            self._started = True
            log.info("agents of node %s: table inet %s on %s, cgroups in %s (level %d), mark field %#010x",
                     self.node, TABLE, self.ifname, where.directory, where.agent_level, t.field.mask)

    def _require_started(self) -> None:
        if not self._started:
            raise Unavailable(f"agent networking of node {self.node} is not started")

    def _slot(self, agent_id: str) -> AgentSlot:
        self._require_started()
        slot = self._slots.get(agent_id)
        if slot is None:
            raise NotFound(f"agent {agent_id} does not run on node {self.node}")
        return slot

    def _addresses(self, agent_id: str, ipv4: str, ipv6: str) -> tuple[IPv4Address, IPv6Address]:
        t = self.table
        try:
            v4, v6 = IPv4Address(ipv4), IPv6Address(ipv6)
        except ValueError as exc:
            raise InvalidInput(f"agent {agent_id}: {exc}") from exc
        reserved4 = (t.block4.network_address, t.node4, t.block4.broadcast_address)
        if v4 not in t.block4 or v4 in reserved4:
            raise InvalidInput(f"agent {agent_id}: {v4} is not an agent address of block {t.block4} "
                               f"(node {t.node4})")
        if v6 not in t.block6 or v6 in (t.block6.network_address, t.node6):
            raise InvalidInput(f"agent {agent_id}: {v6} is not an agent address of block {t.block6} "
                               f"(node {t.node6})")
        for other in self._slots.values():
            if IPv4Address(other.ipv4) == v4 or IPv6Address(other.ipv6) == v6:
                raise Conflict(f"agent {agent_id}: address {v4 if other.ipv4 == str(v4) else v6} "
                               f"is agent {other.agent_id}'s")
        return v4, v6

    def set_route_interfaces(self, names: Iterable[str]) -> None:
        """The tunnels to gateways: agents' packets leaving through them are translated and policed too."""
        with self._lock:
            self._require_started()
            tb = f"inet {TABLE}"
            elements = ", ".join(f'"{n}"' for n in sorted({self.ifname, *names}))
            self._run(f"flush set {tb} mesh_ifaces\nadd element {tb} mesh_ifaces {{ {elements} }}\n",
                      f"the mesh interfaces of node {self.node}")

    def add(self, agent_id: str, ipv4: str, ipv6: str) -> AgentSlot:
        """Create the agent's cgroup and its entries: its processes' mesh traffic leaves from ``ipv4``/``ipv6``."""
        with self._lock:
            self._require_started()
            check_agent_name(agent_id)
            if agent_id in self._slots:
                raise Conflict(f"agent {agent_id} already runs on node {self.node}")
            v4, v6 = self._addresses(agent_id, ipv4, ipv6)
            number = int(v4) - int(self.table.block4.network_address)
            path = self._cgroups.create(agent_id)
            slot = AgentSlot(agent_id, path, self.table.field.value(number), number, str(v4), str(v6),
                             f"{self._nft_prefix}/{agent_id}")
            try:
                self._run(render_add(self.table, slot), f"adding agent {agent_id} ({v4}, {v6})")
            except BaseException:
                try:
                    self._cgroups.remove(agent_id)
                except IdmeshError as exc:
                    log.warning("agent %s: cgroup not removed after the failed add: %s", agent_id, exc)
                raise
            self._slots[agent_id] = slot
            log.info("agent %s on node %s: %s, %s, mark %#010x, cgroup %s", agent_id, self.node, v4, v6,
                     slot.mark, path)
            return slot

    def move(self, pid: int, agent_id: str) -> None:
        """Put process ``pid`` (all its threads) into the agent's cgroup.

        Sockets belong to the cgroup their creator was in when it made them:
        move a process before it opens connections (or spawn it with
        :meth:`AgentSlot.command`).
        """
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:  # "0" would move meshd itself
            raise InvalidInput(f"cannot move pid {pid!r} into agent {agent_id}: not a process id")
        with self._lock:
            self._slot(agent_id)
            self._cgroups.move(agent_id, pid)

    def populated(self, agent_id: str) -> bool:
        """Whether any process is left in the agent's cgroup (``cgroup.events``; poll it or watch it with inotify)."""
        with self._lock:
            self._slot(agent_id)
            return self._cgroups.populated(agent_id)

    def remove(self, agent_id: str) -> None:
        """Kill what is left of the agent, forget its connections, delete its entries and its cgroup.

        Order: the processes die first, while their mark still applies, so
        the FIN/RST their sockets send on exit leave with the agent's address.
        Its conntrack entries go next: what the kernel still sends for those
        flows (a TIME_WAIT ACK to the peer's late FIN) then finds no
        translation and leaves as the node, instead of being dropped as a
        spoof. Then its nftables entries go (from then on nothing can send
        as it), its conntrack entries once more (any made meanwhile), and
        the cgroup.
        """
        with self._lock:
            slot = self._slot(agent_id)
            problems: list[IdmeshError] = []
            try:
                self._cgroups.kill(agent_id)
            except IdmeshError as exc:  # its identity goes anyway; say so at the end
                problems.append(exc)
            self._forget(slot)
            gone = not self._cgroups.exists(agent_id)
            self._run(render_remove(self.table, slot, cgroup_gone=gone, others=self._slots.values()),
                      f"removing agent {agent_id}")
            del self._slots[agent_id]
            self._forget(slot)
            try:
                self._cgroups.remove(agent_id)
            except IdmeshError as exc:
                problems.append(exc)
            log.info("agent %s removed from node %s", agent_id, self.node)
            if problems:
                raise problems[0]

    def _forget(self, slot: AgentSlot) -> None:
        if self._conntrack is None:
            return
        try:
            self._conntrack(slot.mark, self.table.field.mask)
        except Exception as exc:  # noqa: BLE001 - stale flows cannot send anyway: their entries are gone
            log.warning("agent %s: its conntrack entries were not flushed: %s", slot.agent_id, exc)

    def spoofed(self) -> int:
        """Packets dropped so far because their source was an agent address they had no right to."""
        with self._lock:
            self._require_started()
            out = self._run(f"list counter inet {TABLE} spoofed\n", "reading the spoofed counter")
        found = re.search(r"packets (\d+)", out)
        return int(found.group(1)) if found else 0

    def close(self) -> None:
        """Kill every agent, remove the table and the node's cgroups; nothing of ours is left."""
        with self._lock:
            if self._started:
                self._close_locked(quiet=False)

    def _close_locked(self, *, quiet: bool) -> None:
        problems: list[IdmeshError] = []
        slots = list(self._slots.values())

        def forget_all() -> None:
            for slot in slots:
                self._forget(slot)

        def delete_table() -> None:
            if self._nft is not None:
                self._run(_delete_table(), f"deleting the agent table of node {self.node}")

        # the order of remove(), for every agent at once
        steps = [lambda: self._cgroups.kill(None), forget_all, delete_table, forget_all, self._cgroups.close]
        for step in steps:
            try:
                step()
            except IdmeshError as exc:
                problems.append(exc)
        self._slots.clear()
        self._started = False
        if self._own_nft is not None:
            self._own_nft.close()
            self._own_nft = self._nft = None
        if self._own_conntrack is not None:
            self._own_conntrack.close()
            self._own_conntrack = self._conntrack = None
        if problems and not quiet:
            raise problems[0]
