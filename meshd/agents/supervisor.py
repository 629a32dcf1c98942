"""Agents born on this node: identity, address, cgroup, and their end.

``meshctl agent run`` asks the local API to make the calling process an
agent. The supervisor then picks a free address of the node's block, makes
the agent's Ed25519 key here (it never leaves the node) and asks the
controller for the certificate (which checks the policy's delegations).
While the controller signs, the key goes to disk and the caller moves into
a cgroup of its own (the slow step: see :meth:`AgentNet.stage
<meshd.agents.net.AgentNet.stage>`); with the certificate, the cgroup takes
the agent's name and the nftables entries that mark and source-translate
its packets are added. ``meshctl`` then execs the command, which keeps the
identity while any of its processes lives. A birth that fails on the way
puts the caller back in its cgroup and leaves nothing behind.

An agent ends when its cgroup empties (the command exited), when it
expires (on this node's clock: its processes are killed, an expired
identity must not keep sending), or when it is revoked. Ending is the same
path each time: nftables entries and cgroup removed, address freed, files
deleted, the controller told (retired) unless it was the one that revoked.

Who is calling is taken from the Unix socket's peer credentials, never from
what the caller says: a caller inside an agent's cgroup makes a sub-agent
of that agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Protocol

from asyncinotify import Inotify, Mask, Watch
from cryptography.hazmat.primitives.asymmetric import ed25519

from idmesh.tasks import Tasks
from meshcore.addressing import NodeBlock
from meshcore.errors import Exhausted, IdmeshError, InvalidCertificate, InvalidInput, NotFound, PermissionDenied
from meshcore.identity import build_csr, key_pem, load_certificate
from meshcore.wire.api import AgentIssued
from meshd.files import write_private

__all__ = ["AgentNetwork", "AgentSupervisor", "LocalAgent"]

log = logging.getLogger("meshd.agents.supervisor")
WATCH_INTERVAL = 0.2


class AgentNetwork(Protocol):
    """What the supervisor needs from the agent data plane (meshd.agents.net)."""

    def stage(self, ipv4: str, pid: int) -> None: ...

    def unstage(self, ipv4: str, pid: int, home: str) -> None: ...

    def add(self, agent_id: str, ipv4: str, ipv6: str, done: Callable[[str], None] = ...,
            staged: bool = False) -> Any: ...

    def move(self, pid: int, agent_id: str) -> None: ...

    def populated(self, agent_id: str) -> bool: ...

    def agent_of_cgroup(self, path: str) -> str | None: ...

    def remove(self, agent_id: str) -> None: ...


@dataclass
class LocalAgent:
    id: str
    slot: int
    issued: AgentIssued
    directory: Path
    not_after: datetime
    moved: bool = False
    ended: bool = field(default=False)

    def environment(self, ca: Path, socket: Path, workload: Path) -> dict[str, str]:
        a = self.issued.agent
        return {
            "SPIFFE_ENDPOINT_SOCKET": f"unix://{workload}",
            "IDMESH_AGENT_ID": a.id,
            "IDMESH_AGENT_NAME": a.name,
            "IDMESH_AGENT_PRINCIPAL": a.principal,
            "IDMESH_AGENT_SCOPES": " ".join(a.scopes),
            "IDMESH_AGENT_CERT": str(self.directory / "agent.crt"),
            "IDMESH_AGENT_KEY": str(self.directory / "agent.key"),
            "IDMESH_AGENT_ADDRESS": a.addresses[0],
            "IDMESH_AGENT_ADDRESS6": a.addresses[1],
            "IDMESH_AGENT_EXPIRES": a.expires.isoformat(),
            "IDMESH_CA": str(ca),
            "IDMESH_SOCKET": str(socket),
        }


def _valid_here(pem: str) -> None:
    """Refuse a certificate this node's clock says is not valid (yet): the controller's clock is off. Only the
    time is checked here, before anything is set up; the whole check comes when the node admits the agent."""
    cert = load_certificate(pem)
    now = datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        raise InvalidCertificate(f"the controller issued a certificate that is not valid before "
                                 f"{cert.not_valid_before_utc.isoformat()} by this node's clock")
    if now >= cert.not_valid_after_utc:
        raise InvalidCertificate(f"the controller issued a certificate that expired at "
                                 f"{cert.not_valid_after_utc.isoformat()} by this node's clock")


class _Steps:
    """How long each step of a birth took, for the ``born ... in N ms (key .., certificate .., ...)`` line."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._laps: list[tuple[str, float]] = []

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self._laps.append((step, now - self._last))
        self._last = now

    def __str__(self) -> str:
        laps = ", ".join(f"{step} {seconds * 1e3:.1f}" for step, seconds in self._laps)
        return f"{(self._last - self._start) * 1e3:.1f} ms ({laps})"


class Controller(Protocol):
    async def call(self, method: str, path: str, body: object = None) -> object: ...


class AgentSupervisor:
    def __init__(self, directory: Path, ca_cert: Path, blocks: list[str], net: AgentNetwork, controller: Controller,
                 socket: Path, on_change: Any) -> None:
        self.directory = directory  # one directory per agent below it: its key, certificate and the CA (see prepare)
        self.ca_cert = ca_cert
        self.block = NodeBlock(0, IPv4Network(blocks[0]), IPv6Network(blocks[1]))
        self.net = net
        self.controller = controller
        self.socket = socket
        self.local: dict[str, LocalAgent] = {}
        self._on_change = on_change  # called with the AgentIssued of a new agent, or None after an end
        self.on_end: Callable[[str], None] = lambda agent_id: None  # told each agent that ended, by id
        # slots of births waiting for their certificate, and of ends the controller has not acknowledged
        self._reserved: set[int] = set()
        self._last_slot = -1  # the slot handed out last (round robin)
        self._inotify: Inotify | None = None  # while watch() runs
        self._watches: dict[Watch, str] = {}  # a cgroup.events watch -> its agent
        self._tasks = Tasks(log)  # ends and checks under way

    def prepare(self) -> None:
        """Make the agents' directory, and remove what a crashed run left in it.

        It lives beside the local API socket (a runtime directory: agent keys
        never outlive a reboot), mode 0711: an agent's own directory (0700,
        its user's) can be reached by the agent's processes, which may not
        be root, but nobody can list whose agents there are.
        """
        try:
            self.directory.mkdir(mode=0o711, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o711)
            for stale in self.directory.iterdir():
                shutil.rmtree(stale, ignore_errors=True)
        except OSError as exc:
            raise PermissionDenied(f"cannot prepare the agents' directory {self.directory}: {exc.strerror or exc}") from exc

    def _reserve_slot(self) -> int:
        """A free address slot, held until the agent is born or its birth fails (no await in between).

        Slots are handed out round robin, the least recently used first: an
        address just freed is the last to be given again, so a late packet
        or a remote node's memory of the old agent meets no new one.
        """
        used = {a.slot for a in self.local.values()} | self._reserved
        capacity = self.block.agent_capacity
        for step in range(1, capacity + 1):
            slot = (self._last_slot + step) % capacity
            if slot not in used:
                self._reserved.add(slot)
                self._last_slot = slot
                return slot
        raise Exhausted(f"all {capacity} agent addresses of {self.block.v4} are in use")

    async def create(self, pid: int, principal: str, scopes: list[str], ttl: timedelta, name: str | None,
                     user: tuple[int, int] | None = None, grant: str | None = None,
                     exited: Callable[[], bool] = lambda: False) -> LocalAgent:
        """Make process ``pid`` an agent; a caller already inside an agent makes a sub-agent of it.

        Births run concurrently: only the address slot is taken in order
        (synchronously, on the event loop), so twenty callers wait for the
        controller together, not one after another; each birth's own disk
        and cgroup work overlaps its controller round trip. The key is made here
        per agent: Ed25519 generation and the CSR cost ~0.06 ms, so a pool
        of ready keys would buy nothing.

        ``exited`` says whether the process that asked is gone (a pidfd's
        answer): checked after it was moved into the agent's cgroup, because
        a pid number whose process died may already be a stranger's, who
        must not be given the identity.
        """
        parent, home = self._cgroup_of(pid)
        steps = _Steps()
        slot = self._reserve_slot()
        ipv4, ipv6 = (str(a) for a in self.block.agent_address(slot))
        staged = f"pending-{slot}"  # the agent's directory until its certificate names it
        issued: AgentIssued | None = None
        staging: asyncio.Future[None] | None = None
        try:
            key = ed25519.Ed25519PrivateKey.generate()
            body = {"csr": build_csr(key), "name": name or "agent", "principal": principal, "scopes": scopes,
                    "ttl_seconds": int(ttl.total_seconds()), "parent": parent, "ipv4": ipv4, "ipv6": ipv6,
                    "grant": grant}
            steps.done("key")
            # While the controller signs: the key and CA on disk, the caller in a cgroup of its own.
            staging = asyncio.ensure_future(asyncio.to_thread(self._stage, staged, ipv4, key, pid, user))
            try:
                issued = AgentIssued.model_validate(await self.controller.call("POST", "/v1/agents", body))
            finally:
                await asyncio.wait([staging])
            steps.done("certificate")
            _valid_here(issued.certificate)
            staging.result()
            agent_id = issued.agent.id
            agent = LocalAgent(agent_id, slot, issued, self.directory / agent_id, issued.agent.expires)
            cgroup = await asyncio.to_thread(self._set_up, agent, staged, user, steps)
        except BaseException as exc:
            await self._unwind(staged, ipv4, pid, home, staging, issued)
            self._reserved.discard(slot)
            if isinstance(exc, OSError):
                raise InvalidInput(f"could not set up agent for {principal}: {exc.strerror or exc}") from exc
            raise
        self.local[agent_id] = agent
        self._reserved.discard(slot)
        if exited():
            await self.end(agent_id, "failed to start")
            raise InvalidInput(f"the process that asked for agent {agent_id} exited before it became one")
        agent.moved = True
        self._watch_cgroup(agent_id, cgroup)
        self._on_change(issued)  # the node honors its own agent at once, before the controller echoes it
        log.info("agent %s (%s for %s, %s) born at %s/%s%s in %s", agent_id, issued.agent.name, principal,
                 " ".join(scopes), ipv4, ipv6, f", sub-agent of {parent}" if parent else "", steps)
        return agent

    def _stage(self, staged: str, ipv4: str, key: ed25519.Ed25519PrivateKey, pid: int,
               user: tuple[int, int] | None) -> None:
        """What needs no certificate: the agent's directory with its key and the CA; the caller's cgroup."""
        directory = self.directory / staged
        directory.mkdir(mode=0o700)
        write_private(directory / "agent.key", key_pem(key), durable=False)
        shutil.copyfile(self.ca_cert, directory / "ca.crt")
        if user is not None:
            for path in (directory, *directory.iterdir()):
                os.chown(path, *user)
        self.net.stage(ipv4, pid)

    def _set_up(self, agent: LocalAgent, staged: str, user: tuple[int, int] | None, steps: _Steps) -> Path:
        """The rest, with the certificate: files renamed to the agent's id, its nftables entries; its cgroup."""
        (self.directory / staged).rename(agent.directory)
        cert = agent.directory / "agent.crt"
        write_private(cert, agent.issued.certificate, 0o644, durable=False)
        if user is not None:
            os.chown(cert, *user)
        steps.done("files")
        a = agent.issued.agent
        return Path(self.net.add(agent.id, a.addresses[0], a.addresses[1], steps.done, staged=True).cgroup)

    async def _unwind(self, staged: str, ipv4: str, pid: int, home: str, staging: asyncio.Future[None] | None,
                      issued: AgentIssued | None) -> None:
        """A birth that failed before the agent was whole: the caller back home, files gone, the controller told."""
        if staging is not None and staging.done() and not staging.cancelled() and staging.exception() is None:
            try:
                await asyncio.to_thread(self.net.unstage, ipv4, pid, home)
            except IdmeshError as exc:
                log.error("a failed birth at %s left its cgroup: %s", ipv4, exc)
        for leftover in (self.directory / staged, *([self.directory / issued.agent.id] if issued else [])):
            shutil.rmtree(leftover, ignore_errors=True)
        if issued is not None:
            try:
                await self.controller.call("DELETE", f"/v1/agents/{issued.agent.id}")
            except IdmeshError as exc:
                log.warning("could not tell the controller agent %s never started: %s", issued.agent.id, exc)

    def agent_of_pid(self, pid: int) -> str | None:
        """The local agent whose cgroup holds ``pid``: its whole cgroup v2 path must be the agent's."""
        return self._cgroup_of(pid)[0]

    def _cgroup_of(self, pid: int) -> tuple[str | None, str]:
        """The local agent ``pid`` belongs to (None: none), and its cgroup v2 path as ``/proc`` names it."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError as exc:
            raise NotFound(f"process {pid} is gone") from exc
        for line in lines:
            if line.startswith("0::"):
                agent = self.net.agent_of_cgroup(line[3:])
                return (agent if agent in self.local else None), line[3:]
        return None, "/"

    async def end(self, agent_id: str, reason: str, tell_controller: bool = True) -> None:
        agent = self.local.get(agent_id)
        if agent is None or agent.ended:
            return
        agent.ended = True
        try:
            await asyncio.to_thread(self.net.remove, agent_id)
        except IdmeshError as exc:
            log.error("cleaning up agent %s: %s", agent_id, exc)
        shutil.rmtree(agent.directory, ignore_errors=True)
        self.local.pop(agent_id, None)
        self.on_end(agent_id)
        for watch in [w for w, a in self._watches.items() if a == agent_id]:
            del self._watches[watch]  # the kernel dropped it with the cgroup
        log.info("agent %s ended: %s", agent_id, reason)
        self._on_change(None)
        if tell_controller:
            self._reserved.add(agent.slot)  # the controller holds the address until it hears of the end
            try:
                await self.controller.call("DELETE", f"/v1/agents/{agent_id}")
            except IdmeshError as exc:  # it expires on every node anyway; say so and go on
                log.warning("could not tell the controller agent %s ended: %s", agent_id, exc)
            finally:
                self._reserved.discard(agent.slot)

    async def retire_leftovers(self, retry_every: float = 5.0) -> None:
        """Tell the controller that agents of this node which do not run here have ended.

        After a crash (meshd SIGKILLed, the host rebooted) :meth:`prepare`
        and the cgroups' takeover kill what the last run left, but the
        controller still holds those agents live: other nodes would go on
        honoring identities nobody holds, and their addresses could not be
        given again until they expired. Retried until the controller answers.
        """
        while True:
            try:
                listed = await self.controller.call("GET", "/v1/agents")
                assert isinstance(listed, list)
                # a birth under way holds its slot until it is in self.local: its agent is not a leftover
                busy = {str(self.block.agent_address(slot)[0]) for slot in self._reserved}
                gone = [str(a["id"]) for a in listed if a["id"] not in self.local and a.get("parent") is None
                        and a["addresses"][0] not in busy]
                for agent_id in gone:  # (its sub-agents end with it)
                    try:
                        await self.controller.call("DELETE", f"/v1/agents/{agent_id}")
                    except NotFound:
                        pass  # ended meanwhile
                if gone:
                    log.info("retired %d agent(s) a previous run of this node left: %s", len(gone), " ".join(gone))
                return
            except IdmeshError as exc:
                log.warning("could not retire what a previous run left: %s (again in %g s)", exc, retry_every)
                await asyncio.sleep(retry_every)

    async def reconcile(self) -> None:
        """End the local agents the controller no longer holds live (it ended them while this node was not
        listening: a stream that was down, or resynced after falling behind, carries no revocation).

        The controller's whole agent list says nothing of an agent born after
        it was built, so the question is asked afresh, and only of the agents
        that were already here when it was asked: each of those was committed
        at the controller before, so its absence from the answer is its end.
        """
        here = [agent_id for agent_id, agent in self.local.items() if not agent.ended]
        if not here:
            return
        try:
            listed = await self.controller.call("GET", "/v1/agents")
        except IdmeshError as exc:
            log.warning("could not check this node's agents with the controller: %s (next whole list)", exc)
            return
        assert isinstance(listed, list)
        live = {str(a["id"]) for a in listed}
        for agent_id in here:
            if agent_id not in live:
                await self.end(agent_id, "ended at the controller while this node was not listening",
                               tell_controller=False)

    async def revoked(self, ids: tuple[str, ...] | list[str]) -> None:
        """The controller revoked these: kill what runs, clean up, no need to tell it back."""
        for agent_id in ids:
            if agent_id in self.local:
                await self.end(agent_id, "revoked", tell_controller=False)

    async def watch(self) -> None:
        """End agents whose processes are all gone, or whose identity expired (own clock).

        The kernel says when an agent's cgroup empties (``cgroup.events``
        through inotify), so an agent that exits is retired at once and its
        address is free for the next birth; a poll every
        :data:`WATCH_INTERVAL` enforces expiry and is the backstop. Ends run
        side by side, each waiting for the controller on its own.
        """
        with Inotify() as inotify:
            self._inotify = inotify
            poll = asyncio.ensure_future(self._poll())
            try:
                async for event in inotify:
                    agent_id = self._watches.get(event.watch) if event.watch is not None else None
                    if agent_id is not None and Mask.MODIFY in event.mask:
                        self._check_empty([agent_id])
            finally:
                self._inotify = None
                poll.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = datetime.now(UTC)
            live = [a for a in self.local.values() if a.moved and not a.ended]
            for agent in live:
                if now >= agent.not_after:
                    self._end_soon(agent.id, "expired")
            self._check_empty([a.id for a in live if now < a.not_after])

    def _check_empty(self, ids: list[str]) -> None:
        """Retire those of ``ids`` whose cgroup has no process left (one worker-thread hop for all)."""
        async def check() -> None:
            empty = await asyncio.to_thread(self._empty, ids)
            for agent_id in empty:
                self._end_soon(agent_id, "its processes exited")
        if ids:
            self._spawn(check())

    def _empty(self, ids: list[str]) -> list[str]:
        out = []
        for agent_id in ids:
            try:
                if not self.net.populated(agent_id):
                    out.append(agent_id)
            except NotFound:
                pass  # ended meanwhile
        return out

    def _end_soon(self, agent_id: str, reason: str) -> None:
        agent = self.local.get(agent_id)
        if agent is not None and not agent.ended:
            self._spawn(self.end(agent_id, reason))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    def _watch_cgroup(self, agent_id: str, cgroup: Path) -> None:
        if self._inotify is not None:
            try:
                self._watches[self._inotify.add_watch(cgroup / "cgroup.events", Mask.MODIFY)] = agent_id
            except OSError as exc:  # the poll still sees it go
                log.warning("agent %s: cannot watch %s/cgroup.events: %s", agent_id, cgroup, exc.strerror)

    async def close(self) -> None:
        for agent_id in list(self.local):
            await self.end(agent_id, "meshd stopped")
        await self._tasks.close()
