"""This host's underlay addresses: the endpoint candidates meshd reports."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute  # type: ignore[import-untyped]

__all__ = ["local_endpoints"]


def local_endpoints(listen_port: int, skip_ifname: str, overlay: tuple[str, ...]) -> tuple[str, ...]:
    """Global unicast addresses of the other interfaces, as ``ip:port``.

    Loopback, link-local and the overlay are left out: no peer could send
    a tunnel packet to them.
    """
    nets = [ipaddress.ip_network(p) for p in overlay]
    out: list[str] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_addr():
            if names.get(msg["index"]) in (skip_ifname, "lo"):
                continue
            ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if ip.is_loopback or ip.is_link_local or ip.is_multicast or any(ip in n for n in nets):
                continue
            out.append(f"[{ip}]:{listen_port}" if ip.version == 6 else f"{ip}:{listen_port}")
    # IPv4 first: it crosses more networks; then stable order for stable reports.
    return tuple(sorted(out, key=lambda e: (e.startswith("["), e)))
