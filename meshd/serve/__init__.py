"""Identity at the application layer: ``meshctl serve`` (SPEC.md §9).

meshd terminates HTTP arriving over the mesh at a served port, decides each
request with the policy (the acls' ``http`` and ``mcp_tools``,
:mod:`meshcore.policy.requests`) and forwards allowed ones to the upstream
with the caller's verified identity (:mod:`.proxy`), signed in an
``Idmesh-Assertion`` (:mod:`.assertions`). The served ports are kept in the
state directory (:mod:`.entries`); each has its own listener (:mod:`.listeners`).

:class:`Serves` is what the daemon holds: the list and the running
listeners, kept in step. A port whose listener cannot start (its address and
port taken by another process) stays in the list with its error, so
``meshctl serve list`` says why, and is left out of the ports the firewall
admits for narrowed rules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from meshcore.errors import Conflict, IdmeshError
from meshcore.wire.local import ServeInfo
from meshd.serve.entries import ServeEntry, ServeList, check_name, check_upstream
from meshd.serve.listeners import Listener
from meshd.serve.proxy import ServeContext

__all__ = ["Serves"]

log = logging.getLogger("meshd.serve")


class Serves:
    def __init__(self, path: Path, addresses: tuple[str, ...], ctx: ServeContext,
                 ports_changed: Callable[[frozenset[int]], None]) -> None:
        self.list = ServeList(path)
        self._addresses = addresses
        self._ctx = ctx
        self._ports_changed = ports_changed
        self._running: dict[int, Listener] = {}
        self._errors: dict[int, str] = {}

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(self._running)

    @property
    def mcp_ports(self) -> tuple[int, ...]:
        """The served ports marked MCP (``serve --mcp``), told to the mesh with the node's endpoints."""
        return tuple(sorted(p for p, e in self.list.entries.items() if e.mcp and p in self._running))

    async def start(self) -> None:
        """Every saved serve; one that cannot start is logged and listed with its error."""
        for entry in self.list.entries.values():
            try:
                self._launch(entry)
            except IdmeshError as exc:
                log.warning("serve %d: %s", entry.port, exc)
        self._ports_changed(self.ports)

    def _launch(self, entry: ServeEntry) -> None:
        self._errors.pop(entry.port, None)
        try:
            listener = Listener(entry, self._addresses, self._ctx)
        except Conflict as exc:
            self._errors[entry.port] = str(exc)
            raise
        listener.start()
        self._running[entry.port] = listener
        log.info("serving port %d: to %s as %s", entry.port, entry.upstream, entry.name)

    async def put(self, port: int, to: str, name: str | None, mcp: bool = False) -> ServeInfo:
        """Serve ``port`` (replacing what it served): listening before this returns, kept across restarts."""
        entry = ServeEntry(port=port, upstream=check_upstream(to), name=check_name(name or f"{self._ctx.node}-{port}"),
                           mcp=mcp)
        old = self._running.pop(port, None)
        if old is not None:
            await old.stop()
        try:
            self._launch(entry)
        finally:
            self._ports_changed(self.ports)
        self.list.put(entry)
        return self.info(entry)

    async def remove(self, port: int) -> ServeEntry | None:
        entry = self.list.remove(port)
        listener = self._running.pop(port, None)
        self._errors.pop(port, None)
        if listener is not None:
            await listener.stop()
            self._ports_changed(self.ports)
        return entry

    def info(self, entry: ServeEntry) -> ServeInfo:
        running = entry.port in self._running
        return {"port": entry.port, "to": entry.upstream, "name": entry.name, "mcp": entry.mcp,
                "listening": [f"[{a}]:{entry.port}" if ":" in a else f"{a}:{entry.port}" for a in self._addresses]
                if running else [], "error": self._errors.get(entry.port)}

    def infos(self) -> list[ServeInfo]:
        return [self.info(e) for e in sorted(self.list.entries.values(), key=lambda e: e.port)]

    async def close(self) -> None:
        for listener in self._running.values():
            await listener.stop()
        self._running.clear()
