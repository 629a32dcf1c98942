"""Deploy every host of an inventory, concurrently; each host's outcome is its own.

:func:`deploy_all` runs one task per host in a TaskGroup (at most
``parallel`` at a time). A host's task never raises: whatever goes wrong on
it (SSH, the plan, a step, the controller) becomes a failed
:class:`HostResult` naming the step and the reason, and the other hosts go
on. Tokens are made only for hosts whose plan enrolls, one per host,
single-use, with the host's tags or owner, and deleted again if the
enrollment fails.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshcore.errors import IdmeshError
from meshcore.identity import fingerprint, load_certificate
from meshcore.wire.api import NodeInfo, TokenCreated, TokenCreateRequest

from .artifacts import Artifacts, Wheel
from .inventory import HostSpec
from .plan import Desired, HostFacts, HostFailure, Plan, PlanError, Step, plan_host
from .progress import LiveProgress, Progress, Row
from .ssh import RemoteHost
from .units import render_meshd_unit

__all__ = ["Admin", "ControllerAdmin", "DeployOptions", "HostResult", "deploy_all", "deploy_host", "summarize"]

TOKEN_TTL_SECONDS = 600


class Admin(Protocol):
    """What deploy needs from the controller (real: :class:`ControllerAdmin`)."""

    ca_fingerprint: str

    async def nodes(self) -> dict[str, str]:
        """Node name -> WireGuard public key."""
        ...

    async def create_token(self, tags: tuple[str, ...], owner: str | None) -> tuple[str, str]:
        """A single-use token: ``(id, token line)``."""
        ...

    async def delete_token(self, token_id: str) -> None: ...


class ControllerAdmin:
    """The admin credential's controller client, called from threads (it is synchronous)."""

    def __init__(self, credential: Any) -> None:
        self.ca_fingerprint = fingerprint(load_certificate(credential.ca))
        self._client = credential.client()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        with self._lock:
            return self._client.request(method, path, body)

    async def nodes(self) -> dict[str, str]:
        listed = await asyncio.to_thread(self._request, "GET", "/v1/nodes")
        return {n.name: n.wireguard_public_key for n in (NodeInfo.model_validate(x) for x in listed)}

    async def create_token(self, tags: tuple[str, ...], owner: str | None) -> tuple[str, str]:
        body = TokenCreateRequest(tags=list(tags), owner=owner, ttl_seconds=TOKEN_TTL_SECONDS, reusable=False)
        created = TokenCreated.model_validate(
            await asyncio.to_thread(self._request, "POST", "/v1/tokens", body.model_dump()))
        return created.id, created.token

    async def delete_token(self, token_id: str) -> None:
        await asyncio.to_thread(self._request, "DELETE", f"/v1/tokens/{token_id}")


Connect = Callable[[HostSpec], AbstractAsyncContextManager[RemoteHost]]


@dataclass
class DeployOptions:
    artifacts: Artifacts
    admin: Admin
    connect: Connect
    progress: Progress
    unit_template: str | None = None
    """meshd.service as in systemd/ (needed when a host has ``service: systemd``)."""
    parallel: int = 8
    dry_run: bool = False


@dataclass
class HostResult:
    host: str
    target: str
    ok: bool
    status: str
    """``installed``, ``updated``, ``unchanged``, ``planned`` (--dry-run) or ``failed``."""
    summary: str
    actions: list[str] = field(default_factory=list)
    step: str | None = None
    """The step that failed."""
    reason: str | None = None
    node: dict[str, Any] | None = None
    pid: int | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "target": self.target, "ok": self.ok, "status": self.status,
                "changed": self.status in ("installed", "updated"), "actions": self.actions,
                "summary": self.summary, "step": self.step, "reason": self.reason, "node": self.node,
                "meshd_pid": self.pid, "seconds": round(self.seconds, 2)}


async def deploy_all(hosts: tuple[HostSpec, ...], opts: DeployOptions) -> list[HostResult]:
    project = await asyncio.to_thread(opts.artifacts.project)
    controller_nodes = await opts.admin.nodes()
    opts.progress.start([Row(h.name, h.target) for h in hosts])
    limit = asyncio.Semaphore(max(1, opts.parallel))
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(deploy_host(h, opts, project, controller_nodes, limit)) for h in hosts]
            if isinstance(opts.progress, LiveProgress):
                group.create_task(opts.progress.tick())
    finally:
        opts.progress.close()
    return [t.result() for t in tasks]


async def deploy_host(spec: HostSpec, opts: DeployOptions, project: Wheel, controller_nodes: Mapping[str, str],
                      limit: asyncio.Semaphore) -> HostResult:
    """One host, start to end; never raises (except cancellation)."""
    started = time.monotonic()
    current = "connect"
    done: list[str] = []
    node: dict[str, Any] | None = None

    def step(name: str, text: str) -> None:
        nonlocal current
        current = name
        opts.progress.update(spec.name, text)

    def finish(result: HostResult) -> HostResult:
        result.seconds = time.monotonic() - started
        opts.progress.done(spec.name, result.ok, result.summary)
        return result

    try:
        async with limit:
            step("connect", "connecting")
            async with opts.connect(spec) as remote:
                step("probe", "checking what is installed")
                facts = HostFacts.from_probe(await remote.probe())
                if facts.node is not None:
                    node = {"name": facts.node.name, "addresses": list(facts.node.addresses)}
                current = "plan"
                want = Desired(
                    node_name=spec.node_name, service=spec.service, version=project.version, digest=project.digest,
                    ca_fingerprint=opts.admin.ca_fingerprint, state=spec.state,
                    unit_text=_unit_text(spec, opts) if spec.service == "systemd" else None,
                    controller_nodes=controller_nodes,
                )
                plan = plan_host(facts, want)
                if opts.dry_run:
                    what = ", ".join(s.value for s in plan.steps) or "nothing"
                    return finish(HostResult(spec.name, spec.target, True, "planned", f"would do: {what}",
                                             [s.value for s in plan.steps], node=node, pid=facts.meshd_pid))
                pid = facts.meshd_pid
                for s in plan.steps:
                    if s in (Step.INSTALL, Step.UPGRADE):
                        step(s.value, "collecting wheels")
                        wheels = await opts.artifacts.uploads()
                        size = sum(w.stat().st_size for w in wheels) / 1e6
                        step(s.value, f"uploading {len(wheels)} wheels ({size:.0f} MB) and installing")
                        await remote.install(wheels, project, venv_exists=facts.venv)
                    elif s is Step.UNIT:
                        step(s.value, "installing meshd.service")
                        await remote.install_unit(want.unit_text or "")
                    elif s in (Step.ENROLL, Step.REENROLL):
                        node = await _enroll(spec, opts, remote, step, force=s is Step.REENROLL)
                    elif s in (Step.START, Step.RESTART):
                        step(s.value, "restarting meshd" if s is Step.RESTART else "starting meshd")
                        pid = await remote.start(restart=s is Step.RESTART)
                    done.append(s.value)
                return finish(_success(spec, plan, project, node, pid))
    except HostFailure as exc:
        reason, where = str(exc), ("plan" if isinstance(exc, PlanError) else current)
    except IdmeshError as exc:  # the controller (tokens) or a local problem
        reason, where = str(exc), current
    except Exception as exc:  # noqa: BLE001 — one host's bug must not take the others down
        reason, where = f"internal error: {type(exc).__name__}: {exc}", current
    return finish(HostResult(spec.name, spec.target, False, "failed", f"{where}: {reason}", done, where, reason,
                             node))


def _unit_text(spec: HostSpec, opts: DeployOptions) -> str:
    if opts.unit_template is None:
        raise HostFailure("no meshd.service to install (systemd/meshd.service not found: pass --source)")
    return render_meshd_unit(opts.unit_template, install_dir=spec.install_dir, state=spec.state,
                             socket=spec.socket, interface=spec.interface)


async def _enroll(spec: HostSpec, opts: DeployOptions, remote: RemoteHost, step: Callable[[str, str], None],
                  *, force: bool) -> dict[str, Any]:
    step("token", "creating an enrollment token")
    token_id, token = await opts.admin.create_token(spec.tags, spec.owner)
    step("enroll", "enrolling")
    try:
        record = await remote.enroll(token, force=force)
    except BaseException:
        try:
            await opts.admin.delete_token(token_id)  # unused: do not leave it valid
        except IdmeshError:
            pass
        raise
    return {"name": record.get("name"), "addresses": list(record.get("addresses", []))}


_DONE = {
    Step.INSTALL: "installed idmesh {version}",
    Step.UPGRADE: "upgraded idmesh to {version}",
    Step.UNIT: "meshd.service installed",
    Step.ENROLL: "enrolled as {node}",
    Step.REENROLL: "enrolled again as {node}",
    Step.START: "meshd started{pid}",
    Step.RESTART: "meshd restarted{pid}",
}


def _success(spec: HostSpec, plan: Plan, project: Wheel, node: dict[str, Any] | None,
             pid: int | None) -> HostResult:
    name = (node or {}).get("name") or spec.node_name
    addresses = (node or {}).get("addresses") or []
    values = {"version": project.version, "node": f"{name} ({addresses[0]})" if addresses else name,
              "pid": f" (pid {pid})" if pid else ""}
    parts = [_DONE[s].format(**values) for s in plan.steps]
    if Step.INSTALL in plan:
        status = "installed"
    elif plan.changed:
        status = "updated"
    else:
        status = "unchanged"
    notes = [n for n in plan.notes if not (plan.changed and n.startswith("meshd running"))]
    summary = "; ".join(parts + notes) if plan.changed else "unchanged: " + "; ".join(notes)
    return HostResult(spec.name, spec.target, True, status, summary, [s.value for s in plan.steps], node=node,
                      pid=pid)


def summarize(results: list[HostResult]) -> str:
    failed = [r for r in results if not r.ok]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    order = ["installed", "updated", "unchanged", "planned", "failed"]
    text = ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
    return f"{len(results)} host(s): {text}" + (f"; failed: {', '.join(r.host for r in failed)}" if failed else "")
