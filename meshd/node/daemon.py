"""``meshd run``: the node daemon, wiring its subsystems together.

One asyncio task group holds everything that lives as long as the daemon:
the controller session (netmap stream with reconnection), certificate
renewal, the converger, agent expiry and the agent supervisor, gateway
failover, the flow log, the local API and LAN discovery. SIGTERM/SIGINT end
the group in order; the interface (with its wireguard-go), the firewall
tables and the agents' cgroups are removed: nothing is left.

What each part does lives in its package (:mod:`meshd.mesh`,
:mod:`meshd.agents`, :mod:`meshd.routes`, :mod:`meshd.node`); this module
only makes them, connects their callbacks and owns their lifetime.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import signal
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from idmesh.metrics import Metrics, serve_metrics
from idmesh.tasks import Tasks
from meshcore.errors import IdmeshError, InvalidCertificate, InvalidInput, NotFound, PermissionDenied
from meshcore.policy import Identities, Policy
from meshcore.wire.api import AgentIssued, FlowReport, LoginStart
from meshcore.wire.local import (
    AgentRunAnswer,
    AgentRunRequest,
    LoginAnswer,
    LoginRequest,
    ServeInfo,
    ServeRequest,
    Status,
    Whois,
)
from meshcore.wire.stream import AgentUpdate, EndpointReport, RouteOfferReport
from meshd.agents.cgroups import check_cgroup_parent, own_cgroup
from meshd.agents.net import AgentNet
from meshd.agents.supervisor import AgentSupervisor
from meshd.kernel.netconf import IPRouteNetConf
from meshd.mesh.dataplane import DataPlane, Work
from meshd.mesh.discovery import LanDiscovery, start_discovery
from meshd.mesh.firewall import NftFirewall
from meshd.mesh.flowlog import FlowLog
from meshd.mesh.underlay import local_endpoints
from meshd.nat.relay import Relay
from meshd.nat.traversal import Traversal
from meshd.node import answers
from meshd.node.converger import Converger
from meshd.node.localapi import Caller, LocalApi
from meshd.node.session import ControllerSession
from meshd.node.state import StateDir
from meshd.node.view import MeshView
from meshd.routes.plan import BYPASS_MARK
from meshd.routes.routing import Routing, controller_bypass, watch_gateways
from meshd.serve import Serves
from meshd.serve.assertions import Assertions
from meshd.settings import Settings
from meshd.wg import WireGuardDevice, open_device, public_key_of
from meshd.workload.endpoint import WorkloadEndpoint
from meshd.workload.svids import Svids

__all__ = ["Daemon"]

log = logging.getLogger("meshd")
AGENT_ROUTES_WAIT = 2.0
"""How long ``agent run`` waits for the agent's routes before its command starts anyway."""
FIREWALL_CHECK = 0.5
"""How often meshd checks that its firewall table is still there (listing the table names: ~0.04 ms here)."""


def _cgroup_parent(interface: str) -> str:
    """Where this node's agent cgroups go: ``idmesh-<interface>`` below meshd's own cgroup (its systemd unit's,
    delegated to it), or below the root when meshd's cgroup has a name nft strings cannot carry."""
    own = own_cgroup()
    parent = f"{own}/idmesh-{interface}" if own else f"idmesh-{interface}"
    try:
        return check_cgroup_parent(parent)
    except InvalidInput:
        log.warning("agents' cgroups go to /idmesh-%s: meshd's own cgroup /%s has an unusual name", interface, own)
        return f"idmesh-{interface}"


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = StateDir(settings.state)
        self.record = self.state.read_record()
        self.name = self.record.name
        route_private = self.state.route_key()
        self.offer = RouteOfferReport(routes=settings.advertise, route_key=public_key_of(route_private),
                                gateway_port=settings.gateway_port if settings.advertise else None)
        self._route_private = route_private
        self.mesh = MeshView(self.state, self._wake, self._peers_changed)
        self._host_endpoints: list[str] = []
        self.nat = Traversal(settings.listen_port, lambda: [e.rsplit(":", 1)[0] for e in self._host_endpoints],
                             report_changed=lambda: self.session.report_endpoints(),
                             path_changed=self.mesh.discovered,
                             ask_probe=lambda peer: self.session.call("POST", "/v1/probe", {"peer": peer}),
                             relay_factory=lambda server, user, password, port, on_relayed: Relay(
                                 server, user, password, port, on_relayed=on_relayed),
                             underlay_changed=lambda why: self.session.reconnect(why))
        self.firewall = NftFirewall(settings.interface, flow_log=settings.flow_log)
        self.session = ControllerSession(
            self.state, self.record.urls, version=lambda: self.mesh.version,
            on_full=self.mesh.on_full, on_delta=self.mesh.on_delta, on_policy=self.mesh.on_policy,
            on_agents=self._on_agents, endpoints=self._endpoint_report,
            on_nat=self.nat.set_config, on_probe=lambda probe: self.nat.probe_requested(probe.peer),
            on_controllers=self._controllers_changed,
        )
        self.api = LocalApi(settings.socket, self)
        self._principals = dict(settings.principal_map)
        self.metrics = Metrics()
        self.metrics.snapshot(lambda: answers.gauges(self))
        # made in run(), once the interface exists
        self.plane: DataPlane | None = None
        self.converger: Converger | None = None
        self.agentnet: AgentNet | None = None
        self.supervisor: AgentSupervisor | None = None
        self.workload: WorkloadEndpoint | None = None
        self.routing: Routing | None = None
        self.flowlog: FlowLog | None = None
        self.discovery: LanDiscovery | None = None
        # meshctl serve (ServeContext): this node's name and domain, its assertions, the listeners
        self.node, self.domain = self.name, self.record.domain
        self.assertions = Assertions(self.state.node_key, self.state.node_cert, self.state.ca_cert)
        self.serves = Serves(self.state.path / "serve.json", self.record.addresses, self, self._served_changed)
        self._agent_due = 0
        self._mcp_pairs: tuple[tuple[str, int], ...] = ()
        self._peers_changed()  # the cached netmap's peers, until the controller answers
        self._logins: dict[str, int] = {}  # login id -> the uid that started it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks = Tasks(log)  # short tasks (a revocation's kills, probes): failures logged, awaited at stop

    # -- callbacks between subsystems (event loop) ---------------------------------------------------------
    def _wake(self) -> None:
        if self.converger is not None:
            self.converger.wake()

    def _on_agents(self, update: AgentUpdate) -> None:
        self.mesh.on_agents(update)
        if self.supervisor is not None:
            if update.revoked:
                self._spawn(self.supervisor.revoked(update.revoked))
            if update.full:  # a (re)connected or resynced stream: revocations it missed are not in it
                self._spawn(self.supervisor.reconcile())

    def _controllers_changed(self, urls: tuple[str, ...]) -> None:
        """The controller replicas changed: node.json keeps them, so a restarted meshd can reach any of them."""
        self.record = self.record.with_controllers(urls)
        try:
            self.state.write_record(self.record)
        except IdmeshError as exc:  # the session knows them still; only a restart would forget them
            log.warning("the controller replicas are not kept: %s", exc)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.spawn(coro)

    def _peers_changed(self) -> None:
        view = self.mesh.view
        if view is not None:
            self.nat.set_peers(view.nodes, self.name)
        self._watch_mcp_ports()

    def _watch_mcp_ports(self) -> None:
        """The peers' MCP ports into the agents table, where connections to them from non-agents are logged."""
        view = self.mesh.view
        if self.agentnet is None or view is None:
            return
        pairs = tuple(sorted((address, port) for name, node in view.nodes.items() if name != self.name
                             for port in node.mcp_ports for address in node.addresses))
        if pairs == self._mcp_pairs:
            return
        self._mcp_pairs = pairs
        self._spawn(asyncio.to_thread(self.agentnet.set_mcp_ports, [p for p in pairs if ":" not in p[0]],
                                      [p for p in pairs if ":" in p[0]]))

    def _take(self) -> Work:
        # NAT traversal's paths win over LAN discovery's, which win over the controller's first candidate;
        # a peer the traversal is still probing gets LAN discovery's endpoint or none, never an unchecked guess
        paths = self.nat.endpoints()
        found = {**paths, **(self.discovery.found if self.discovery else {}),
                 **{key: endpoint for key, endpoint in paths.items() if endpoint}}
        return self.mesh.take(found, tuple(self.record.mesh_prefixes))

    def _device_restarted(self) -> None:
        """wireguard-go was restarted (called from its supervisor's thread): everything must be applied again."""
        def again() -> None:
            if self.plane:
                self.plane.full()
            self._wake()

        if self._loop is not None:
            self._loop.call_soon_threadsafe(again)

    async def _endpoint_report(self) -> EndpointReport:
        # pyroute2's synchronous API runs an event loop of its own: keep it off ours.
        found = await asyncio.to_thread(local_endpoints, self.settings.listen_port, self.settings.interface,
                                        self.record.mesh_prefixes)
        self._host_endpoints = list(found)
        return EndpointReport(listen_port=self.settings.listen_port, endpoints=found, routing=self.offer,
                              reach=self.nat.reach(), mcp_ports=self.serves.mcp_ports)

    def _mesh_endpoints(self) -> dict[str, str]:
        """Where the mesh tunnel reaches each peer now (learnt from authenticated packets), by public key."""
        assert self.plane is not None
        return {p.public_key: p.endpoint for p in self.plane.device.state().peers if p.endpoint}

    # -- agents born here --------------------------------------------------------------------------------------
    def _local_agent_changed(self, issued: AgentIssued | None) -> None:
        assert self.converger is not None
        self._agent_due = self.converger.next_pass()
        if issued is not None:
            self.mesh.admit_local(issued)
        self.converger.wake()

    # -- meshctl serve (ServeContext) ------------------------------------------------------------------------
    def enforced(self) -> tuple[Policy, Identities] | None:
        return self.plane.enforced if self.plane is not None else None

    def authorized_by(self, address: str) -> str | None:
        held = self.mesh.book.by_address(address)
        return held.authorized_by if held is not None else None

    def report(self, record: FlowReport) -> None:
        if self.flowlog is not None:
            self.flowlog.pending.append(record)

    def count(self, port: int, verdict: str) -> None:
        self.metrics.serve_requests.labels(str(port), verdict).inc()

    def _served_changed(self, ports: frozenset[int]) -> None:
        """Narrowed acls admit connections on served ports only: the filter follows what is served."""
        if self.plane is not None:
            self.plane.served = ports
        self._wake()

    @staticmethod
    def _root_only(caller: Caller, what: str) -> None:
        if caller.uid != 0:
            raise PermissionDenied(f"only root may {what} (uid {caller.uid} asked)")

    async def put_serve(self, caller: Caller, req: ServeRequest) -> ServeInfo:
        self._root_only(caller, "serve ports over the mesh")
        info = await self.serves.put(req.port, req.to, req.name, req.mcp)
        self._spawn(self.session.report_endpoints())  # the mesh learns which ports serve MCP (lost: the stream retells)
        return info

    async def remove_serve(self, caller: Caller, port: int) -> None:
        self._root_only(caller, "stop serving ports")
        if await self.serves.remove(port) is None:
            raise NotFound(f"port {port} is not served here (meshctl serve list)")
        self._spawn(self.session.report_endpoints())

    def list_serves(self) -> list[ServeInfo]:
        return self.serves.infos()

    # -- the local API (LocalService) ------------------------------------------------------------------------
    def status(self) -> Status:
        return answers.status(self)

    def whois(self, address: str) -> Whois:
        return self.mesh.whois(address)

    def _may_act_for(self, caller: Caller, req: AgentRunRequest) -> tuple[int, int] | None:
        """Whether ``caller`` may start an agent for ``req.principal``, and who owns the agent's files.

        With a grant anyone may ask: the controller checks the principal's
        signature. Without one, only root and the uids mapped to the
        principal (``--principal-map``) may speak for it. Only root may give
        the agent's files to another user (``meshctl agent run --user``);
        anyone else's agent files are their own.
        """
        if caller.uid != 0:
            mapped = self._principals.get(caller.uid)
            if req.grant is None and mapped != req.principal:
                raise PermissionDenied(
                    f"uid {caller.uid} may not start agents for {req.principal} without a grant "
                    f"({'it is mapped to ' + mapped if mapped else 'it is mapped to no principal'}; "
                    f"meshd run --principal-map {caller.uid}={req.principal}, or meshctl agent run --grant)")
            if req.uid is not None and (req.uid, req.gid) != (caller.uid, caller.gid):
                raise PermissionDenied("only root may give an agent's key files to another user")
            return caller.uid, caller.gid
        return (req.uid, req.gid) if req.uid is not None and req.gid is not None else None

    async def run_agent(self, caller: Caller, req: AgentRunRequest) -> AgentRunAnswer:
        if self.supervisor is None or self.converger is None:
            raise IdmeshError("meshd is still starting; try again")
        user = self._may_act_for(caller, req)
        try:
            agent = await self.supervisor.create(caller.pid, req.principal, req.scopes,
                                                 timedelta(seconds=req.ttl_seconds), req.name, user, req.grant,
                                                 caller.exited)
        except InvalidCertificate as exc:
            skew = self.session.clock_skew()
            if skew is None:
                raise
            raise InvalidCertificate(f"{exc}: {skew} (set both with NTP)") from exc
        # The command starts when this returns: where the policy routes by identity, let the converger
        # install the agent's routes first, so its first connection already takes its gateway (bounded: a
        # slow apply must not block it). Everything else the agent needs here is in place already.
        if self.mesh.policy.routes and not await self.converger.wait_for(self._agent_due, AGENT_ROUTES_WAIT):
            log.warning("agent %s starts before its routes are installed", agent.issued.agent.id)
        return {"agent": agent.issued.agent.model_dump(mode="json"),
                "environment": agent.environment(agent.directory / "ca.crt", self.settings.socket,
                                                 self.settings.workload)}

    def list_agents(self) -> list[dict[str, Any]]:
        local = self.supervisor.local if self.supervisor else {}
        return [a.issued.agent.model_dump(mode="json") for a in local.values()]

    async def start_login(self, caller: Caller, req: LoginRequest) -> LoginAnswer:
        """A person on this node logs in: the controller is asked on their behalf, with the node's certificate."""
        try:
            user = pwd.getpwuid(caller.uid).pw_name
        except KeyError:
            user = None
        body = LoginStart(csr=req.csr, ttl_seconds=req.ttl_seconds, user=user, uid=caller.uid)
        started = await self.session.call("POST", "/v1/login", body.model_dump())
        assert isinstance(started, dict)
        self._logins[str(started["id"])] = caller.uid
        return {"login": started, "device": self.name,
                "controller": {"url": self.session.url, "urls": list(self.session.urls),
                               "domain": self.record.domain, "ca": self.state.ca_cert.read_text()}}

    async def poll_login(self, caller: Caller, login_id: str) -> dict[str, Any]:
        """One poll of a login, by the user who started it (a login is nobody else's to finish)."""
        if self._logins.get(login_id) != caller.uid:
            raise NotFound(f"no login {login_id!r} of uid {caller.uid} on this node")
        polled = await self.session.call("POST", f"/v1/login/{login_id}")
        assert isinstance(polled, dict)
        if polled.get("status") == "done":
            self._logins.pop(login_id, None)
        return polled

    async def _guard_firewall(self, every: float = FIREWALL_CHECK) -> None:
        """Put ``inet idmesh`` back when someone else deletes it: without it this node denies nothing."""
        while True:
            await asyncio.sleep(every)
            if await asyncio.to_thread(self.firewall.missing):
                log.warning("firewall: table inet idmesh was deleted outside meshd; installing it again")
                if self.plane is not None:
                    self.plane.full()
                self._wake()

    async def _expire_agents(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.mesh.write_snapshot()
            self.mesh.expire(datetime.now(UTC))

    async def _discover(self) -> None:
        report = await self._endpoint_report()
        self.discovery = await start_discovery(self.name, self.record.wireguard_public_key,
                                               self.settings.listen_port, report.endpoints, self.mesh.discovered)

    # -- lifetime ----------------------------------------------------------------------------------------------
    async def _start(self, device: WireGuardDevice) -> None:
        s = self.settings
        self.plane = DataPlane(self.name, self.record.addresses, self.state.wg_key.read_text().strip(),
                               s.listen_port, s.interface, device, IPRouteNetConf(), self.firewall, BYPASS_MARK)
        self.mesh.plane = self.plane
        self.converger = Converger(self.plane, self._take, self.mesh.applied)
        # Default deny from the first moment: the cached (or empty) policy is enforced,
        # and the cached map applied, before the controller answers.
        self.converger.wake()
        blocks = list(self.record.blocks)
        # The cgroup hierarchy is machine-wide (shared by network namespaces): name the
        # node's subtree after its interface, which is unique on the machine too.
        agentnet = self.agentnet = AgentNet(self.name, s.interface, blocks[0], blocks[1],
                                            cgroup_parent=_cgroup_parent(s.interface))
        await asyncio.to_thread(agentnet.start)
        self._watch_mcp_ports()
        self.supervisor = AgentSupervisor(s.socket.parent / f"agents-{s.interface}", self.state.ca_cert, blocks,
                                          agentnet, self.session, s.socket, self._local_agent_changed)
        self.supervisor.prepare()
        self.plane.served = self.serves.ports
        await self.serves.start()
        svids = Svids(self.session, self.supervisor.local, self.record.domain, self.state.ca_cert.read_bytes())
        self.supervisor.on_end = svids.ended
        self.workload = WorkloadEndpoint(s.workload, svids, self.supervisor.agent_of_pid,
                                         lambda method, code: self.metrics.workload_calls.labels(method, code).inc())
        await self.workload.start()
        self.plane.routing = self.routing = Routing(
            self.name, s.interface, self.record.addresses, self._route_private, self.offer,
            self.record.mesh_prefixes, mark_mask=agentnet.table.field.mask,
            agent_marks=lambda: {a: slot.mark for a, slot in agentnet.slots.items()},
            set_route_interfaces=agentnet.set_route_interfaces, bypass=self._controllers_bypass(),
            wireguard=s.wireguard, mesh_endpoints=self._mesh_endpoints)
        if s.flow_log:
            self.flowlog = FlowLog(lambda address: self.mesh.whois(address, recent=True), self.session.call)
            assert self._loop is not None
            self.flowlog.start(self._loop)

    def _controllers_bypass(self) -> tuple[str, ...]:
        """Every controller replica's addresses (those known at start; a replica learnt later counts from the
        next start), kept out of this node's own exit routes."""
        return tuple(sorted({prefix for url in self.session.urls for prefix in controller_bypass(url)}))

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, stop.set)
        s = self.settings
        device = await asyncio.to_thread(open_device, s.interface, implementation=s.wireguard,
                                         on_restart=self._device_restarted)
        if s.metrics:
            serve_metrics(self.metrics, s.metrics)
        log.info("%s up on %s (%s), listening on %d", self.name, s.interface, type(device).__name__, s.listen_port)
        try:
            await self._start(device)
            assert self.converger is not None and self.supervisor is not None and self.routing is not None
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.session.run(), name="controller"),
                    tg.create_task(self.session.renew_when_due(), name="renewal"),
                    tg.create_task(self.converger.run(), name="converge"),
                    tg.create_task(self._expire_agents(), name="agent-expiry"),
                    tg.create_task(self._guard_firewall(), name="firewall-guard"),
                    tg.create_task(self.supervisor.watch(), name="agent-watch"),
                    tg.create_task(self.supervisor.retire_leftovers(), name="agent-leftovers"),
                    tg.create_task(watch_gateways(self.routing), name="gateways"),
                    tg.create_task(self.nat.run(), name="nat"),
                ]
                if s.discovery:
                    tasks.append(tg.create_task(self._discover(), name="discovery"))
                if self.flowlog is not None:
                    tasks.append(tg.create_task(self.flowlog.ship_forever(), name="flow-log"))
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
            await self._stop(device)

    async def _stop(self, device: WireGuardDevice) -> None:
        """Undo everything, in the reverse order of its making; nothing of ours is left."""
        await self.serves.close()
        await self._tasks.close()
        if self.flowlog is not None:
            await asyncio.to_thread(self.flowlog.close)
        if self.workload is not None:
            await self.workload.close()
        if self.supervisor is not None:
            await self.supervisor.close()
        if self.routing is not None:
            await asyncio.to_thread(self.routing.close)
        if self.agentnet is not None:
            await asyncio.to_thread(self.agentnet.close)
        if self.discovery is not None:
            await self.discovery.stop()
        self.session.close()
        self.mesh.write_snapshot(force=True)
        await asyncio.to_thread(device.close)
        await asyncio.to_thread(self.firewall.close)
        log.info("stopped; interface %s removed", self.settings.interface)
