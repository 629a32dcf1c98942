"""NAT traversal for one node: its reflexive address, probes to and from peers, the relay, each peer's path.

The data plane stays WireGuard's: this module only decides which endpoint
WireGuard is told for each peer (:meth:`Traversal.endpoints`), and the data
plane sets it over UAPI as it sets any endpoint. What it does, on the
WireGuard port (:mod:`.wgport`) so every mapping is WireGuard's own:

* **STUN** to the controller's two STUN ports, every :data:`STUN_EVERY`
  seconds (:data:`STUN_EVERY_RELAYED` while a peer is relayed, so a NAT
  that changed is seen soon): the reflexive address, and whether the NAT
  maps by destination (``nat: varies``: a symmetric NAT, only the relay
  will do). A public address or NAT kind that changed means the router
  forgot this node (rebooted, reconfigured): the controller stream, whose
  TCP connection then died silently, is reconnected at once;
* **probes** (ICE-like connectivity checks): STUN Binding requests to each
  candidate of a peer (its host endpoints, the address the controller saw,
  its reflexive address), with USERNAME ``<its ufrag>:<ours>`` and
  MESSAGE-INTEGRITY keyed with its pwd, both from the netmap. A peer's
  answer, integrity-checked with its pwd, proves that candidate reaches it.
  A request that reaches us is answered the same way and probed back at
  once from where it came (a peer-reflexive candidate). Probes to a peer
  start when it appears, when its candidates change, when it asks (call me
  maybe, over the controller) and when its direct path goes quiet; we ask
  it to probe back at the same time, which is what opens two NATs to each
  other. A chosen direct path is heartbeat-probed every
  :data:`HEARTBEAT` seconds;
* **the relay** (:mod:`.relay`): a peer with no direct path after
  :data:`.paths.RELAY_AFTER` seconds is reached through the TURN server,
  and moves back as soon as a probe is answered (WireGuard roams; TCP
  connections inside the tunnel do not notice). A relayed peer's
  candidates are probed every :data:`PROBE_RELAYED` seconds.

STUN and probes from strangers, malformed ones, and probe requests for
peers this node does not have are dropped and counted; nothing else
happens.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import string
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aioice import stun

from idmesh.tasks import Tasks
from meshcore.errors import IdmeshError
from meshcore.turn import turn_expiry
from meshcore.wire.stream import NatConfig, PeerNode, ReachabilityReport
from meshd.nat.paths import Choice, PeerPaths
from meshd.nat.wgport import WireGuardPort

__all__ = ["HEARTBEAT", "STUN_EVERY", "RelayLike", "Traversal"]

log = logging.getLogger("meshd.nat")
STUN_EVERY = 20.0
STUN_EVERY_RELAYED = 2.0
PROBE_RELAYED = 1.0
HEARTBEAT = 2.0
PROBE_EVERY = 0.2
"""While a peer is being probed, each of its candidates gets a probe this often (Nebula retries every 100 ms)."""
PROBE_FOR = 10.0
"""How long a round of probing lasts; then every :data:`RETRY_EVERY` seconds again, until a probe is answered."""
RETRY_EVERY = 10.0
RELAY_RETRY = 2.0
"""After a relay could not be opened for a peer (the TURN server refused a binding), wait this long."""
_ALPHABET = string.ascii_letters + string.digits


class RelayLike(Protocol):
    """What the traversal needs of the TURN relay (:class:`meshd.nat.relay.Relay`)."""

    async def start(self) -> tuple[str, int]: ...

    async def open(self, peer_key: str, peer_relayed: tuple[str, int]) -> str: ...

    async def close_peer(self, peer_key: str) -> None: ...

    async def refresh_credentials(self, username: str, password: str) -> tuple[str, int]: ...

    async def stop(self) -> None: ...

    bytes_sent: int
    bytes_received: int


RelayFactory = Callable[[tuple[str, int], str, str, int, Callable[[tuple[str, int]], None]], RelayLike]
"""(server, username, password, WireGuard port, on_relayed) -> a relay; ``on_relayed`` says its new address."""


def _ipv4_endpoint(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if not sep or not port.isdigit() or ip.version != 4:
        return None
    return str(ip), int(port)


def _resolve(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return None
    return (str(infos[0][4][0]), int(port)) if infos else None


@dataclass
class _Peer:
    name: str
    key: str
    ufrag: str | None
    pwd: str | None
    candidates: tuple[tuple[str, int], ...]
    relayed: tuple[str, int] | None
    paths: PeerPaths = field(default_factory=PeerPaths)
    extra: set[tuple[str, int]] = field(default_factory=set)  # peer-reflexive: where its probes came from
    round_until: float = 0.0
    next_round: float = 0.0
    last_sent: dict[tuple[str, int], float] = field(default_factory=dict)
    asked_at: float = -1e9
    choice: Choice = field(default_factory=lambda: Choice("none", None))
    relay_retry_at: float = 0.0  # after a failed open, not before this


class Traversal:
    def __init__(self, listen_port: int, host_addresses: Callable[[], list[str]],
                 report_changed: Callable[[], Awaitable[object]], path_changed: Callable[[str], None],
                 ask_probe: Callable[[str], Awaitable[object]], relay_factory: RelayFactory | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 underlay_changed: Callable[[str], None] = lambda why: None) -> None:
        self.listen_port = listen_port
        self._underlay_changed = underlay_changed
        self._hosts = host_addresses
        self._report_changed = report_changed
        self._path_changed = path_changed
        self._ask_probe = ask_probe
        self._relay_factory = relay_factory
        self._clock = clock
        self.ufrag = "".join(secrets.choice(_ALPHABET) for _ in range(8))
        self.pwd = "".join(secrets.choice(_ALPHABET) for _ in range(24))
        self.port = WireGuardPort(listen_port, self._on_stun)
        self.enabled = False
        self.reflexive: tuple[str, ...] = ()
        self.nat = "unknown"
        self.relayed: str | None = None
        self.dropped = 0
        self._config = NatConfig()
        self._relay: RelayLike | None = None
        self._relay_retry = 0.0
        self._relay_user = ""  # the credentials the relay uses
        self._peers: dict[str, _Peer] = {}  # by WireGuard public key
        self._by_ufrag: dict[str, str] = {}
        self._stun_waiting: dict[bytes, asyncio.Future[tuple[str, int]]] = {}
        self._probes: dict[bytes, tuple[str, tuple[str, int], float]] = {}  # tid -> (peer key, candidate, sent)
        self._wake = asyncio.Event()
        self._tasks = Tasks(log)

    # -- what the node reports, and tells its data plane ------------------------------------------------
    def reach(self) -> ReachabilityReport:
        return ReachabilityReport(reflexive=self.reflexive, relay=self.relayed, nat=self.nat,
                                  probe_ufrag=self.ufrag if self.enabled else None,
                                  probe_pwd=self.pwd if self.enabled else None)

    def endpoints(self) -> dict[str, str | None]:
        """WireGuard endpoints by peer public key: the path found, or None while the peer is still being probed.

        None ("no endpoint yet") rather than a guess from the netmap: a
        handshake sent to an unchecked candidate is dropped by the peer's NAT
        and WireGuard waits 5 s before the next one, while the first endpoint
        given after a path is found starts the handshake at once (see
        :mod:`meshd.wg.diff`). Peers that cannot be probed (their meshd has
        no probe credentials, or ours cannot send from WireGuard's port) are
        left out: the data plane's choice holds for them.
        """
        if not self.enabled:
            return {}
        return {key: p.choice.endpoint or None for key, p in self._peers.items() if p.ufrag}

    def status(self, key: str) -> dict[str, str]:
        peer = self._peers.get(key)
        if peer is None:
            return {"path": "none", "last_probe": "never"}
        return {"path": peer.choice.kind, "last_probe": peer.paths.last_probe}

    def relay_bytes(self) -> tuple[int, int]:
        """WireGuard bytes (sent, received) through the relay since it started (metrics)."""
        return (self._relay.bytes_sent, self._relay.bytes_received) if self._relay is not None else (0, 0)

    def paths(self) -> dict[str, int]:
        """How many peers go which way (metrics)."""
        out = {"direct": 0, "relay": 0, "none": 0}
        for p in tuple(self._peers.values()):  # a scrape's thread: copied in one step, as the loop may change it
            out[p.choice.kind] += 1
        return out

    # -- what the controller says -------------------------------------------------------------------------
    def set_config(self, config: NatConfig) -> None:
        self._config = config
        if config.relay is not None and self._relay is not None and self._credentials_due(config.relay.username):
            self._spawn(self._refresh(config.relay.username, config.relay.password))
        self._wake.set()

    def _credentials_due(self, offered: str) -> bool:
        """Move to ``offered`` credentials only once ours have about half of their life left or less.

        (The controller sends new ones at half life; 0.6 leaves room for clocks and rounding.)

        Every stream connection brings fresh ones, and moving means a new
        allocation and a new relayed address for every peer to learn: after
        a reconnection that is churn, not safety.
        """
        if offered == self._relay_user:
            return False
        ours, theirs = turn_expiry(self._relay_user), turn_expiry(offered)
        if ours is None or theirs is None:
            return True
        now = datetime.now(UTC)
        return ours - now <= (theirs - now) * 0.6

    async def _refresh(self, username: str, password: str) -> None:
        assert self._relay is not None
        try:
            self._relayed(await self._relay.refresh_credentials(username, password))
            self._relay_user = username
        except IdmeshError as exc:
            log.warning("relay: new credentials refused, the old allocation goes on: %s", exc)

    def _relayed(self, address: tuple[str, int]) -> None:
        """The relay's address changed (new credentials, or an allocation made again): peers must hear of it."""
        relayed = f"{address[0]}:{address[1]}"
        if relayed != self.relayed:
            self.relayed = relayed
            log.info("relay: relayed address %s", relayed)
            self._spawn(self._report())

    def _allocated_again(self, address: tuple[str, int]) -> None:
        """The TURN server had forgotten our allocation, or our NAT had forgotten us: a new address, and a hint."""
        self._relayed(address)

        async def look_again() -> None:  # the NAT may have changed too: learn it now, not at the next STUN round
            if not await self._discover():
                self._underlay_changed("the TURN server no longer knew this node's address")
        self._spawn(look_again())

    def set_peers(self, nodes: Mapping[str, PeerNode], self_name: str) -> None:
        """The netmap's nodes, after any change: new peers and changed candidates start a probing round."""
        now = self._clock()
        seen = set()
        for name, node in nodes.items():
            if name == self_name:
                continue
            key = node.wireguard_public_key
            seen.add(key)
            candidates = tuple(dict.fromkeys(c for c in (_ipv4_endpoint(e) for e in (*node.endpoints,
                                                                                    *node.reach.reflexive)) if c))
            relayed = _ipv4_endpoint(node.reach.relay) if node.reach.relay else None
            old = self._peers.get(key)
            if old is not None and (old.candidates, old.ufrag, old.relayed) == (candidates, node.reach.probe_ufrag,
                                                                              relayed):
                continue
            peer = _Peer(name, key, node.reach.probe_ufrag, node.reach.probe_pwd, candidates, relayed)
            if old is not None:
                peer.paths, peer.extra, peer.choice = old.paths, old.extra, old.choice
                self._by_ufrag.pop(old.ufrag or "", None)
                if old.relayed != relayed and peer.paths.relay_endpoint not in (None, "opening"):
                    # its relay moved (a new allocation): the same local socket, bound to the new address
                    self._spawn(self._open_relay(peer, again=True))
            if peer.ufrag:
                self._by_ufrag[peer.ufrag] = key
            self._peers[key] = peer
            self._start_round(peer, now)
        for key in set(self._peers) - seen:
            gone = self._peers.pop(key)
            self._by_ufrag.pop(gone.ufrag or "", None)
            if gone.paths.relay_endpoint is not None and self._relay is not None:
                self._spawn(self._relay.close_peer(key))
        self._wake.set()

    def probe_requested(self, peer_name: str) -> None:
        """Call me maybe: the peer probes us now; probe it back at once (a peer we do not have is ignored)."""
        peer = next((p for p in self._peers.values() if p.name == peer_name), None)
        if peer is None:
            log.info("a probe request for %s, which is not a peer of this node: ignored", peer_name)
            self.dropped += 1
            return
        peer.asked_at = self._clock()  # it asked us: no need to ask it back
        self._start_round(peer, self._clock())
        self._wake.set()

    # -- probing ----------------------------------------------------------------------------------------------
    def _start_round(self, peer: _Peer, now: float) -> None:
        if peer.ufrag is None or peer.pwd is None:
            return  # an older meshd: it cannot answer probes; the data plane's own choice stands
        peer.round_until = now + PROBE_FOR
        peer.paths.start(now)

    def _probe(self, peer: _Peer, candidate: tuple[str, int], now: float) -> None:
        assert peer.ufrag is not None and peer.pwd is not None
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        request.attributes["USERNAME"] = f"{peer.ufrag}:{self.ufrag}"
        request.attributes["PRIORITY"] = 1
        request.add_message_integrity(peer.pwd.encode())
        request.add_fingerprint()
        self._probes[request.transaction_id] = (peer.key, candidate, now)
        peer.last_sent[candidate] = now
        self.port.send(bytes(request), candidate)

    def _tick(self, now: float) -> None:
        """Send what is due — rounds of probes, heartbeats on chosen paths — and re-decide every peer's path."""
        for peer in self._peers.values():
            if peer.ufrag is None:
                continue
            direct = peer.paths.direct(now)
            if now >= peer.round_until and direct is None and now >= peer.next_round:
                peer.next_round = now + RETRY_EVERY  # nothing answers: a new round now and then
                self._start_round(peer, now)
            targets: list[tuple[str, int]] = []
            every = PROBE_EVERY
            if now < peer.round_until:  # a round: every candidate, often; and ask the peer to probe back
                targets = [*peer.candidates, *peer.extra]
                if now - peer.asked_at >= RETRY_EVERY:
                    peer.asked_at = now
                    self._spawn(self._ask(peer.name))
            elif direct is not None and (chosen := _ipv4_endpoint(direct)) is not None:
                targets, every = [chosen], HEARTBEAT
            elif peer.choice.kind == "relay":  # a direct path may open any time: look for it often
                targets, every = [*peer.candidates, *peer.extra], PROBE_RELAYED
            for candidate in targets:
                if now - peer.last_sent.get(candidate, -1e9) >= every:
                    self._probe(peer, candidate, now)
            self._decide(peer, now)
        for tid in [tid for tid, (_, _, sent) in self._probes.items() if now - sent > 5.0]:
            del self._probes[tid]

    def _decide(self, peer: _Peer, now: float) -> None:
        relay_possible = self._relay is not None and self.relayed is not None and peer.relayed is not None
        choice = peer.paths.choose(now, relay_possible)
        if choice.kind == "relay" and choice.endpoint is None and peer.relayed is not None:
            if now >= peer.relay_retry_at:
                self._spawn(self._open_relay(peer))
            return
        if choice != peer.choice:
            log.info("peer %s: %s%s", peer.name, choice.kind, f" via {choice.endpoint}" if choice.endpoint else "")
            peer.choice = choice
            self._path_changed(peer.key)

    async def _open_relay(self, peer: _Peer, again: bool = False) -> None:
        """Relay ``peer`` (``again``: it is relayed already, and its relayed address changed)."""
        if self._relay is None or peer.relayed is None or (peer.paths.relay_endpoint is not None and not again):
            return
        peer.paths.relay_endpoint = peer.paths.relay_endpoint or "opening"
        try:
            peer.paths.relay_endpoint = await self._relay.open(peer.key, peer.relayed)
        except IdmeshError as exc:
            peer.paths.relay_endpoint = None  # tried again (the same local socket) on a later tick
            peer.relay_retry_at = self._clock() + RELAY_RETRY
            log.warning("relay to %s: %s (again in %g s)", peer.name, exc, RELAY_RETRY)
            return
        self._decide(peer, self._clock())

    async def _ask(self, name: str) -> None:
        try:
            await self._ask_probe(name)
        except IdmeshError as exc:
            log.debug("could not ask %s to probe back: %s", name, exc)

    # -- what arrives on the WireGuard port ---------------------------------------------------------------------
    def _on_stun(self, payload: bytes, source: tuple[str, int]) -> None:
        try:
            message = stun.parse_message(payload)
        except (ValueError, KeyError, IndexError, TypeError):
            self.dropped += 1
            return
        tid = message.transaction_id
        if message.message_class == stun.Class.RESPONSE:
            waiting = self._stun_waiting.pop(tid, None)
            if waiting is not None and not waiting.done() and "XOR-MAPPED-ADDRESS" in message.attributes:
                ip, port = message.attributes["XOR-MAPPED-ADDRESS"]
                waiting.set_result((str(ip), int(port)))
                return
            probe = self._probes.pop(tid, None)
            if probe is not None:
                self._answered(message, probe, source)
                return
        elif message.message_class == stun.Class.REQUEST and message.message_method == stun.Method.BINDING:
            self._asked(message, source)
            return
        self.dropped += 1

    def _answered(self, message: stun.Message, probe: tuple[str, tuple[str, int], float],
                  source: tuple[str, int]) -> None:
        key, candidate, sent = probe
        peer = self._peers.get(key)
        if peer is None or peer.pwd is None or not message.check_message_integrity(peer.pwd.encode()) \
                or source != candidate:
            self.dropped += 1
            return
        now = self._clock()
        peer.paths.answer(f"{candidate[0]}:{candidate[1]}", now, now - sent)
        self._decide(peer, now)

    def _asked(self, message: stun.Message, source: tuple[str, int]) -> None:
        username = str(message.attributes.get("USERNAME", ""))
        mine, _, theirs = username.partition(":")
        key = self._by_ufrag.get(theirs)
        if mine != self.ufrag or key is None or not message.check_message_integrity(self.pwd.encode()):
            self.dropped += 1
            log.debug("a probe from %s:%d that is not a peer's: dropped", *source)
            return
        answer = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                              transaction_id=message.transaction_id)
        answer.attributes["XOR-MAPPED-ADDRESS"] = source
        answer.add_message_integrity(self.pwd.encode())
        answer.add_fingerprint()
        self.port.send(bytes(answer), source)
        peer = self._peers[key]
        if source not in peer.candidates and source not in peer.extra:
            peer.extra.add(source)  # where it really comes from (its NAT's mapping toward us): probe it back
        if peer.paths.direct(self._clock()) is None:
            self._start_round(peer, self._clock())
            self._wake.set()

    # -- STUN: our own reflexive address ---------------------------------------------------------------------------
    async def _binding(self, server: tuple[str, int]) -> tuple[str, int] | None:
        for _ in range(3):
            request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
            waiting: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
            self._stun_waiting[request.transaction_id] = waiting
            self.port.send(bytes(request), server)
            try:
                async with asyncio.timeout(1.0):
                    return await waiting
            except TimeoutError:
                self._stun_waiting.pop(request.transaction_id, None)
        return None

    async def _discover(self) -> bool:
        """Learn our reflexive addresses and NAT kind; True if the public address changed (and that was said)."""
        servers = [s for s in (_resolve(t) for t in self._config.stun) if s]
        mapped = [m for m in [await self._binding(s) for s in servers] if m]
        hosts = set(self._hosts())
        reflexive: tuple[str, ...] = ()
        if not mapped:
            if self.nat != "unknown":
                return False  # no STUN answer (the controller restarts?) says nothing about the NAT: keep what we know
            nat = "unknown"
        elif all(m[0] in hosts and m[1] == self.listen_port for m in mapped):
            nat = "none"
        else:
            nat = "independent" if len(set(mapped)) == 1 else "varies"
            reflexive = tuple(dict.fromkeys(f"{ip}:{port}" for ip, port in mapped))
        ips, known_ips = {r.rsplit(":", 1)[0] for r in reflexive}, {r.rsplit(":", 1)[0] for r in self.reflexive}
        if nat == self.nat == "varies" and ips == known_ips:
            return False  # a symmetric NAT picks new ports every time: nothing learnt
        moved = False
        if (nat, reflexive) != (self.nat, self.reflexive):
            log.info("NAT: %s%s", nat, f", reflexive {' '.join(reflexive)}" if reflexive else "")
            moved = bool(known_ips and ips) and (ips != known_ips or nat != self.nat or nat == "independent")
            self.nat, self.reflexive = nat, reflexive
            if moved:
                self._underlay_changed("this node's public address changed")  # the stream reconnects and reports
            else:
                await self._report()
        return moved

    async def _report(self) -> None:
        try:
            await self._report_changed()
        except IdmeshError as exc:
            log.warning("could not report the new NAT mapping: %s", exc)

    async def _keep_relay(self) -> None:
        relay = self._config.relay
        if relay is None or self._relay is not None or self._relay_factory is None:
            return
        server = _resolve(relay.server)
        if server is None:
            log.warning("relay %s: cannot resolve it", relay.server)
            return
        if self._clock() < self._relay_retry:
            return
        self._relay = self._relay_factory(server, relay.username, relay.password, self.listen_port,
                                          self._allocated_again)
        self._relay_user = relay.username
        try:
            address = await self._relay.start()
        except IdmeshError as exc:
            log.warning("relay %s: %s; trying again in %.0f s", relay.server, exc, RETRY_EVERY * 3)
            self._relay = None
            self._relay_retry = self._clock() + RETRY_EVERY * 3
            return
        self._relayed(address)

    # -- lifetime ----------------------------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.spawn(coro)

    async def run(self) -> None:
        try:
            self.port.open()
        except IdmeshError as exc:
            log.warning("NAT traversal is off: %s", exc)
            await asyncio.Event().wait()  # nothing to do, ever; cancelled at shutdown
        self.enabled = True
        await self._report()
        last_stun = -1e9
        try:
            while True:
                now = self._clock()
                relayed = any(p.choice.kind == "relay" for p in self._peers.values())
                if now - last_stun >= (STUN_EVERY_RELAYED if relayed else STUN_EVERY) and self._config.stun:
                    last_stun = now
                    self._spawn(self._discover())
                if self._relay is None:
                    await self._keep_relay()
                self._tick(now)
                self._wake.clear()
                try:
                    async with asyncio.timeout(PROBE_EVERY):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            await self.close()

    async def close(self) -> None:
        await self._tasks.close()
        if self._relay is not None:
            try:
                await self._relay.stop()
            except IdmeshError as exc:
                log.warning("relay: %s", exc)
            self._relay = None
        self.port.close()
