"""The WireGuard driver: one small interface, three back ends, one pure diff.

``open_device(ifname)`` picks the kernel module when the host has it and a
supervised wireguard-go otherwise; both converge a device to a
:class:`DeviceConfig` incrementally (see :mod:`meshd.wg.diff` for why never
``replace_peers``). :class:`FakeWireGuard` speaks the same UAPI text in
memory and prints itself like ``wg showconf`` for tests.

Modules: ``model`` (types, validation), ``diff`` (pure operations), ``uapi``
(text protocol), ``userspace`` (wireguard-go), ``kernel`` (netlink), ``fake``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from .diff import AddPeer, Op, PeerOp, RemovePeer, SetDevice, UpdatePeer, diff_device, diff_peers, peer_changes
from .fake import FakeWireGuard
from .kernel import KernelWireGuard
from .model import (
    DeviceConfig,
    DeviceState,
    PeerConfig,
    PeerState,
    WireGuardDevice,
    generate_private_key,
    public_key_of,
)
from .userspace import WireGuardGo

__all__ = [
    "AddPeer",
    "DeviceConfig",
    "DeviceState",
    "FakeWireGuard",
    "KernelWireGuard",
    "Op",
    "PeerConfig",
    "PeerOp",
    "PeerState",
    "RemovePeer",
    "SetDevice",
    "UpdatePeer",
    "WireGuardDevice",
    "WireGuardGo",
    "diff_device",
    "diff_peers",
    "generate_private_key",
    "kernel_wireguard_available",
    "open_device",
    "peer_changes",
    "public_key_of",
]

Implementation = Literal["auto", "kernel", "wireguard-go"]


def kernel_wireguard_available() -> bool:
    """True if the running kernel has WireGuard loaded, built in, or installed as a loadable module.

    A module that is installed but not loaded is loaded by the kernel on the
    first ``ip link add ... type wireguard``, so it counts.
    """
    if Path("/sys/module/wireguard").is_dir():
        return True
    modules = Path("/lib/modules") / os.uname().release
    for index in ("modules.builtin", "modules.dep"):
        try:
            if "/wireguard.ko" in (modules / index).read_text():
                return True
        except OSError:
            continue
    return False


def open_device(
    ifname: str,
    *,
    implementation: Implementation = "auto",
    on_restart: Callable[[], None] | None = None,
) -> WireGuardDevice:
    """The WireGuard device ``ifname``, started and ready for :meth:`~WireGuardDevice.apply`.

    ``on_restart`` is called after wireguard-go had to be restarted (its
    interface was re-created, so addresses and routes must be applied again);
    the kernel back end never calls it.
    """
    if implementation == "auto":
        implementation = "kernel" if kernel_wireguard_available() else "wireguard-go"
    device: KernelWireGuard | WireGuardGo
    if implementation == "kernel":
        device = KernelWireGuard(ifname)
    else:
        device = WireGuardGo(ifname, on_restart=on_restart)
    device.start()
    return device
