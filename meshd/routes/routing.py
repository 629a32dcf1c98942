"""Identity-based routes on one node: tunnels to gateways, the gateway interface, and failover.

The policy decides who goes where (:mod:`meshcore.policy.routes`); this
module makes the kernel do it. Why the tunnels: WireGuard picks a peer by
*destination*, so the mesh interface can give ``0.0.0.0/0`` to one peer
only — yet two agents on one node may need two different exits for the same
prefix. So routes travel over tunnels of their own:

* on a **sender**, one WireGuard interface per gateway it may use
  (``<mesh>r<N>``), whose single peer is that gateway with the advertised
  prefixes as allowed IPs. Each identity's packets are steered into the
  right one by the agent mark (:mod:`meshd.agents.net`), ip rules and one
  routing table per distinct set of routes (:mod:`meshd.routes.plan`);
* on a **gateway**, one gateway interface (``<mesh>gw``) with every node's
  route key as a peer, each allowed its node's blocks — like the mesh
  interface, which also knows every node: a sender's tunnel must find its
  peer there the moment an agent is born, not after the gateway has heard
  of the agent (a handshake that finds no peer is retried only after 5 s).
  It forwards only (source, prefix) pairs the policy grants and NATs them to
  its outside address (:mod:`meshd.routes.firewall`); replies are routed back into
  it by mark.

Both ends of a route tunnel use one extra key per node, the *route key*,
made on the node and registered with the controller (``RouteOffer``); the
node's mesh key is never reused on a second interface.

**Failover.** Both sides send a keepalive every second. A gateway from which
nothing arrived for :data:`STALE_AFTER` seconds is down: every identity
whose route lists a backup moves to the first gateway that is up, and back
when the preferred one answers again. While a gateway is down its peer is
re-created every :data:`RETRY_EVERY` seconds, which makes WireGuard start a
fresh handshake (a restarted gateway has forgotten the old session and
would otherwise ignore our keepalives for up to three minutes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from meshcore.errors import IdmeshError
from meshcore.policy import Gateway, Identities, NodeRoutes, Policy, RouteChoice, compile_node_routes
from meshcore.wire.stream import PeerNode, RouteOffer
from meshd.kernel.netconf import IPRouteNetConf, LinkConfig, NetConf
from meshd.routes.firewall import RouteFirewall, RouteFirewallConfig
from meshd.routes.plan import BYPASS_MARK, RoutingPlan, SenderRoutes, plan_routing
from meshd.routes.tables import IPRoutePolicyRouting, PolicyRouting
from meshd.wg import DeviceConfig, PeerConfig, WireGuardDevice, open_device
from meshd.wg.model import parse_endpoint

__all__ = ["KEEPALIVE", "RETRY_EVERY", "STALE_AFTER", "Routing", "advertised", "controller_bypass", "side_ifname",
           "watch_gateways"]

log = logging.getLogger("meshd.routes.routing")

KEEPALIVE = 1
"""Seconds between keepalives on route tunnels, both ways: the heartbeat failover listens to."""
STALE_AFTER = 3.0
"""Seconds without a packet from a gateway before its identities move to the next one."""
RETRY_EVERY = 2.0
"""While a gateway is down, its peer is re-created this often to force a fresh handshake."""
LINGER = 120.0
"""A tunnel no identity uses any more is kept this long: agents come and go by the minute, and the
next one should find a tunnel with a fresh handshake (and a known health) waiting."""


def side_ifname(base: str, suffix: str) -> str:
    """An interface name derived from the mesh interface's (unique on the machine), at most 15 bytes."""
    return base[: 15 - len(suffix)] + suffix


def advertised(routes: Iterable[str], exit_node: bool) -> tuple[str, ...]:
    """What ``--advertise-routes`` / ``--advertise-exit-node`` offer, canonical (an exit offers both families)."""
    out = {str(ipaddress.ip_network(r.strip(), strict=True)) for r in routes if r.strip()}
    if exit_node:
        out |= {"0.0.0.0/0", "::/0"}
    return tuple(sorted(out, key=lambda t: (ipaddress.ip_network(t).version, t)))


def controller_bypass(url: str) -> tuple[str, ...]:
    """The controller's addresses as prefixes: an exit route of this node itself must not carry its control
    traffic (that would cut the node off from revocations when the exit goes down)."""
    host = urlsplit(url).hostname or ""
    try:
        return (str(ipaddress.ip_network(host)),)
    except ValueError:
        pass
    try:
        return tuple(sorted({str(ipaddress.ip_network(str(info[4][0]).split("%")[0]))
                             for info in socket.getaddrinfo(host, None)}))
    except OSError:
        log.warning("cannot resolve the controller %s: an exit route of this node itself would carry "
                    "its control traffic too", host)
        return ()


async def watch_gateways(routing: Routing, every: float = 0.5) -> None:
    """Failover: this often, has a gateway gone quiet (or come back)?"""
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(routing.poll)
        except IdmeshError as exc:
            log.error("gateway failover: %s", exc)


def write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", name.replace(".", "/")).write_text(value)


@dataclass
class _Tunnel:
    """This node's tunnel to one gateway, and what failover knows about it."""

    gateway: str
    ifname: str
    device: WireGuardDevice
    created: float
    config: DeviceConfig | None = None
    rx: int = 0
    heard: float = 0.0  # when rx last grew
    retried: float = 0.0
    unused_since: float | None = None
    was_up: bool = True  # as last routed by (a new tunnel is given STALE_AFTER seconds to be heard)

    def up(self, now: float) -> bool:
        return now - max(self.heard, self.created) < STALE_AFTER


@dataclass
class _Inputs:
    routes: NodeRoutes = field(default_factory=NodeRoutes)
    marks: Mapping[str, int] = field(default_factory=dict)


class Routing:
    """Routes for one node. ``apply`` follows the policy and identities; ``poll`` follows gateway health.

    Both run in worker threads (the drivers block) and serialise on a lock.
    ``agent_marks`` gives each local agent's mark (by agent id);
    ``set_route_interfaces`` tells the agent data plane which interfaces
    agents' packets may leave through (translated to the agent's address).
    """

    def __init__(self, node: str, mesh_ifname: str, addresses: tuple[str, str], route_key: str,
                 offer: RouteOffer, overlay: tuple[str, str], *, mark_mask: int,
                 agent_marks: Callable[[], Mapping[str, int]],
                 set_route_interfaces: Callable[[Iterable[str]], None],
                 bypass: tuple[str, ...] = (), wireguard: str = "auto",
                 mesh_endpoints: Callable[[], Mapping[str, str]] = dict,
                 tables: PolicyRouting | None = None, firewall: RouteFirewall | None = None,
                 netconf: NetConf | None = None, sysctl: Callable[[str, str], None] = write_sysctl,
                 opener: Callable[..., WireGuardDevice] = open_device,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node, self.mesh_ifname, self.addresses = node, mesh_ifname, addresses
        self.route_key, self.offer, self.overlay, self.bypass = route_key, offer, overlay, bypass
        self.mark_mask = mark_mask
        self.gateway_ifname = side_ifname(mesh_ifname, "gw") if offer.routes else None
        self._agent_marks, self._set_route_ifaces = agent_marks, set_route_interfaces
        self._mesh_endpoints = mesh_endpoints
        self._wireguard, self._opener, self._clock, self._sysctl = wireguard, opener, clock, sysctl
        self._tables = tables
        self._firewall = firewall
        self._netconf = netconf
        self._gateway_device: WireGuardDevice | None = None
        self._gateway_peers: dict[str, tuple[str, tuple[str, ...]]] | None = None  # name -> (route key, blocks)
        self._tunnels: dict[str, _Tunnel] = {}
        self._inputs = _Inputs()
        self._route_ifaces: frozenset[str] | None = None
        self._installed = False  # has this node ever told the kernel about routes?
        self._plan: RoutingPlan | None = None  # what the kernel was last told (None: tell it again)
        self._restarted: set[str] = set()  # interfaces whose wireguard-go was restarted (see _open)
        self._lock = threading.Lock()

    # -- the drivers, made on first use (a node without routes touches nothing) ---------------------------------
    def _kernel(self) -> tuple[PolicyRouting, RouteFirewall, NetConf]:
        if self._tables is None:
            self._tables = IPRoutePolicyRouting()
        if self._firewall is None:
            self._firewall = RouteFirewall()
        if self._netconf is None:
            self._netconf = IPRouteNetConf()
        return self._tables, self._firewall, self._netconf

    def _open(self, ifname: str) -> WireGuardDevice:
        # wireguard-go re-creates its interface when it restarts: the kernel then forgets the link state and
        # every route through it. The callback only notes it (it runs in the device's supervisor thread);
        # poll() puts link and routes back within half a second.
        device = self._opener(ifname, implementation=self._wireguard, on_restart=lambda: self._restarted.add(ifname))
        self._link_up(ifname)
        return device

    def _link_up(self, ifname: str) -> None:
        _, _, netconf = self._kernel()
        netconf.apply(LinkConfig(ifname))
        # Replies from the far side of a gateway come from addresses this node has no route to
        # back through the tunnel; strict reverse-path filtering would drop them.
        try:
            self._sysctl(f"net.ipv4.conf.{ifname}.rp_filter", "0")
        except OSError as exc:
            log.warning("%s: cannot turn off reverse-path filtering: %s", ifname, exc)

    # -- policy and identities ---------------------------------------------------------------------------------
    def apply(self, policy: Policy, identities: Identities, nodes: Mapping[str, PeerNode]) -> NodeRoutes:
        """Converge tunnels, gateway interface, tables and firewall to the policy; returns what was compiled."""
        if not policy.routes and self.gateway_ifname is None and not self._installed:
            return NodeRoutes()  # every netmap change passes here: a node without routes pays nothing per node
        gateways = {name: Gateway(name, frozenset(p.tags), p.routing.routes) for name, p in nodes.items()
                    if name != self.node and p.routing.routes and p.routing.route_key and p.routing.gateway_port}
        me = identities.nodes.get(self.node)
        if self.offer.routes and me is not None:  # to know whom this node forwards for
            gateways[self.node] = Gateway(self.node, me.tags, self.offer.routes)
        routes = compile_node_routes(policy, identities, self.node, gateways)
        with self._lock:
            if not routes.senders and not self._tunnels and self.gateway_ifname is None and not self._installed:
                return routes  # nothing to do here, now or before
            if self.gateway_ifname is not None:
                self._gateway(nodes)
            self._sync_tunnels(routes, nodes)
            self._inputs = _Inputs(routes, dict(self._agent_marks()))
            self._install()
        return routes

    def _gateway(self, nodes: Mapping[str, PeerNode]) -> None:
        assert self.gateway_ifname is not None and self.offer.gateway_port is not None
        if self._gateway_device is None:
            self._gateway_device = self._open(self.gateway_ifname)
            for name, value in (("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")):
                self._sysctl(name, value)
            log.info("gateway interface %s on port %d for %s", self.gateway_ifname, self.offer.gateway_port,
                     ", ".join(self.offer.routes))
        # One peer per node, like the mesh interface: a node joining is one peer operation, not a whole-device
        # apply (which reads every peer back: a second at 10,000 nodes).
        want = {name: (key, peer.blocks) for name, peer in nodes.items()
                if name != self.node and (key := peer.routing.route_key)}
        had = self._gateway_peers
        if want == had:
            return
        upsert = [self._client_peer(*value) for name, value in want.items() if had is None or had.get(name) != value]
        old = had or {}
        remove = [old[name][0] for name in old if name not in want or want[name][0] != old[name][0]]
        if had is None or not self._gateway_device.update_peers(upsert, remove):
            self._gateway_device.apply(DeviceConfig(self.route_key, self.offer.gateway_port,
                                                    tuple(self._client_peer(*v) for v in want.values()),
                                                    BYPASS_MARK))
        self._gateway_peers = want

    @staticmethod
    def _client_peer(route_key: str, blocks: tuple[str, ...]) -> PeerConfig:
        return PeerConfig(public_key=route_key, allowed_ips=blocks, persistent_keepalive=KEEPALIVE)

    def _sync_tunnels(self, routes: NodeRoutes, nodes: Mapping[str, PeerNode]) -> None:
        wanted = {g for g in routes.gateways if g in nodes}
        live = self._mesh_endpoints() if wanted else {}
        now = self._clock()
        for name, t in self._tunnels.items():
            if name not in wanted and t.unused_since is None:
                t.unused_since = now
        self._drop_unused(now, gone=set(self._tunnels) - wanted - set(nodes))
        for name in sorted(wanted):
            peer = nodes[name]
            tunnel = self._tunnels.get(name)
            if tunnel is None:
                used = {t.ifname for t in self._tunnels.values()}
                ifname = next(side_ifname(self.mesh_ifname, f"r{k}") for k in range(1, 100)
                              if side_ifname(self.mesh_ifname, f"r{k}") not in used)
                tunnel = _Tunnel(name, ifname, self._open(ifname), self._clock())
                self._tunnels[name] = tunnel
                log.info("tunnel %s to gateway %s (%s)", ifname, name, ", ".join(peer.routing.routes))
            tunnel.unused_since = None
            config = DeviceConfig(self.route_key, 0, (self._gateway_peer(peer, live),), BYPASS_MARK)
            if config != tunnel.config:
                tunnel.device.apply(config)
                tunnel.config = config

    def _drop_unused(self, now: float, gone: frozenset[str] | set[str] = frozenset()) -> bool:
        """Close tunnels unused for :data:`LINGER` seconds, or whose gateway left the mesh."""
        dropped = False
        for name in sorted(self._tunnels):
            tunnel = self._tunnels[name]
            if name in gone or (tunnel.unused_since is not None and now - tunnel.unused_since >= LINGER):
                del self._tunnels[name]
                tunnel.device.close()
                log.info("tunnel %s to gateway %s removed", tunnel.ifname, name)
                dropped = True
        return dropped

    @staticmethod
    def _gateway_peer(peer: PeerNode, live: Mapping[str, str]) -> PeerConfig:
        """The gateway at the address its mesh tunnel works with (a gateway has several: its outside one
        is no use to us), at its gateway port; the first advertised candidate if the tunnel has none yet."""
        endpoint = None
        for candidate in (live.get(peer.wireguard_public_key), *peer.endpoints):
            if candidate:
                ip, _ = parse_endpoint(candidate)
                endpoint = f"[{ip}]:{peer.routing.gateway_port}" if ip.version == 6 else f"{ip}:{peer.routing.gateway_port}"
                break
        assert peer.routing.route_key is not None
        return PeerConfig(public_key=peer.routing.route_key, allowed_ips=peer.routing.routes, endpoint=endpoint,
                          persistent_keepalive=KEEPALIVE)

    # -- choosing gateways ---------------------------------------------------------------------------------------
    def _active(self, choice: RouteChoice, now: float) -> _Tunnel | None:
        tunnels = [t for g in choice.gateways if (t := self._tunnels.get(g)) is not None]  # one lookup: status races
        return next((t for t in tunnels if t.up(now)), tunnels[0] if tunnels else None)

    def _install(self) -> None:
        now = self._clock()
        routes, marks = self._inputs.routes, self._inputs.marks
        senders = []
        for key, choices in sorted(routes.senders.items()):
            kind, _, ident = key.partition(":")
            mark = marks.get(ident) if kind == "agent" else None
            if kind == "agent" and mark is None:
                continue  # not born here yet, or already gone
            chosen = tuple((c.prefix, t.ifname) for c in choices if (t := self._active(c, now)) is not None)
            if chosen:
                senders.append(SenderRoutes(mark, chosen))
        tables, firewall, _ = self._kernel()
        self._installed = True
        plan = plan_routing(senders, mark_mask=self.mark_mask, mesh_ifname=self.mesh_ifname, overlay=self.overlay,
                            addresses=self.addresses, bypass=self.bypass, gateway_ifname=self.gateway_ifname)
        ifaces = frozenset(t.ifname for t in self._tunnels.values())
        if ifaces != self._route_ifaces:
            self._set_route_ifaces(ifaces)
            self._route_ifaces = ifaces
        if plan != self._plan:  # the driver reads the kernel back on every call
            tables.apply(plan)
            self._plan = plan
        firewall.apply(RouteFirewallConfig(
            mesh_ifname=self.mesh_ifname, overlay4=self.overlay[0], overlay6=self.overlay[1], route_ifnames=ifaces,
            gateway_ifname=self.gateway_ifname, grants4=routes.grants4, grants6=routes.grants6))

    # -- gateway health -------------------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Read each tunnel's receive counter; re-route whoever must move. True when something moved."""
        with self._lock:
            now = self._clock()
            restarted = set(self._restarted)
            self._restarted -= restarted
            for ifname in sorted(restarted):
                log.warning("%s: wireguard-go was restarted; link and routes put back", ifname)
                self._link_up(ifname)
                self._plan = None  # the kernel dropped the routes through the old interface
            for tunnel in self._tunnels.values():
                try:
                    state = tunnel.device.state()
                except IdmeshError as exc:
                    log.warning("tunnel %s: %s", tunnel.ifname, exc)
                    continue
                rx = sum(p.rx_bytes for p in state.peers)
                if rx > tunnel.rx:
                    tunnel.heard = now
                tunnel.rx = rx
                if not tunnel.up(now) and now - tunnel.retried >= RETRY_EVERY and tunnel.config is not None:
                    tunnel.retried = now
                    peer = tunnel.config.peers[0]
                    tunnel.device.update_peers([], [peer.public_key])
                    tunnel.device.update_peers([peer], [])
                    tunnel.rx = 0  # a new peer counts from zero: that is not a sign of life
            dropped = self._drop_unused(now)
            moved = sorted(name for name, t in self._tunnels.items() if t.up(now) != t.was_up)
            if not moved and not dropped and not restarted:
                return False
            for name in moved:
                tunnel = self._tunnels[name]
                tunnel.was_up = not tunnel.was_up
                log.warning("gateway %s is %s (tunnel %s)", name, "up again" if tunnel.was_up else
                            f"down: nothing heard for {STALE_AFTER:g} s", tunnel.ifname)
            self._install()
            return True

    def status(self) -> dict[str, object]:
        """For ``meshctl status``: the tunnels, whether each gateway is up, and each identity's active routes.

        It does not take the lock: status must answer while an apply runs
        (which may take seconds at scale). What it reads is replaced whole
        under the lock (``_inputs``) or copied in one step that no thread
        can interleave (``tuple`` of a dict's values is a single call under
        the GIL); it may describe the state just before a running apply.
        """
        now, inputs, tunnels = self._clock(), self._inputs, tuple(self._tunnels.values())
        return {
            "gateway_interface": self.gateway_ifname,
            "offered": list(self.offer.routes),
            "clients": sorted(inputs.routes.clients),
            "tunnels": [{"gateway": t.gateway, "interface": t.ifname, "up": t.up(now)}
                        for t in sorted(tunnels, key=lambda t: t.gateway)],
            "routes": [{"identity": key, "prefix": c.prefix, "gateways": list(c.gateways),
                        "via": (a.gateway if (a := self._active(c, now)) else None)}
                       for key, choices in sorted(inputs.routes.senders.items()) for c in choices],
        }

    def close(self) -> None:
        """Remove every rule, route, table entry and interface this module made."""
        with self._lock:
            errors = []
            for closer in ([self._tables.close] if self._tables else []) + (
                    [self._firewall.close] if self._firewall else []) + [
                    t.device.close for t in self._tunnels.values()] + (
                    [self._gateway_device.close] if self._gateway_device else []):
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001 — clean up everything, report the first failure
                    errors.append(exc)
            self._tunnels.clear()
            self._gateway_device = None
            if errors:
                raise errors[0]
