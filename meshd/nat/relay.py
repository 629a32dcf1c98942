"""A TURN relay for the WireGuard peers that have no direct path (NetBird's WGUDPProxy is the model).

How packets flow, for a relayed peer B of node A::

    A's WireGuard ──udp──► 127.0.0.1:P (A's socket for B) ──ChannelData──► TURN server ──► B's relayed address
    A's WireGuard ◄──udp── 127.0.0.1:P ◄──ChannelData── A's allocation ◄── TURN server ◄── B's relayed address

* One TURN allocation per node (its relayed address is the candidate the
  node reports). Per relayed peer: one UDP socket on 127.0.0.1, connected to
  WireGuard's port (so it hears WireGuard only), whose address is the peer's
  ``endpoint=``; WireGuard sees the peer at 127.0.0.1:P and authenticates it
  as always, and the TURN server sees only WireGuard ciphertext.
* A peer costs one socket, one channel binding (which is also the TURN
  permission for the peer's relayed address) refreshed every 4 minutes, and
  per packet one ``recv`` and one ``send`` in this event loop (1 MiB socket
  buffers: with the default ones a burst lost ~5 % of packets), with a 4-byte
  ChannelData header. No per-packet task, no per-packet lookup but one dict.
* Credentials (TURN REST API, :mod:`meshcore.turn`) expire, and a live
  allocation cannot take new ones (the server answers 441 Wrong Credentials,
  which aioice, dropping the unsigned answer, turns into a 31 s time-out).
  So :meth:`Relay.refresh_credentials` makes a new allocation and breaks the
  old one only once it is unused: every peer is bound on both at once; a
  peer goes on sending through the old allocation until a packet from it
  arrives at the new one (it has then learnt our new relayed address),
  and after ``drain`` seconds at the latest; and since both ends may move
  at once, packets from a peer's previous relayed address are taken until
  one comes from its new address. coturn lets an allocation live
  on past its credential's expiry as long as it is refreshed; other servers
  need not, so we do not rely on it.
* A NAT between the node and the server forgets an idle mapping in 30 s to
  2 min: a Refresh every ``keepalive`` seconds keeps it, and tells whether
  the server still knows the allocation from our address. When the mapping
  was lost anyway (the router rebooted, its NAT changed), the server sees a
  stranger (a new nonce, then 437 Allocation Mismatch; channel bindings get
  400) and drops our ChannelData: the allocation is given up and a new one
  made at once, its relayed address told through ``on_relayed``. A binding
  that fails triggers the same check without waiting for the next one.
* Errors: every call raises :mod:`meshcore.errors` with one line naming the
  TURN server (refused credentials: :class:`PermissionDenied`; no answer,
  refusal, socket errors: :class:`Unavailable`); what fails in the
  background (a refresh, a binding, the allocation lost) is logged in one
  line and counted, and the rest carries on.

aioice supplies the TURN client (allocation, authentication with the
realm and nonce, its refresh, channel binding, deletion); its
``create_turn_endpoint`` transport is not used for the data path because
its ``sendto`` starts one asyncio task per packet and its channel refresh
(500 s, on send only) outlives the 5-minute permission of an idle peer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from aioice import stun
from aioice.turn import TurnClientUdpProtocol

from idmesh.tasks import Tasks
from meshcore.errors import IdmeshError, InvalidInput, NotFound, PermissionDenied, Unavailable

__all__ = ["Address", "PeerCounters", "Relay"]

log = logging.getLogger(__name__)
STOP_WAIT = 1.0
"""How long stopping waits for the TURN server to confirm deletions (a gone server must not hold meshd up)."""

Address = tuple[str, int]
_CHANNEL = struct.Struct("!HH")
_FIRST_CHANNEL, _LAST_CHANNEL = 0x4000, 0x4FFF
_DATA_INDICATION = b"\x00\x17"  # method DATA (0x007), class indication (0x010)
_LOCAL = "127.0.0.1"
_BUFFER = 1 << 20  # a burst of WireGuard packets must not overflow a socket while the event loop is busy


def _enlarge_buffers(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)


@dataclass
class PeerCounters:
    """What went through the relay for one peer, for metrics. ``dropped``: no channel to send it on (yet)."""

    to_peer_packets: int = 0
    to_peer_bytes: int = 0
    from_peer_packets: int = 0
    from_peer_bytes: int = 0
    dropped: int = 0


def _check_address(address: Address, what: str) -> Address:
    host, port = address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise InvalidInput(f"{what} {host!r} is not an IP address") from exc
    if not 0 < int(port) < 65536:
        raise InvalidInput(f"{what} port {port} must be 1-65535")
    return str(ip), int(port)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, stun.TransactionFailed):
        code, reason = exc.response.attributes.get("ERROR-CODE", (0, "error"))
        return f"{code} {reason.strip()}"
    if isinstance(exc, stun.TransactionTimeout | TimeoutError):
        return "no answer"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


class _Allocation(TurnClientUdpProtocol):
    """aioice's TURN client over UDP, with the data path (ChannelData, Data indications) taken over."""

    def __init__(self, relay: Relay, server: Address, username: str, password: str, lifetime: int) -> None:
        super().__init__(server, username=username, password=password, lifetime=lifetime,
                         channel_refresh_time=lifetime)
        self.relay = relay
        self.channels: dict[Address, int] = {}
        self.remotes: dict[int, Address] = {}
        self.lost = False
        self.retired = False

    def datagram_received(self, data: bytes | str, addr: Address) -> None:
        data = cast(bytes, data)
        if len(data) >= 4 and data[0] & 0xC0 == 0x40:  # ChannelData: the hot path
            channel, length = _CHANNEL.unpack_from(data)
            remote = self.remotes.get(channel)
            if remote is not None:
                self.relay._from_peer(self, remote, data[4:4 + length])
            return
        if data[:2] == _DATA_INDICATION:  # before a channel is bound, or from an address without one
            try:
                message = stun.parse_message(data)
            except ValueError:
                return
            if "DATA" in message.attributes and "XOR-PEER-ADDRESS" in message.attributes:
                self.relay._from_peer(self, tuple(message.attributes["XOR-PEER-ADDRESS"]), message.attributes["DATA"])
            return
        super().datagram_received(data, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        super().connection_lost(exc)
        self.relay._lost(self)

    async def bind(self, remote: Address) -> None:
        """Bind (or refresh) a channel to ``remote``; it is also the permission for its IP (RFC 8656 §12)."""
        number = self.channels.get(remote)
        if number is None:
            number = _FIRST_CHANNEL + len(self.channels)
            if number > _LAST_CHANNEL:
                raise Unavailable(f"TURN server {self.relay.server_name}: no channel number left")
        await self.channel_bind(number, remote)
        self.channels[remote] = number
        self.remotes[number] = remote

    def send_to(self, remote: Address, data: bytes) -> bool:
        number = self.channels.get(remote)
        if number is None or self.lost:
            return False
        self.transport.sendto(_CHANNEL.pack(number, len(data)) + data)
        return True

    async def known(self) -> bool:
        """Refresh: False when the server no longer knows this allocation from our address (437), else True.

        A time-out or another error says nothing certain (the server may be
        restarting); the next check asks again.
        """
        if self.lost:
            return False
        request = stun.Message(message_method=stun.Method.REFRESH, message_class=stun.Class.REQUEST)
        request.attributes["LIFETIME"] = self.lifetime
        try:
            await self.request_with_retry(request)
        except stun.TransactionFailed as exc:
            return exc.response.error_code != 437
        except (stun.TransactionTimeout, ConnectionError, OSError):
            return True
        return True


class _PeerSocket(asyncio.DatagramProtocol):
    """The peer's face towards WireGuard: 127.0.0.1:P, connected to WireGuard's port."""

    def __init__(self, relay: Relay, peer: _Peer) -> None:
        self.relay = relay
        self.peer = peer

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._to_peer(self.peer, data)

    def error_received(self, exc: Exception) -> None:  # e.g. ECONNREFUSED while WireGuard restarts
        self.peer.counters.dropped += 1


@dataclass
class _Peer:
    key: str
    remote: Address
    via: _Allocation
    old_remotes: set[Address] = field(default_factory=set)
    transport: asyncio.DatagramTransport | None = None
    counters: PeerCounters = field(default_factory=PeerCounters)

    @property
    def endpoint(self) -> str:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"


class Relay:
    """One node's TURN allocation and the local sockets of its relayed peers. Start, open peers, stop.

    ``server`` is the TURN server's (ip, port); ``username``/``password`` a
    TURN REST credential; ``wireguard_port`` the local WireGuard's listen
    port. ``on_relayed`` is called with the new relayed address when the
    allocation had to be made again after it was lost (the node must report
    the new candidate). Not thread-safe: one event loop owns it.
    """

    def __init__(self, server: Address, username: str, password: str, wireguard_port: int, *,
                 lifetime: int = 600, timeout: float = 10.0, keepalive: float = 15.0, rebind_every: float = 240.0,
                 drain: float = 60.0, on_relayed: Callable[[Address], None] | None = None) -> None:
        self.server = _check_address(server, "TURN server")
        if not 0 < wireguard_port < 65536:
            raise InvalidInput(f"WireGuard port {wireguard_port} must be 1-65535")
        self.server_name = f"{self.server[0]}:{self.server[1]}"
        self._credentials = (username, password)
        self._wireguard = (_LOCAL, wireguard_port)
        self._lifetime, self._timeout, self._keepalive = lifetime, timeout, keepalive
        self._rebind_every, self._drain = rebind_every, drain
        self._on_relayed = on_relayed
        self._current: _Allocation | None = None
        self._draining: dict[_Allocation, float] = {}  # old allocation -> when its peers are moved at the latest
        self._peers: dict[str, _Peer] = {}
        self._by_remote: dict[Address, _Peer] = {}
        self._maintenance: asyncio.Task[None] | None = None
        self._chores = Tasks(log)  # deletions of allocations, under way
        self._checking: asyncio.Lock | None = None
        self.lost_allocations = 0
        self.bytes_sent = self.bytes_received = 0  # WireGuard bytes to and from relayed peers, since start

    # -- the API ---------------------------------------------------------------------------------
    @property
    def relayed(self) -> Address:
        """The relayed address peers send to (the candidate to report)."""
        if self._current is None or self._current.relayed_address is None:
            raise Unavailable(f"TURN server {self.server_name}: no allocation")
        return self._current.relayed_address

    async def start(self) -> Address:
        """Allocate; returns the relayed address. Raises PermissionDenied or Unavailable, one line."""
        if self._current is not None:
            return self.relayed
        self._current = await self._allocate(*self._credentials)
        self._maintenance = asyncio.create_task(self._maintain(), name=f"turn relay {self.server_name}")
        return self.relayed

    async def open(self, peer_key: str, peer_relayed: Address) -> str:
        """Relay ``peer_key`` to its relayed address; returns the ``127.0.0.1:P`` to use as its endpoint.

        Again for a known peer (its relayed address changed): the same local
        socket, so WireGuard's endpoint stays as it is.
        """
        remote = _check_address(peer_relayed, f"peer {peer_key}'s relayed address")
        current = self._require_started()
        for allocation in self._live():
            await self._bind(allocation, remote)
        peer = self._peers.get(peer_key)  # looked up after the awaits: another open() may have made it meanwhile
        if peer is None:
            peer = _Peer(peer_key, remote, current)
            loop = asyncio.get_running_loop()
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _PeerSocket(self, peer), local_addr=(_LOCAL, 0), remote_addr=self._wireguard)
            except OSError as exc:
                raise Unavailable(f"relay for peer {peer_key}: cannot open a local socket: {_describe(exc)}") from exc
            _enlarge_buffers(transport)
            peer.transport = transport
            self._peers[peer_key] = peer
        elif peer.remote != remote:
            peer.old_remotes.add(peer.remote)  # it may go on sending from there until it has heard of our move
            peer.old_remotes.discard(remote)
            peer.remote = remote
        self._by_remote[remote] = peer
        return peer.endpoint

    async def close_peer(self, peer_key: str) -> None:
        """Stop relaying ``peer_key``: its socket closes; what it sends afterwards is dropped."""
        peer = self._peers.pop(peer_key, None)
        if peer is None:
            raise NotFound(f"relay: no peer {peer_key}")
        for remote in (peer.remote, *peer.old_remotes):
            if self._by_remote.get(remote) is peer:
                del self._by_remote[remote]
        if peer.transport is not None:
            peer.transport.close()
        self._retire_unused()

    async def refresh_credentials(self, username: str, password: str) -> Address:
        """Move to new credentials: a new allocation (returned: report it), the old one kept until unused.

        If the server refuses the new credentials, the old allocation goes on
        and the error (one line) is raised.
        """
        old = self._require_started()
        new = await self._allocate(username, password)
        try:
            for remote in list(self._by_remote):
                await self._bind(new, remote)
        except IdmeshError:
            self._delete(new)
            raise
        self._credentials = (username, password)
        self._current = new
        self._draining[old] = time.monotonic() + self._drain
        self._retire_unused()
        return self.relayed

    async def stop(self) -> None:
        """Close every local socket and delete the allocations (waiting at most :data:`STOP_WAIT` for the server:
        meshd is stopping, and an allocation nobody deleted expires on the server within its lifetime)."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            self._maintenance = None
        for peer in self._peers.values():
            if peer.transport is not None:
                peer.transport.close()
        self._peers.clear()
        self._by_remote.clear()
        for allocation in self._live():
            self._delete(allocation)
        self._current = None
        self._draining.clear()
        await self._chores.close(grace=STOP_WAIT)

    def counters(self) -> dict[str, PeerCounters]:
        """A copy of every peer's counters, by peer key."""
        return {key: PeerCounters(**vars(peer.counters)) for key, peer in self._peers.items()}

    def endpoint(self, peer_key: str) -> str:
        return self._peers[peer_key].endpoint

    def allocations(self) -> list[Address]:
        """The relayed addresses of the live allocations: the current one first, then any still draining."""
        return [a.relayed_address for a in self._live() if a.relayed_address is not None]

    # -- the data path (called by the protocols) -------------------------------------------------
    def _to_peer(self, peer: _Peer, data: bytes) -> None:
        if peer.via.send_to(peer.remote, data):
            peer.counters.to_peer_packets += 1
            peer.counters.to_peer_bytes += len(data)
            self.bytes_sent += len(data)
        else:
            peer.counters.dropped += 1

    def _from_peer(self, allocation: _Allocation, remote: Address, data: bytes) -> None:
        peer = self._by_remote.get(remote)
        if peer is None or peer.transport is None:
            return
        peer.transport.sendto(data)
        peer.counters.from_peer_packets += 1
        peer.counters.from_peer_bytes += len(data)
        self.bytes_received += len(data)
        if peer.old_remotes and remote == peer.remote:  # it sends from its new address: the old ones are dead
            for old in peer.old_remotes:
                if self._by_remote.get(old) is peer:
                    del self._by_remote[old]
            peer.old_remotes.clear()
        if allocation is self._current and peer.via is not allocation:
            peer.via = allocation  # it sent to our new relayed address: it knows it
            self._retire_unused()

    def _lost(self, allocation: _Allocation) -> None:
        if not allocation.retired:
            self.lost_allocations += 1
            log.warning("TURN server %s: allocation %s lost", self.server_name, allocation.relayed_address)

    # -- inside ----------------------------------------------------------------------------------
    def _require_started(self) -> _Allocation:
        if self._current is None:
            raise Unavailable(f"TURN server {self.server_name}: the relay is not started")
        return self._current

    def _live(self) -> list[_Allocation]:
        return [a for a in [self._current, *self._draining] if a is not None]

    async def _allocate(self, username: str, password: str) -> _Allocation:
        loop = asyncio.get_running_loop()
        allocation = _Allocation(self, self.server, username, password, self._lifetime)
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: allocation, remote_addr=self.server)
        except OSError as exc:
            raise Unavailable(f"TURN server {self.server_name}: {_describe(exc)}") from exc
        _enlarge_buffers(transport)
        try:
            async with asyncio.timeout(self._timeout):
                await allocation.connect()
        except (stun.TransactionError, ConnectionError, OSError, TimeoutError) as exc:
            allocation.transport.close()
            raise self._error(f"cannot allocate as {username}", exc) from exc
        return allocation

    async def _bind(self, allocation: _Allocation, remote: Address) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await allocation.bind(remote)
        except (stun.TransactionError, ConnectionError, OSError, TimeoutError) as exc:
            if allocation is self._current:
                self._chores.spawn(self._check())  # perhaps the server no longer knows us: see at once
            raise self._error(f"cannot bind a channel to {remote[0]}:{remote[1]}", exc) from exc

    async def _check(self) -> None:
        """Whether the current allocation is still ours at the server; if not, replace it (one check at a time)."""
        self._checking = self._checking or asyncio.Lock()
        async with self._checking:
            current = self._current
            if current is None or current.retired:
                return
            if not current.lost:
                try:
                    async with asyncio.timeout(self._timeout * 2):
                        known = await current.known()
                except TimeoutError:
                    log.info("TURN server %s: no answer to a refresh", self.server_name)
                    return
                if not known:
                    current.lost = True
                    self._lost(current)
            if current.lost and current is self._current:
                await self._reallocate()

    def _error(self, doing: str, exc: BaseException) -> IdmeshError:
        what = f"TURN server {self.server_name}: {doing}: {_describe(exc)}"
        if isinstance(exc, stun.TransactionFailed) and exc.response.error_code in (401, 441):
            return PermissionDenied(what + " (the credentials were refused)")
        if isinstance(exc, TimeoutError):
            return Unavailable(f"TURN server {self.server_name}: {doing}: no answer in {self._timeout:g} s")
        return Unavailable(what)

    def _delete(self, allocation: _Allocation) -> None:
        """Delete in the background (Refresh with lifetime 0), bounded by ``timeout``."""
        self._draining.pop(allocation, None)
        allocation.retired = True

        async def delete() -> None:
            try:
                async with asyncio.timeout(self._timeout):
                    await allocation.delete()
            except (TimeoutError, stun.TransactionError, ConnectionError, OSError) as exc:
                log.info("TURN server %s: deleting %s: %s", self.server_name, allocation.relayed_address,
                         _describe(exc))

        self._chores.spawn(delete())

    def _retire_unused(self, now: float | None = None) -> None:
        """Delete draining allocations no peer sends through; past their deadline, move their peers first."""
        now = time.monotonic() if now is None else now
        for old, deadline in list(self._draining.items()):
            users = [p for p in self._peers.values() if p.via is old]
            if users and now >= deadline and self._current is not None:
                for peer in users:
                    peer.via = self._current
                users = []
            if not users:
                self._delete(old)

    async def _maintain(self) -> None:
        """Keep the NAT mapping warm, refresh channel bindings (and so permissions), retire, re-allocate."""
        last_bind = time.monotonic()
        while True:
            await asyncio.sleep(self._keepalive)
            self._retire_unused()
            await self._check()
            if time.monotonic() - last_bind >= self._rebind_every:
                last_bind = time.monotonic()
                for allocation in self._live():
                    for remote in list(allocation.channels):
                        try:
                            await self._bind(allocation, remote)
                        except IdmeshError as exc:
                            log.warning("%s", exc)

    async def _reallocate(self) -> None:
        """The allocation is gone (the server forgot it or us): make a new one with the current credentials."""
        try:
            new = await self._allocate(*self._credentials)
        except IdmeshError as exc:
            log.warning("%s (will try again in %g s)", exc, self._keepalive)
            return
        try:
            for remote in list(self._by_remote):
                await self._bind(new, remote)
        except IdmeshError as exc:
            self._delete(new)
            log.warning("%s (will try again in %g s)", exc, self._keepalive)
            return
        old, self._current = self._current, new
        if old is not None:  # the server no longer knows it from here: nothing to delete, only our socket to close
            old.retired = True
            if old.refresh_task is not None:
                old.refresh_task.cancel()
            old.transport.close()
        for peer in self._peers.values():
            peer.via = new
        log.info("TURN server %s: new allocation %s", self.server_name, new.relayed_address)
        if self._on_relayed is not None and new.relayed_address is not None:
            self._on_relayed(new.relayed_address)
