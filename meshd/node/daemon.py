"""``meshd run``: the node daemon.

One asyncio task group holds everything that lives as long as the daemon:
the controller session (netmap stream with reconnection), certificate
renewal, the converger (:mod:`meshd.mesh.dataplane`), agent expiry and the
agent supervisor, the local API and LAN discovery. SIGTERM/SIGINT end the
group in order; the interface (with its wireguard-go), the firewall
tables and the agents' cgroups are removed: nothing is left.

The data plane outlives the control plane: when the controller is away the
interface keeps its peers and rules; the last netmap and policy are cached
in the state directory, so a restarted meshd enforces the policy and
rebuilds its tunnels before the controller answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from idmesh.metrics import Metrics, serve_metrics
from idmesh.paths import DEFAULT_SOCKET
from meshcore.errors import IdmeshError, InvalidInput, NotFound
from meshcore.identity import load_certificate
from meshcore.netmap import (
    AgentUpdate,
    EndpointReport,
    Netmap,
    NetmapDelta,
    NodeView,
    PolicyDoc,
    ResyncNeeded,
    RouteOffer,
)
from meshcore.policy import Policy, load_policy
from meshcore.wire import AgentIssued

from meshd.agents.book import AgentBook
from meshd.agents.supervisor import AgentSupervisor
from meshd.mesh.dataplane import DataPlane
from meshd.mesh.discovery import LanDiscovery
from meshd.mesh.firewall import NftFirewall
from meshd.mesh.flowlog import FlowLog
from meshd.node.localapi import AgentRunRequest, LocalApi
from meshd.mesh.netconf import IPRouteNetConf
from meshd.node.session import ControllerSession
from meshd.node.state import StateDir, write_private
from meshd.mesh.underlay import local_endpoints
from meshd.routes.routing import Routing
from meshd.wg import generate_private_key, open_device, public_key_of

__all__ = ["Options", "Daemon"]

log = logging.getLogger("meshd")
RETRY_APPLY = 2.0
SNAPSHOT_EVERY = 5.0  # seconds between writes of the cached netmap (a 10k-node map is ~25 ms to write)


@dataclass(frozen=True)
class Options:
    state: Path
    interface: str = "idmesh0"
    socket: Path = Path(DEFAULT_SOCKET)
    listen_port: int = 51820
    discovery: bool = True
    wireguard: str = "auto"
    metrics: str | None = None
    flow_log: bool = True
    advertise: tuple[str, ...] = ()
    gateway_port: int = 51821


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.state = StateDir(opts.state)
        self.record = self.state.read_record()
        self.name = self.record.name
        self.wg_private = self.state.wg_key.read_text().strip()
        self.route_private = self._route_key()
        self.offer = RouteOffer(routes=opts.advertise, route_key=public_key_of(self.route_private),
                                gateway_port=opts.gateway_port if opts.advertise else None)
        self.routing: Routing | None = None
        self.view: NodeView | None = self._load_cached_netmap()
        self.policy_doc: PolicyDoc | None = self._load_cached_policy()
        self.policy: Policy = self._parse_policy(self.policy_doc) or load_policy("", "<no policy>")
        self.book = AgentBook(load_certificate(self.state.ca_cert.read_bytes()))
        self.firewall = NftFirewall(opts.interface, flow_log=opts.flow_log)
        self.flowlog: FlowLog | None = None
        self.plane: DataPlane | None = None
        self.applied_version: int | None = None
        self.session = ControllerSession(
            self.state, self.record.controller,
            version=lambda: self.view.version if self.view else None,
            on_full=self._on_full, on_delta=self._on_delta, on_policy=self._on_policy,
            on_agents=self._on_agents, endpoints=self._endpoint_report,
        )
        self.discovery: LanDiscovery | None = None
        self.agentnet: Any = None
        self.supervisor: AgentSupervisor | None = None
        self.api = LocalApi(opts.socket, self.status, self.whois, self._run_agent, self._list_agents)
        self._dirty = asyncio.Event()
        self._taken = self._applied = 0  # converger passes begun / finished (see _run_agent)
        self._agent_due = 0
        self._applied_changed = asyncio.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._snapshot_due = False
        self._snapshot_at = 0.0
        self.metrics = Metrics()
        self.metrics.snapshot(self._gauges)

    def _gauges(self) -> list[tuple[str, str, dict[str, str], float]]:
        """Read at scrape time (in the metrics server's thread) from the daemon's own state."""
        view, plane = self.view, self.plane
        out = [
            ("idmesh_netmap_version", "Netmap version received", {}, float(view.version if view else 0)),
            ("idmesh_netmap_applied_version", "Netmap version applied to the interface", {},
             float(self.applied_version or 0)),
            ("idmesh_policy_version", "Policy version enforced (0: none)", {},
             float(self.policy_doc.version if self.policy_doc else 0)),
            ("idmesh_controller_connected", "1 while the netmap stream is open", {}, float(self.session.connected)),
            ("idmesh_identities_live", "Identities this node honors, by kind", {"kind": "agent"},
             float(len(self.book.agents))),
            ("idmesh_identities_live", "Identities this node honors, by kind", {"kind": "node"},
             float(len(view.nodes) if view else 0)),
            ("idmesh_agents_local", "Agents running on this node", {},
             float(len(self.supervisor.local) if self.supervisor else 0)),
            ("idmesh_denied_packets", "Packets dropped by default deny on mesh ingress", {},
             float(self.firewall.denied())),
        ]
        if self.flowlog is not None:
            for cls in ("agent", "node", "unknown"):
                out.append(("idmesh_denied_flows", "Denied connections logged (rate-limited), by identity class",
                            {"class": cls}, float(self.flowlog.denied[cls])))
        if self.agentnet is not None:
            out.append(("idmesh_spoofed_packets", "Packets dropped for sending with an agent address not theirs",
                        {}, float(self.agentnet.spoofed())))
        if plane is not None:
            with plane.lock:
                state = plane.device.state()
            now = datetime.now(timezone.utc)
            names = {n.wireguard_public_key: name for name, n in (view.nodes.items() if view else ())}
            out.append(("idmesh_peers", "WireGuard peers configured", {}, float(len(state.peers))))
            for p in state.peers:
                age = (now - p.latest_handshake).total_seconds() if p.latest_handshake else -1.0
                out.append(("idmesh_handshake_age_seconds", "Seconds since the last handshake (-1: never)",
                            {"peer": names.get(p.public_key, p.public_key[:8])}, age))
        return out

    def _route_key(self) -> str:
        """The key of this node's route tunnels (see :mod:`meshd.routes.routing`): made here, on first run, 0600."""
        path = self.state.path / "route.key"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            key = generate_private_key()
            write_private(path, key + "\n")
            return key

    # -- caches ---------------------------------------------------------------------------
    def _load_cached_netmap(self) -> NodeView | None:
        try:
            return NodeView(Netmap.model_validate_json((self.state.path / "netmap.json").read_text()))
        except (OSError, ValueError):
            return None

    def _load_cached_policy(self) -> PolicyDoc | None:
        try:
            return PolicyDoc.model_validate_json((self.state.path / "policy.json").read_text())
        except (OSError, ValueError):
            return None

    def _write_snapshot(self, force: bool = False) -> None:
        """The cached netmap, written at most every SNAPSHOT_EVERY seconds (and at shutdown)."""
        if self.view is None or not (self._snapshot_due and (force or time.monotonic() - self._snapshot_at
                                                             >= SNAPSHOT_EVERY)):
            return
        write_private(self.state.path / "netmap.json", self.view.snapshot().model_dump_json(), 0o644)
        self._snapshot_due, self._snapshot_at = False, time.monotonic()

    # -- events from the controller (event loop) ------------------------------------------------
    def _changed(self) -> None:
        self._snapshot_due = True
        self._dirty.set()

    def _on_full(self, netmap: Netmap) -> None:
        self.view = NodeView(netmap)
        for agent_id in [a for a, h in self.book.agents.items() if h.identity.node not in netmap.nodes]:
            self.book.drop([agent_id])
        log.info("netmap version %d: %d nodes", netmap.version, len(netmap.nodes))
        if self.plane:
            self.plane.full()
        self._changed()

    def _on_delta(self, delta: NetmapDelta) -> None:
        if self.view is None:
            raise ResyncNeeded("a delta before any full map")
        changed, removed = self.view.apply(delta)
        if not (changed or removed):
            return
        gone_agents = [a for name in removed for a in self.book.forget_node(name)]
        log.info("netmap version %d: %s%s", delta.version, " ".join(f"+{n.name}" for n in changed),
                 "".join(f" -{n}" for n in removed))
        if self.plane:
            self.plane.nodes_changed([n.name for n in changed] + removed)
            self.plane.agents_changed(gone_agents)
        self._changed()

    @staticmethod
    def _parse_policy(doc: PolicyDoc | None) -> Policy | None:
        if doc is None:
            return None
        try:
            return load_policy(doc.text, doc.filename)
        except IdmeshError as exc:  # the controller validated it: this is a version skew
            log.error("policy version %d does not load here, keeping the previous one: %s", doc.version, exc)
            return None

    def _on_policy(self, doc: PolicyDoc) -> None:
        if self.policy_doc is not None and doc.hash == self.policy_doc.hash:
            return
        policy = self._parse_policy(doc)
        if policy is None:
            return
        self.policy, self.policy_doc = policy, doc
        write_private(self.state.path / "policy.json", doc.model_dump_json(), 0o644)
        log.info("policy version %d (sha256:%s)", doc.version, doc.hash[:16])
        self._dirty.set()

    def _on_agents(self, update: AgentUpdate) -> None:
        now = datetime.now(timezone.utc)
        nodes = self.view.nodes if self.view else {}
        if update.full:
            self.book.replace_all(update.certificates, nodes, now)
            if self.plane:
                self.plane.agents_reset()
        else:
            changed = self.book.drop(update.revoked, revoked=True)
            changed += self.book.admit_all(update.certificates, nodes, now)
            if self.plane:
                self.plane.agents_changed(changed)
        if update.revoked and self.supervisor is not None:
            self._spawn(self.supervisor.revoked(update.revoked))
        self._dirty.set()

    # -- converging ---------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """A short task owned by the daemon: kept, cancelled at shutdown, never orphaned."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _mark_full_threadsafe(self) -> None:
        """wireguard-go was restarted: everything must be applied again."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._full_again)

    def _full_again(self) -> None:
        if self.plane:
            self.plane.full()
        self._dirty.set()

    async def _converge(self) -> None:
        assert self.plane is not None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            view = self.view
            nodes = view.nodes if view else {}
            found = self.discovery.found if self.discovery else {}
            work = self.plane.take(self.policy, nodes, self.book.identities, found,
                                   view.prefixes if view else tuple(self.record.mesh_prefixes))
            self._taken += 1
            taken = self._taken
            try:
                await asyncio.to_thread(self.plane.apply, work)
                self.applied_version = view.version if view else None
                self._write_snapshot()
                async with self._applied_changed:
                    self._applied = taken
                    self._applied_changed.notify_all()
            except IdmeshError as exc:
                log.error("could not apply the netmap: %s; retrying in %.0f s", exc, RETRY_APPLY)
                self.plane.restore(work)
                await asyncio.sleep(RETRY_APPLY)
                self._dirty.set()

    async def _expire_agents(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if self.view is not None and self._snapshot_due:
                self._write_snapshot()
            expired = self.book.expire(datetime.now(timezone.utc))
            if expired and self.plane:
                self.plane.agents_changed(expired)
                self._dirty.set()

    async def _endpoint_report(self) -> EndpointReport:
        # pyroute2's synchronous API runs an event loop of its own: keep it off ours.
        found = await asyncio.to_thread(local_endpoints, self.opts.listen_port, self.opts.interface,
                                        self.record.mesh_prefixes)
        return EndpointReport(listen_port=self.opts.listen_port, endpoints=found, routing=self.offer)

    def _discovered(self, public_key: str) -> None:
        for name, node in (self.view.nodes.items() if self.view else ()):
            if node.wireguard_public_key == public_key and self.plane:
                self.plane.nodes_changed([name])
                self._dirty.set()

    # -- agents born here ----------------------------------------------------------------------------
    def _local_agent_changed(self, issued: AgentIssued | None) -> None:
        self._agent_due = self._taken + 1  # the first converger pass taken from now on carries this change
        if issued is not None and self.view is not None:
            held = self.book.admit(issued.certificate, self.view.nodes, datetime.now(timezone.utc))
            if self.plane:
                self.plane.agents_changed([held.identity.id])
        self._dirty.set()

    async def _run_agent(self, pid: int, req: AgentRunRequest) -> dict[str, Any]:
        if self.supervisor is None:
            raise IdmeshError("meshd is still starting; try again")
        user = (req.uid, req.gid) if req.uid is not None and req.gid is not None else None
        agent = await self.supervisor.create(pid, req.principal, req.scopes, timedelta(seconds=req.ttl_seconds),
                                             req.name, user)
        # The command starts when this returns: let the converger install the agent's routes first,
        # so its first connection already takes its gateway (bounded: a slow apply must not block it).
        due = self._agent_due
        async with self._applied_changed:
            try:
                await asyncio.wait_for(self._applied_changed.wait_for(lambda: self._applied >= due), 2.0)
            except TimeoutError:
                log.warning("agent %s starts before its routes are installed", agent.issued.agent.id)
        return {"agent": agent.issued.agent.model_dump(mode="json"),
                "environment": agent.environment(agent.directory / "ca.crt", self.opts.socket)}

    def _list_agents(self) -> list[dict[str, Any]]:
        local = self.supervisor.local if self.supervisor else {}
        return [a.issued.agent.model_dump(mode="json") for a in local.values()]

    # -- the local API's answers -------------------------------------------------------------------------
    def _flow_source(self, address: str) -> dict[str, Any]:
        """whois for the flow log: an agent that ended a moment ago still names its flows."""
        return self.whois(address, recent=True)

    def whois(self, address: str, recent: bool = False) -> dict[str, Any]:
        """Who holds an overlay address, from what this node has verified itself."""
        try:
            canonical = str(ipaddress.ip_address(address))
        except ValueError as exc:
            raise InvalidInput(f"not an IP address: {address!r}") from exc
        held = self.book.recently_held(canonical) if recent else self.book.by_address(canonical)
        if held is not None:
            a = held.identity
            return {"kind": "agent", "node": a.node, "principal": a.principal, "agent": a.id, "name": a.name,
                    "scopes": [str(s) for s in a.scopes], "parent": a.parent, "expires": held.not_after.isoformat(),
                    "addresses": [a.ipv4, a.ipv6]}
        for node in (self.view.nodes.values() if self.view else ()):
            if canonical in node.addresses:
                return {"kind": "node", "node": node.name, "principal": node.owner, "agent": None, "scopes": [],
                        "parent": None, "expires": None, "tags": list(node.tags), "addresses": list(node.addresses)}
        raise NotFound(f"no identity this node honors holds {canonical}")

    def status(self) -> dict[str, Any]:
        view, plane = self.view, self.plane
        state = None
        if plane is not None:
            with plane.lock:
                state = plane.device.state()
        by_key = {p.public_key: p for p in state.peers} if state else {}
        peers = []
        for name, node in sorted((view.nodes if view else {}).items()):
            if name == self.name:
                continue
            ps = by_key.get(node.wireguard_public_key)
            peers.append({
                "name": name,
                "addresses": list(node.addresses),
                "endpoint": ps.endpoint if ps else None,
                "latest_handshake": ps.latest_handshake.isoformat() if ps and ps.latest_handshake else None,
                "rx_bytes": ps.rx_bytes if ps else 0,
                "tx_bytes": ps.tx_bytes if ps else 0,
                "tags": list(node.tags),
                "owner": node.owner,
            })
        nf = plane.filter if plane else None
        return {
            "self": {
                "name": self.name,
                "addresses": list(self.record.addresses),
                "public_key": self.record.wireguard_public_key,
                "tags": list(self.record.tags),
                "owner": self.record.owner,
                "interface": self.opts.interface,
                "listen_port": state.listen_port if state else self.opts.listen_port,
            },
            "policy": {
                "version": self.policy_doc.version if self.policy_doc else 0,
                "hash": self.policy_doc.hash if self.policy_doc else None,
                "ruleset": nf.digest if nf else None,
                "rules": len(nf.rules) if nf else 0,
            },
            "agents": {"honored": len(self.book.agents), "local": len(self.supervisor.local) if self.supervisor else 0},
            "controller": {
                "url": self.session.url,
                "connected": self.session.connected,
                "netmap_version": view.version if view else None,
                "applied_version": self.applied_version,
                "last_error": self.session.last_error,
            },
            "peers": peers,
            "routing": self.routing.status() if self.routing else None,
        }

    # -- lifetime ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, stop.set)
        device = await asyncio.to_thread(
            open_device, self.opts.interface, implementation=self.opts.wireguard,  # type: ignore[arg-type]
            on_restart=self._mark_full_threadsafe,
        )
        if self.opts.metrics:
            serve_metrics(self.metrics, self.opts.metrics)
        self.plane = DataPlane(self.name, self.record.addresses, self.wg_private, self.opts.listen_port,
                               self.opts.interface, device, IPRouteNetConf(), self.firewall)
        log.info("%s up on %s (%s), listening on %d", self.name, self.opts.interface, type(device).__name__,
                 self.opts.listen_port)
        try:
            # Default deny from the first moment: the cached (or empty) policy is enforced,
            # and the cached map applied, before the controller answers.
            self._dirty.set()
            await self._start_agents()
            self.plane.routing = self.routing = self._make_routing()
            if self.opts.flow_log:
                self.flowlog = FlowLog(self._flow_source, self.session.call)
                self.flowlog.start(self._loop)
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.session.run(), name="controller"),
                    tg.create_task(self.session.renew_when_due(), name="renewal"),
                    tg.create_task(self._converge(), name="converge"),
                    tg.create_task(self._expire_agents(), name="agent-expiry"),
                ]
                if self.supervisor is not None:
                    tasks.append(tg.create_task(self.supervisor.watch(), name="agent-watch"))
                if self.opts.discovery:
                    tasks.append(tg.create_task(self._start_discovery(), name="discovery"))
                if self.flowlog is not None:
                    tasks.append(tg.create_task(self.flowlog.ship_forever(), name="flow-log"))
                tasks.append(tg.create_task(self._watch_gateways(), name="gateways"))
                api = tg.create_task(self.api.serve(), name="local-api")
                waiter = tg.create_task(stop.wait(), name="stop")
                await asyncio.wait([api, waiter], return_when=asyncio.FIRST_COMPLETED)
                log.info("stopping")
                self.api.stop()
                for task in tasks:
                    task.cancel()
                waiter.cancel()
        except* IdmeshError as group:
            raise group.exceptions[0] from None
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self.flowlog is not None:
                await asyncio.to_thread(self.flowlog.close)
            if self.supervisor is not None:
                await self.supervisor.close()
            if self.routing is not None:
                await asyncio.to_thread(self.routing.close)
            if self.agentnet is not None:
                await asyncio.to_thread(self.agentnet.close)
            if self.discovery is not None:
                await self.discovery.stop()
            self._write_snapshot(force=True)
            await asyncio.to_thread(device.close)
            await asyncio.to_thread(self.firewall.close)
            log.info("stopped; interface %s removed", self.opts.interface)

    async def _start_agents(self) -> None:
        from meshd.agents.net import AgentNet

        blocks = list(self.record.blocks)
        # The cgroup hierarchy is machine-wide (shared by network namespaces): name the
        # node's subtree after its interface, which is unique on the machine too.
        self.agentnet = AgentNet(self.name, self.opts.interface, blocks[0], blocks[1],
                                 cgroup_parent=f"idmesh-{self.opts.interface}")
        await asyncio.to_thread(self.agentnet.start)
        self.supervisor = AgentSupervisor(self.state, blocks, self.agentnet, self.session, self.opts.socket,
                                          self._local_agent_changed)

    def _make_routing(self) -> Routing:
        """Routes by identity; a node without route rules or offers never touches its routing tables."""
        host = urlsplit(self.record.controller).hostname or ""
        bypass: tuple[str, ...] = ()
        try:
            bypass = (str(ipaddress.ip_network(host)),)
        except ValueError:
            try:
                bypass = tuple(sorted({str(ipaddress.ip_network(str(info[4][0]).split("%")[0]))
                                       for info in socket.getaddrinfo(host, None)}))
            except OSError:
                log.warning("cannot resolve the controller %s: an exit route of this node itself would carry "
                            "its control traffic too", host)
        return Routing(self.name, self.opts.interface, self.record.addresses, self.route_private, self.offer,
                       self.record.mesh_prefixes, mark_mask=self.agentnet.table.field.mask,
                       agent_marks=lambda: {a: s.mark for a, s in self.agentnet.slots.items()},
                       set_route_interfaces=self.agentnet.set_route_interfaces, bypass=bypass,
                       wireguard=self.opts.wireguard, mesh_endpoints=self._mesh_endpoints)

    def _mesh_endpoints(self) -> dict[str, str]:
        """Where the mesh tunnel reaches each peer now (learnt from authenticated packets), by public key."""
        assert self.plane is not None
        return {p.public_key: p.endpoint for p in self.plane.device.state().peers if p.endpoint}

    async def _watch_gateways(self) -> None:
        """Failover: every half second, has a gateway gone quiet (or come back)?"""
        while True:
            await asyncio.sleep(0.5)
            if self.routing is not None:
                try:
                    await asyncio.to_thread(self.routing.poll)
                except IdmeshError as exc:
                    log.error("gateway failover: %s", exc)

    async def _start_discovery(self) -> None:
        """mDNS probing takes a second or more: it runs beside everything else, never before it."""
        report = await self._endpoint_report()
        underlay = [e.rsplit(":", 1)[0] for e in report.endpoints if not e.startswith("[")]
        discovery = LanDiscovery(self.name, self.record.wireguard_public_key, self.opts.listen_port, underlay,
                                 self._discovered)
        try:
            await discovery.start()
        except (OSError, RuntimeError) as exc:  # no multicast here: discovery is an optimisation
            log.warning("LAN discovery unavailable: %s", exc)
            return
        self.discovery = discovery
