"""How ``meshd run`` was asked to run: one typed, frozen object built from its flags.

Every field is a ``meshd run`` flag (most also an environment variable, see
``meshd run --help``); a default here is the default a user gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from idmesh.paths import DEFAULT_INTERFACE, DEFAULT_SOCKET

__all__ = ["Settings", "WireGuardChoice"]

WireGuardChoice = Literal["auto", "kernel", "wireguard-go"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    state: Path
    """The node's state directory (keys, certificate, cached netmap and policy)."""
    interface: str = DEFAULT_INTERFACE
    """The mesh's WireGuard interface. Unique on the machine: it also names the agents' cgroup
    subtree and the route tunnels (``<interface>r1``, ``<interface>gw``)."""
    socket: Path = Path(DEFAULT_SOCKET)
    """The local API's Unix socket (``meshctl status``, ``whois``, ``agent run``)."""
    workload_socket: Path | None = None
    """The SPIFFE Workload API's Unix socket; None: beside the local API's (``meshd.sock`` ->
    ``meshd-workload.sock``)."""
    listen_port: int = 51820
    """The mesh interface's UDP port."""
    discovery: bool = True
    """Announce and look for peers on the LAN with mDNS."""
    wireguard: WireGuardChoice = "auto"
    """The kernel module if present, else wireguard-go; or one of them by name."""
    metrics: str | None = None
    """``HOST:PORT`` to serve Prometheus metrics on; None: no metrics server."""
    flow_log: bool = True
    """Log denied and sampled accepted connections to the controller."""
    advertise: tuple[str, ...] = ()
    """Prefixes offered to route for the mesh (canonical; an exit node offers 0.0.0.0/0 and ::/0)."""
    gateway_port: int = 51821
    """The gateway interface's UDP port, used only when something is advertised."""
    principal_map: tuple[tuple[int, str], ...] = ()
    """(uid, principal): local users who may start agents for that principal without a grant (root may for
    anyone)."""

    @property
    def workload(self) -> Path:
        return self.workload_socket or self.socket.with_name(f"{self.socket.stem}-workload.sock")
