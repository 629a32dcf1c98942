"""What a host needs, decided from what it has: pure functions, no I/O.

:func:`plan_host` compares :class:`HostFacts` (probed on the host by
:mod:`deploy.remote`) with :class:`Desired` (the wheel, the mesh, the
inventory) and returns the steps to run, in order, with a note for each
thing that is already right. A host that cannot be deployed as asked (too
old a Python, enrolled in another mesh, no systemd for ``service: systemd``)
raises :class:`PlanError` with the reason, and nothing is changed on it.

Idempotence lives here: a host with the same wheel content, enrolled in this
mesh (its node.json's CA fingerprint is the admin credential's, and the
controller still knows the node with the same WireGuard key) and a running
meshd gets an empty plan — in particular no enrollment, so no token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["MIN_PYTHON", "Desired", "HostFacts", "HostFailure", "NodeFacts", "Plan", "PlanError", "Step", "plan_host"]

MIN_PYTHON = (3, 11)


class Step(str, Enum):
    INSTALL = "install"
    """Create the virtual environment if needed and install the wheel and its dependencies."""
    UPGRADE = "upgrade"
    """Another build of idmesh is installed: reinstall the package from this wheel."""
    UNIT = "unit"
    """Write meshd.service (it differs or is missing), reload systemd, enable it."""
    ENROLL = "enroll"
    """Not enrolled: a fresh single-use token, then ``meshd enroll``."""
    REENROLL = "reenroll"
    """Enrolled in this mesh but the controller no longer knows the node (removed): enroll again, new keys."""
    START = "start"
    RESTART = "restart"


class HostFailure(Exception):
    """One host cannot be deployed; ``str()`` is the reason, one line. The other hosts go on."""


class PlanError(HostFailure):
    """The host cannot be deployed as the inventory asks (found before anything was changed on it)."""


@dataclass(frozen=True)
class NodeFacts:
    name: str
    ca_fingerprint: str
    wireguard_public_key: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class HostFacts:
    """What the probe found on the host. ``None`` means absent."""

    python: tuple[int, ...] | None
    ensurepip: bool = True
    systemd: bool = False
    venv: bool = False
    deployed_digest: str | None = None
    deployed_version: str | None = None
    node: NodeFacts | None = None
    node_error: str | None = None
    """node.json exists but cannot be read: the message."""
    meshd_pid: int | None = None
    """process mode: a live ``meshd run`` for this state directory."""
    unit_text: str | None = None
    unit_active: bool = False
    unit_enabled: bool = False

    @classmethod
    def from_probe(cls, doc: Mapping[str, Any]) -> HostFacts:
        """From :func:`deploy.remote.probe`'s JSON."""
        node = doc.get("node")
        deployed = doc.get("deployed") or {}
        return cls(
            python=tuple(doc["python"]) if doc.get("python") else None,
            ensurepip=bool(doc.get("ensurepip", False)),
            systemd=bool(doc.get("systemd", False)),
            venv=bool(doc.get("venv", False)),
            deployed_digest=deployed.get("digest"),
            deployed_version=deployed.get("version"),
            node=NodeFacts(node["name"], node["ca_fingerprint"], node["wireguard_public_key"],
                           tuple(node.get("addresses", ()))) if node else None,
            node_error=doc.get("node_error"),
            meshd_pid=doc.get("pid"),
            unit_text=doc.get("unit_text"),
            unit_active=bool(doc.get("unit_active", False)),
            unit_enabled=bool(doc.get("unit_enabled", False)),
        )


@dataclass(frozen=True)
class Desired:
    node_name: str
    service: str
    """``systemd`` or ``process``."""
    version: str
    digest: str
    """The wheel's content digest (:func:`deploy.artifacts.wheel_digest`)."""
    ca_fingerprint: str
    """The mesh CA's SHA-256, from the admin credential."""
    state: str
    unit_text: str | None = None
    """systemd mode: the rendered meshd.service."""
    controller_nodes: Mapping[str, str] | None = None
    """Node name -> WireGuard public key, as the controller lists them; None if unknown."""


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    notes: tuple[str, ...]
    """What is already right, for the report: "already enrolled as db-1", "meshd running (pid 812)"."""

    @property
    def changed(self) -> bool:
        return bool(self.steps)

    def __contains__(self, step: object) -> bool:
        return step in self.steps


def plan_host(facts: HostFacts, want: Desired) -> Plan:
    steps: list[Step] = []
    notes: list[str] = []
    if facts.python is None:
        raise PlanError("python3 was not found on the host (install python3 and python3-venv)")
    if tuple(facts.python[:2]) < MIN_PYTHON:
        found = ".".join(str(p) for p in facts.python[:3])
        raise PlanError(f"the host has Python {found}; idmesh needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer")
    if want.service == "systemd" and not facts.systemd:
        raise PlanError("the host does not run systemd: set 'service: process' for it in the inventory")

    # the package
    if not facts.venv and not facts.ensurepip:
        raise PlanError("python3 on the host cannot create virtual environments (apt-get install python3-venv)")
    if not facts.venv or facts.deployed_digest is None:
        steps.append(Step.INSTALL)
    elif facts.deployed_digest != want.digest:
        steps.append(Step.UPGRADE)
    else:
        notes.append(f"idmesh {want.version} up to date")

    # the unit
    if want.service == "systemd" and (facts.unit_text != want.unit_text or not facts.unit_enabled):
        steps.append(Step.UNIT)

    # the enrollment
    node = facts.node
    if facts.node_error is not None:
        raise PlanError(f"{facts.node_error}; move {want.state} away to enroll this host again")
    if node is None:
        steps.append(Step.ENROLL)
    elif node.ca_fingerprint != want.ca_fingerprint:
        raise PlanError(f"already enrolled in another mesh (CA sha256:{node.ca_fingerprint[:16]}…, this mesh's is "
                        f"sha256:{want.ca_fingerprint[:16]}…): remove {want.state} on the host to move it")
    elif node.name != want.node_name:
        raise PlanError(f"already enrolled in this mesh as {node.name!r}, but the inventory names it "
                        f"{want.node_name!r}: fix node_name, or remove the node and its state directory")
    elif want.controller_nodes is not None and node.name not in want.controller_nodes:
        steps.append(Step.REENROLL)
        notes.append(f"{node.name} was removed at the controller: enrolling again with new keys")
    elif want.controller_nodes is not None and want.controller_nodes[node.name] != node.wireguard_public_key:
        raise PlanError(f"the controller's node {node.name!r} has another WireGuard key than this host's: "
                        "another host holds this name")
    else:
        where = f" ({node.addresses[0]})" if node.addresses else ""
        notes.append(f"already enrolled as {node.name}{where}")

    # the daemon
    running = facts.meshd_pid is not None if want.service == "process" else facts.unit_active
    if not running:
        steps.append(Step.START)
    elif steps:
        steps.append(Step.RESTART)
    elif facts.meshd_pid is not None:
        notes.append(f"meshd running (pid {facts.meshd_pid})")
    else:
        notes.append("meshd.service active")
    return Plan(tuple(steps), tuple(notes))
