"""rtnetlink through pyroute2: the one mapping of its errors, and the link calls the WireGuard back ends need.

Every driver that speaks rtnetlink (addresses and routes, policy routing,
WireGuard links) maps a failed request with :func:`netlink_error`, so a user
reads the same words for the same kernel answer whichever part asked.
"Already gone" is not an error for a delete: close() and the cleanup of
what a crashed run left must be idempotent.
"""

from __future__ import annotations

import errno

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from meshcore.errors import IdmeshError, NotFound, PermissionDenied, Unavailable

__all__ = ["NetlinkError", "create_link", "delete_link", "link_kind", "netlink_error"]


def netlink_error(exc: NetlinkError, what: str) -> IdmeshError:
    """The idmesh error for a failed netlink request; ``what`` names the object involved."""
    if exc.code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{what}: not permitted (needs CAP_NET_ADMIN)")
    if exc.code == errno.ENODEV:
        return NotFound(f"{what}: the interface does not exist")
    if exc.code == errno.ENETDOWN:
        return Unavailable(f"{what}: the interface is down")
    detail = exc.args[-1] if len(exc.args) > 1 else ""
    return Unavailable(f"{what}: {errno.errorcode.get(exc.code, exc.code)} {detail}".rstrip())


def link_kind(ifname: str) -> str | None:
    """None if no such interface in this network namespace, else its kind ("tun", "wireguard", "" if unknown)."""
    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=ifname)
            if not index:
                return None
            (link,) = ipr.get_links(index[0])
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise netlink_error(exc, f"interface {ifname}") from exc
    return str(link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "")


def delete_link(ifname: str) -> None:
    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=ifname)
            if index:
                ipr.link("del", index=index[0])
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise netlink_error(exc, f"deleting interface {ifname}") from exc


def create_link(ifname: str, kind: str) -> None:
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=ifname, kind=kind)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            return
        if exc.code == errno.EOPNOTSUPP:
            raise Unavailable(f"interface {ifname}: the kernel has no {kind} support") from exc
        raise netlink_error(exc, f"creating {kind} interface {ifname}") from exc
