"""LAN discovery with mDNS/DNS-SD (zeroconf): ``_idmesh._udp.local.``

Each node announces its WireGuard public key and listen port; peers found
on the local link are tried first (see :func:`meshd.mesh.peers.choose_endpoint`).
Discovery only proposes endpoints. Who a key belongs to, and whether it is a
member at all, comes from the controller-signed netmap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from idmesh.tasks import Tasks

__all__ = ["SERVICE", "LanDiscovery", "start_discovery"]

SERVICE = "_idmesh._udp.local."
log = logging.getLogger("meshd.mesh.discovery")


class LanDiscovery:
    def __init__(self, node: str, public_key: str, port: int, addresses: list[str],
                 on_change: Callable[[str], None]) -> None:
        self.node = node
        self.public_key = public_key
        self.port = port
        self.addresses = addresses
        self.found: dict[str, str] = {}  # WireGuard public key -> ip:port
        self._subnets: list[ipaddress.IPv4Network] = []
        self._on_change = on_change
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks = Tasks(log)

    async def start(self) -> None:
        self._subnets = await asyncio.to_thread(_connected_subnets)
        # Announce and listen on the underlay only: never through the mesh interface itself.
        underlay: list[str | int | tuple[tuple[str, int, int], int]] = [
            a for a in self.addresses if ipaddress.ip_address(a).version == 4]
        self._zc = AsyncZeroconf(interfaces=underlay or InterfaceChoice.All, ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE, f"{self.node}.{SERVICE}", port=self.port,
            properties={"pk": self.public_key, "v": "1"},
            parsed_addresses=[a for a in self.addresses if ipaddress.ip_address(a).version == 4],
        )
        await self._zc.async_register_service(self._info, allow_name_change=True)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE, handlers=[self._changed])

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        # Resolution needs a round trip; keep the task so stop() can cancel it (no orphans).
        self._tasks.spawn(self._resolve(service_type, name))

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        key = (info.properties or {}).get(b"pk")
        addrs = info.parsed_addresses(IPVersion.V4Only)
        if not key or not addrs or not info.port or key.decode() == self.public_key:
            return
        # A peer on several networks announces all its addresses: take one on a network we are on too
        # (an exit node's outside address is no use to its neighbours on the LAN).
        near = [a for a in addrs if any(ipaddress.ip_address(a) in net for net in self._subnets)]
        endpoint = f"{(near or addrs)[0]}:{info.port}"
        if self.found.get(key.decode()) != endpoint:
            self.found[key.decode()] = endpoint
            log.info("found %s on the local link at %s", name, endpoint)
            self._on_change(key.decode())

    async def stop(self) -> None:
        await self._tasks.close()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()


def _connected_subnets() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks this host has an address on (pyroute2 blocks: call it off the event loop)."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        return [ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}").network  # type: ignore[misc]
                for msg in ipr.get_addr(family=socket.AF_INET)]


async def start_discovery(node: str, public_key: str, port: int, endpoints: Iterable[str],
                          on_change: Callable[[str], None]) -> LanDiscovery | None:
    """Announce this node on the LAN of its IPv4 ``endpoints`` (``ip:port``) and listen for others.

    mDNS probing takes a second or more, so the daemon runs this beside
    everything else, never before it. None when the host has no multicast:
    discovery is an optimisation, the controller's endpoints still work.
    """
    underlay = [e.rsplit(":", 1)[0] for e in endpoints if not e.startswith("[")]
    discovery = LanDiscovery(node, public_key, port, underlay, on_change)
    try:
        await discovery.start()
    except (OSError, RuntimeError) as exc:
        log.warning("LAN discovery unavailable: %s", exc)
        return None
    return discovery
