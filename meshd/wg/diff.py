"""The difference between a WireGuard device and the config we want, as a list of operations.

Pure functions, no I/O: the UAPI and netlink back ends render the same
operations. The operations are incremental on purpose. ``replace_peers``
would be simpler, but it deletes every peer and with it every session
(handshake, keys, counters): each netmap change would stall all tunnels of
the node for a round trip. Here a peer that did not change gets no operation
at all, and a changed one gets only its changed fields (``update_only``).

Order: removals, then updates, then additions, each sorted by key. Removing
first frees the prefixes of departed peers; a prefix moving between two
remaining peers converges in either order because every touched peer gets
its full allowed-IP list with ``replace_allowed_ips``.

Endpoints are a hint, not state to enforce: a device learns a peer's current
address from its authenticated packets (roaming), so the live endpoint may
legitimately differ from the one we gave. An endpoint is therefore sent only
when our intent changed (it differs from the endpoint of the previous
``desired``), or, without a previous one, when it differs from the device.

A peer that gets its first endpoint before it ever had a handshake is
removed and added again rather than updated. WireGuard stamps a handshake
as sent even when it could not be sent ("no known endpoint", which the
first keepalive or packet to an endpoint-less peer runs into) and then
waits REKEY_TIMEOUT (5 s) before the next one; a fresh peer has no such
stamp, so its first packet starts the handshake at once. With no
handshake there is no session to lose. (Measured: a node behind NAT whose
peer's address arrived one second after start reached it 4.3 s later;
re-created, within milliseconds.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .model import DeviceConfig, DeviceState, PeerConfig, PeerState

__all__ = [
    "AddPeer",
    "Op",
    "PeerOp",
    "RemovePeer",
    "SetDevice",
    "UpdatePeer",
    "diff_device",
    "diff_peers",
]


@dataclass(frozen=True)
class SetDevice:
    """Change the device itself. None leaves a field unchanged; a new private key resets every session."""

    private_key: str | None = None
    listen_port: int | None = None
    fwmark: int | None = None


@dataclass(frozen=True)
class RemovePeer:
    public_key: str


@dataclass(frozen=True)
class AddPeer:
    """Create a peer with its whole configuration."""

    peer: PeerConfig


@dataclass(frozen=True)
class UpdatePeer:
    """Change fields of an existing peer (never creates one). None leaves a field unchanged.

    ``persistent_keepalive`` 0 turns it off; ``allowed_ips`` replaces the
    peer's whole list (an empty tuple removes them all).
    """

    public_key: str
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    allowed_ips: tuple[str, ...] | None = None


PeerOp = RemovePeer | AddPeer | UpdatePeer
Op = SetDevice | PeerOp


def _update_for(current: PeerState, desired: PeerConfig, last: PeerConfig | None) -> UpdatePeer | None:
    endpoint = None
    if desired.endpoint is not None:
        reference = last.endpoint if last is not None and last.endpoint is not None else current.endpoint
        if desired.endpoint != reference:
            endpoint = desired.endpoint
    keepalive = None
    if (desired.persistent_keepalive or 0) != (current.persistent_keepalive or 0):
        keepalive = desired.persistent_keepalive or 0
    allowed = None
    if set(desired.allowed_ips) != set(current.allowed_ips):
        allowed = desired.allowed_ips
    if endpoint is None and keepalive is None and allowed is None:
        return None
    return UpdatePeer(desired.public_key, endpoint, keepalive, allowed)


def _fresh_start(current: PeerState, desired: PeerConfig) -> bool:
    """The peer's first endpoint, before any handshake: re-create it (see the module docstring)."""
    return current.endpoint is None and current.latest_handshake is None and desired.endpoint is not None


def diff_peers(
    current: Iterable[PeerState],
    desired: Iterable[PeerConfig],
    last: Iterable[PeerConfig] | None = None,
) -> list[PeerOp]:
    """Operations that turn the device's peers ``current`` into ``desired``.

    ``last`` is the previous desired peer list given to this device, if any;
    it only decides whether an endpoint is re-sent (see the module docstring).
    """
    have = {p.public_key: p for p in current}
    want = {p.public_key: p for p in desired}
    before = {p.public_key: p for p in last or ()}
    fresh = {key for key in have.keys() & want.keys() if _fresh_start(have[key], want[key])}
    removals: list[PeerOp] = [RemovePeer(key) for key in sorted((have.keys() - want.keys()) | fresh)]
    updates: list[PeerOp] = []
    for key in sorted((have.keys() & want.keys()) - fresh):
        update = _update_for(have[key], want[key], before.get(key))
        if update is not None:
            updates.append(update)
    additions: list[PeerOp] = [AddPeer(want[key]) for key in sorted((want.keys() - have.keys()) | fresh)]
    return removals + updates + additions


def peer_changes(known: Mapping[str, PeerConfig], upsert: Iterable[PeerConfig],
                 remove: Iterable[str]) -> list[PeerOp]:
    """Operations for just these peers, relative to what was last applied (``known``).

    The incremental path: its cost follows the change, not the device, so
    one node joining a 10,000-peer mesh costs one operation, not a read of
    10,000 peers. An endpoint is sent only when the desired one changed, as
    in :func:`diff_peers`, so a roamed peer keeps the endpoint it roamed to.
    Without reading the device a handshake cannot be seen, so a peer whose
    first endpoint this is gets re-created whenever we never gave it one: if
    it had roamed in, that costs one handshake, once.
    """
    ops: list[PeerOp] = [RemovePeer(key) for key in sorted(set(remove)) if key in known]
    for peer in upsert:
        old = known.get(peer.public_key)
        if old is None:
            ops.append(AddPeer(peer))
        elif old.endpoint is None and peer.endpoint is not None:
            ops += [RemovePeer(peer.public_key), AddPeer(peer)]
        elif old != peer:
            ops.append(UpdatePeer(
                peer.public_key,
                endpoint=peer.endpoint if peer.endpoint is not None and peer.endpoint != old.endpoint else None,
                persistent_keepalive=(peer.persistent_keepalive or 0)
                if (peer.persistent_keepalive or 0) != (old.persistent_keepalive or 0) else None,
                allowed_ips=peer.allowed_ips if set(peer.allowed_ips) != set(old.allowed_ips) else None,
            ))
    return ops


def diff_device(current: DeviceState, desired: DeviceConfig, last: DeviceConfig | None = None) -> list[Op]:
    """Operations that turn the whole device into ``desired``: a :class:`SetDevice` if needed, then the peers."""
    private_key = desired.private_key if current.public_key != desired.public_key else None
    port = desired.listen_port if desired.listen_port and desired.listen_port != current.listen_port else None
    fwmark = desired.fwmark if desired.fwmark != current.fwmark else None
    ops: list[Op] = []
    if private_key is not None or port is not None or fwmark is not None:
        ops.append(SetDevice(private_key, port, fwmark))
    ops.extend(diff_peers(current.peers, desired.peers, last.peers if last is not None else None))
    return ops
