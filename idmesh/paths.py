"""Where idmesh keeps things by default: one place for every command and daemon.

Each default can be overridden by a flag or an environment variable (named
beside it), so several nodes can live on one machine.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ADMIN", "DEFAULT_DATA", "DEFAULT_INTERFACE", "DEFAULT_SOCKET", "DEFAULT_STATE", "DEFAULT_USER_STATE"]

DEFAULT_DATA = "/var/lib/idmesh"
"""The controller's data directory (``--data``, ``IDMESH_DATA``)."""

DEFAULT_ADMIN = f"{DEFAULT_DATA}/admin.conf"
"""The admin credential ``mesh-controller init`` writes (``--admin``, ``IDMESH_ADMIN``)."""

DEFAULT_STATE = "/var/lib/meshd"
"""A node's state directory (``--state``, ``IDMESH_STATE``)."""

DEFAULT_SOCKET = "/run/meshd/meshd.sock"
"""meshd's local API socket (``--socket``, ``IDMESH_SOCKET``)."""

DEFAULT_INTERFACE = "idmesh0"
"""The mesh's WireGuard interface (``--interface``, ``IDMESH_INTERFACE``)."""

DEFAULT_USER_STATE = "~/.config/idmesh"
"""A person's own state (``meshctl login``: principal key and certificate), ``IDMESH_USER_STATE``."""
