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
    chain inbound: input, type filter                (agents as servers)
      ct state established,related accept
      daddr vmap @agent_in4/6                        -> goto agent_<n>_in
      daddr in @agent_pool4/6 -> counter refused, drop   a block address no agent holds
      agent_<n>_in: socket cgroupv2 level L "<its cgroup>" -> ct mark field := n, accept; else refused, drop
    chain watch: output, type filter, priority mangle + 10   (shadow MCP)
      mark field set (an agent) -> accept
      new TCP to daddr . dport in @mcp_ports4/6 -> log (NFLOG, with the socket's uid)

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
:func:`render_add`, :func:`render_remove` in :mod:`meshd.agents.table`); :class:`AgentNet` is the shell
that runs it through in-process libnftables (no fork/exec per change) and
drives the cgroups.

An agent may listen on its own address. The node's blocks are made local
once (a ``local`` route on lo per block, :func:`meshd.kernel.netconf.local_blocks`),
and the inbound chain gives a connection for an agent's address only to a
socket in that agent's cgroup: another process listening on the same port,
on the wildcard or on the very address, receives nothing, from the mesh or
from the node itself. The accept sets the flow's conntrack mark to the
agent's, because the SYN-ACK leaves from a request socket that has no
cgroup: without it the classify chain would not mark it and antispoof
would drop it. With it the agent's replies are marked like its own
connections, and its death flushes its inbound flows with the rest. Which
peers may connect is the policy's (``inet idmesh``).

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

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from types import TracebackType
from typing import Self

from meshcore.errors import Conflict, IdmeshError, InvalidInput, NotFound, Unavailable
from meshcore.identity import NODE_NAME
from meshcore.names import check_ifname
from meshd.agents.cgroups import AgentCgroups, CgroupTree, check_agent_name, check_cgroup_parent
from meshd.agents.table import (
    DEFAULT_MARK_MASK,
    TABLE,
    AgentSlot,
    AgentTable,
    MarkField,
    render_add,
    render_remove,
    render_table,
)
from meshd.kernel.conntrack import ConntrackFlusher
from meshd.kernel.netconf import local_blocks
from meshd.kernel.nft import Nft, NftTable

__all__ = ["AgentNet"]

log = logging.getLogger("meshd.agents.net")


def _cgroup_name(number: int) -> str:
    """An agent's cgroup is named after its number (cgroup2 cannot rename, and the number is known
    before the certificate names the agent): ``agent-2`` holds 100.64.0.2, mark ``0x00200000``."""
    return f"agent-{number}"


class AgentNet:
    """The agents of one node in this network namespace: their cgroups, marks, translation, anti-spoofing.

    ``pool4``/``pool6`` are the node's blocks (``100.64.0.0/26``,
    ``fd00:1::/64``); the node's own addresses are their first hosts, every
    other address is policed as an agent address. Not usable before
    :meth:`start`; :meth:`close` leaves no table, cgroup or process. Methods
    may be called from several threads (they serialise).

    The cgroup hierarchy is the machine's, shared by every network namespace:
    the node's directory (``cgroup_parent``, a path below the hierarchy's root, by default ``idmesh-<node>``) must
    be unique on the machine, because :meth:`start` takes over (kills) what it
    finds there. ``nft``, ``cgroups`` and ``conntrack`` replace the real
    libnftables, cgroupfs and ctnetlink (tests).
    """

    def __init__(self, node: str, ifname: str, pool4: str, pool6: str, cgroup_root: Path = Path("/sys/fs/cgroup"),
                 *, mark_mask: int = DEFAULT_MARK_MASK, nft: Nft | None = None, cgroups: AgentCgroups | None = None,
                 conntrack: Callable[[int, int], None] | None = None, cgroup_parent: str | None = None,
                 local_routes: Callable[[tuple[str, ...], bool], None] = local_blocks) -> None:
        if not NODE_NAME.match(node):
            raise InvalidInput(f"node name {node!r} is not a DNS label (a-z 0-9 -)")
        check_ifname(ifname)
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
        parent = check_cgroup_parent(cgroup_parent) if cgroup_parent else f"idmesh-{node}"
        self._cgroups: AgentCgroups = cgroups or CgroupTree(cgroup_root, parent)
        self._nft = NftTable(TABLE, nft)
        self._local_routes = local_routes
        self._conntrack = conntrack
        self._own_conntrack: ConntrackFlusher | None = None
        self._slots: dict[str, AgentSlot] = {}
        self._by_leaf: dict[str, str] = {}  # cgroup name -> agent id
        self._nft_prefix = ""
        self._tree = ""
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

    def start(self) -> None:
        """Mount/locate cgroup2, take over what a crashed run left (killed, removed), install the table."""
        with self._lock:
            if self._started:
                return
            try:
                if self._conntrack is None:
                    try:
                        self._own_conntrack = self._conntrack = ConntrackFlusher()
                    except OSError as exc:
                        raise Unavailable(f"cannot open ctnetlink for the agents of node {self.node}: "
                                          f"{exc.strerror}") from exc
                where = self._cgroups.prepare()
                self._nft_prefix = where.nft_prefix
                self._tree = where.tree
                t = self.table
                self.table = AgentTable(t.node, t.ifname, t.block4, t.block6, t.field, where.agent_level)
                self._nft.run(render_table(self.table), f"the agent table of node {self.node}")
                self._local_routes(self._blocks, True)
            except BaseException:
                self._close_locked(quiet=True)
                raise
            self._started = True
            log.info("agents of node %s: table inet %s on %s, cgroups in %s (level %d), mark field %#010x",
                     self.node, TABLE, self.ifname, where.directory, where.agent_level, t.field.mask)

    @property
    def _blocks(self) -> tuple[str, ...]:
        return str(self.table.block4), str(self.table.block6)

    def _require_started(self) -> None:
        if not self._started:
            raise Unavailable(f"agent networking of node {self.node} is not started")

    def _slot(self, agent_id: str) -> AgentSlot:
        self._require_started()
        slot = self._slots.get(agent_id)
        if slot is None:
            raise NotFound(f"agent {agent_id} does not run on node {self.node}")
        return slot

    def _agent_v4(self, ipv4: str, who: str) -> IPv4Address:
        """``ipv4`` as an agent address of the node's block (not its network, broadcast or the node's own)."""
        t = self.table
        try:
            v4 = IPv4Address(ipv4)
        except ValueError as exc:
            raise InvalidInput(f"{who}: {exc}") from exc
        if v4 not in t.block4 or v4 in (t.block4.network_address, t.node4, t.block4.broadcast_address):
            raise InvalidInput(f"{who}: {v4} is not an agent address of block {t.block4} (node {t.node4})")
        return v4

    def _number(self, v4: IPv4Address) -> int:
        return int(v4) - int(self.table.block4.network_address)

    def _addresses(self, agent_id: str, ipv4: str, ipv6: str) -> tuple[IPv4Address, IPv6Address]:
        t = self.table
        v4 = self._agent_v4(ipv4, f"agent {agent_id}")
        try:
            v6 = IPv6Address(ipv6)
        except ValueError as exc:
            raise InvalidInput(f"agent {agent_id}: {exc}") from exc
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
            self._nft.run(f"flush set {tb} mesh_ifaces\nadd element {tb} mesh_ifaces {{ {elements} }}\n",
                      f"the mesh interfaces of node {self.node}")

    def set_mcp_ports(self, v4: Iterable[tuple[str, int]], v6: Iterable[tuple[str, int]]) -> None:
        """The peers' MCP ports (``meshctl serve --mcp``): a new connection to one from a process that is no
        agent is logged (shadow MCP, :mod:`meshd.mesh.flowlog`). Replaces the sets in one transaction."""
        tb = f"inet {TABLE}"
        lines = [f"flush set {tb} mcp_ports4", f"flush set {tb} mcp_ports6"]
        for name, pairs in (("mcp_ports4", sorted(set(v4))), ("mcp_ports6", sorted(set(v6)))):
            if pairs:
                lines.append(f"add element {tb} {name} {{ {', '.join(f'{a} . {p}' for a, p in pairs)} }}")
        with self._lock:
            self._require_started()
            self._nft.run("\n".join(lines) + "\n", "the peers' MCP ports")

    def stage(self, ipv4: str, pid: int) -> None:
        """Before an agent has its certificate: the cgroup of the agent that will have ``ipv4``, ``pid`` moved in.

        Moving a process between cgroups waits for an RCU grace period on a
        cgroup2 mount without ``favordynmods`` (~8 ms here, against 0.2 ms
        with it), so a birth does it while the controller signs, not after.
        Nothing marks or translates the cgroup's packets until :meth:`add`
        names it (the caller sends nothing meanwhile: it waits for meshd's
        answer); :meth:`unstage` undoes it if the birth fails.
        """
        self._require_started()
        leaf = self._leaf(ipv4)
        self._check_pid(pid, leaf)
        self._cgroups.create(leaf)
        try:
            self._cgroups.move(leaf, pid)
        except BaseException:
            self._cgroups.remove(leaf)
            raise

    def unstage(self, ipv4: str, pid: int, home: str) -> None:
        """A birth failed after :meth:`stage`: ``pid`` back in cgroup ``home``, the staged cgroup gone."""
        leaf = self._leaf(ipv4)
        try:
            self._cgroups.move_home(pid, home)
        except NotFound:
            pass  # it exited meanwhile
        self._cgroups.remove(leaf)  # anything still in it (a child it forked) dies with it

    def _leaf(self, ipv4: str) -> str:
        return _cgroup_name(self._number(self._agent_v4(ipv4, "agent address")))

    def add(self, agent_id: str, ipv4: str, ipv6: str, done: Callable[[str], None] = lambda step: None,
            staged: bool = False) -> AgentSlot:
        """Create the agent's cgroup and its entries: its processes' mesh traffic leaves from ``ipv4``/``ipv6``.

        ``staged``: the cgroup was made by :meth:`stage` (and holds the
        caller). ``done`` is told when the ``cgroup`` and the ``nft`` step end
        (a birth's timings).
        """
        with self._lock:
            self._require_started()
            check_agent_name(agent_id)
            if agent_id in self._slots:
                raise Conflict(f"agent {agent_id} already runs on node {self.node}")
            v4, v6 = self._addresses(agent_id, ipv4, ipv6)
            number = self._number(v4)
            leaf = _cgroup_name(number)
            path = self._cgroups.path(leaf) if staged else self._cgroups.create(leaf)
            done("cgroup")
            slot = AgentSlot(agent_id, path, self.table.field.value(number), number, str(v4), str(v6),
                             f"{self._nft_prefix}/{leaf}")
            try:
                self._nft.run(render_add(self.table, slot), f"adding agent {agent_id} ({v4}, {v6})")
            except BaseException:
                try:  # a staged cgroup holds the caller: unstage() gives it back
                    if not staged:
                        self._cgroups.remove(leaf)
                except IdmeshError as exc:
                    log.warning("agent %s: cgroup not cleaned up after the failed add: %s", agent_id, exc)
                raise
            done("nft")
            self._slots[agent_id] = slot
            self._by_leaf[leaf] = agent_id
            log.info("agent %s on node %s: %s, %s, mark %#010x, cgroup %s", agent_id, self.node, v4, v6,
                     slot.mark, path)
            return slot

    def move(self, pid: int, agent_id: str) -> None:
        """Put process ``pid`` (all its threads) into the agent's cgroup.

        Sockets belong to the cgroup their creator was in when it made them:
        move a process before it opens connections (or spawn it with
        :meth:`AgentSlot.command`).
        """
        self._check_pid(pid, agent_id)
        with self._lock:
            self._cgroups.move(self._slot(agent_id).cgroup.name, pid)

    @staticmethod
    def _check_pid(pid: int, agent_id: str) -> None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:  # "0" would move meshd itself
            raise InvalidInput(f"cannot move pid {pid!r} into agent {agent_id}: not a process id")

    def agent_of_cgroup(self, path: str) -> str | None:
        """The agent whose cgroup is exactly ``path`` (as ``/proc/<pid>/cgroup`` says it), or None.

        The whole path is compared, not its last component: a cgroup of the
        same name elsewhere in the hierarchy is nobody's agent.
        """
        with self._lock:
            if not self._started or not self._tree:
                return None
            inside, sep, leaf = path.rstrip("/").partition(self._tree + "/")
            return self._by_leaf.get(leaf) if sep and not inside and "/" not in leaf else None

    def populated(self, agent_id: str) -> bool:
        """Whether any process is left in the agent's cgroup (``cgroup.events``; poll it or watch it with inotify)."""
        with self._lock:
            return self._cgroups.populated(self._slot(agent_id).cgroup.name)

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
            leaf = slot.cgroup.name
            problems: list[IdmeshError] = []
            try:
                self._cgroups.kill(leaf)
            except IdmeshError as exc:  # its identity goes anyway; say so at the end
                problems.append(exc)
            self._forget(slot)
            gone = not self._cgroups.exists(leaf)
            self._nft.run(render_remove(self.table, slot, cgroup_gone=gone, others=self._slots.values()),
                      f"removing agent {agent_id}")
            del self._slots[agent_id]
            self._by_leaf.pop(leaf, None)
            self._forget(slot)
            try:
                self._cgroups.remove(leaf)
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
            return self._nft.counter("spoofed")

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
            self._nft.delete()

        # the order of remove(), for every agent at once; the blocks stop being local once nothing filters them
        steps = [lambda: self._cgroups.kill(None), forget_all, delete_table, lambda: self._local_routes(
            self._blocks, False), forget_all, self._cgroups.close]
        for step in steps:
            try:
                step()
            except IdmeshError as exc:
                problems.append(exc)
        self._slots.clear()
        self._by_leaf.clear()
        self._started = False
        self._nft.close()
        if self._own_conntrack is not None:
            self._own_conntrack.close()
            self._own_conntrack = self._conntrack = None
        if problems and not quiet:
            raise problems[0]
