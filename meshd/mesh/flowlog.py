"""The identity flow log: who a logged connection came from, shipped to the controller.

The firewall (:mod:`meshd.mesh.firewall`) copies denied packets (up to 20/s) and a
sample of accepted new connections (up to 2/s per rule) to an NFLOG group.
A reader thread takes them (:mod:`meshd.kernel.nflog`); on the event loop each one
becomes a record with the full identity tuple of its source — the agent
(principal, agent, scopes) or the node (its owner) the address belongs to,
as this node verified it — and every second the records go to the controller
in one batch. At most :data:`BUFFER` wait while the controller is away;
older ones are dropped first (the counters in metrics keep the totals).

The agents table (:mod:`meshd.agents.table`) logs to the same group the new
connections this node's processes that are not agents open to a peer's MCP
port (``meshctl serve --mcp``), with the socket's uid: shadow MCP, reported
by the node it comes from, naming the local user.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from meshcore.errors import IdmeshError
from meshcore.wire.api import FlowBatch, FlowReport
from meshd.kernel.nflog import LoggedPacket, NflogSocket
from meshd.mesh.firewall import FLOW_GROUP

__all__ = ["BUFFER", "FlowLog"]

log = logging.getLogger("meshd.mesh.flowlog")
BUFFER = 2000


class FlowLog:
    def __init__(self, whois: Callable[[str], Mapping[str, Any]], ship: Callable[[str, str, object], Any]) -> None:
        self._whois = whois
        self._ship = ship
        self.pending: deque[FlowReport] = deque(maxlen=BUFFER)
        self.denied: Counter[str] = Counter()  # logged denials by identity class: agent, node, unknown
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: NflogSocket | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._socket = NflogSocket(FLOW_GROUP)
        sock = self._socket

        def read() -> None:
            while not self._stop.is_set():
                try:
                    packets = sock.receive(0.5)
                except IdmeshError as exc:
                    log.warning("flow log: %s", exc)
                    continue
                if packets:
                    loop.call_soon_threadsafe(self._record, packets)

        self._thread = threading.Thread(target=read, name="flowlog", daemon=True)
        self._thread.start()

    def _record(self, packets: list[LoggedPacket]) -> None:
        now = datetime.now(UTC)
        for p in packets:
            if p.prefix == "mcp":
                self.pending.append(self._shadow_mcp(p, now))
                continue
            try:
                who: Mapping[str, Any] = self._whois(p.source)
            except IdmeshError:
                who = {}
            denied = p.prefix == "deny"
            if denied:
                self.denied["agent" if who.get("agent") else "node" if who.get("node") else "unknown"] += 1
            rule = "default deny (no rule allows this)" if denied else f"acls[{p.prefix[1:]}]"
            self.pending.append(FlowReport(
                at=now, verdict="deny" if denied else "allow", rule=rule, source=p.source,
                source_node=who.get("node"), principal=who.get("principal"), agent=who.get("agent"),
                scopes=list(who.get("scopes") or []), authorized_by=who.get("authorized_by"),
                destination=p.destination, protocol=p.protocol, port=p.port))

    def _shadow_mcp(self, p: LoggedPacket, now: datetime) -> FlowReport:
        """A process of this node that is no agent opened a connection to a peer's MCP port (the agents
        table logs it as it leaves, with its socket's uid): shadow MCP, with the local user."""
        try:
            to: Mapping[str, Any] = self._whois(p.destination)
        except IdmeshError:
            to = {}
        try:
            me: Mapping[str, Any] = self._whois(p.source)
        except IdmeshError:
            me = {}
        user = None
        if p.uid is not None:
            try:
                user = pwd.getpwuid(p.uid).pw_name
            except KeyError:
                user = f"uid {p.uid}"
        return FlowReport(
            at=now, verdict="allow", kind="shadow-mcp", source=p.source, source_node=me.get("node"),
            principal=me.get("principal"), local_user=user, destination=p.destination, protocol=p.protocol,
            port=p.port, rule=f"a process that is no agent connects to an MCP port of {to.get('node') or 'a peer'}")

    async def ship_forever(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            if not self.pending:
                continue
            batch = list(self.pending)[:1000]
            try:
                # fields at their defaults are left out: a controller older than a field still takes the batch
                await self._ship("POST", "/v1/flows", FlowBatch(flows=batch).model_dump(mode="json",
                                                                                      exclude_defaults=True))
            except IdmeshError as exc:
                log.debug("flow log not shipped yet: %s", exc)
                continue
            for _ in batch:
                if self.pending:
                    self.pending.popleft()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._socket is not None:
            self._socket.close()
