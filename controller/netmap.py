"""Fan-out of the netmap: the mesh-wide map, its version, recent deltas, and
one queue per connected node.

Versions are persisted with the change they describe (``bump`` runs inside
the registry's transaction), so they only grow, across restarts too. The
last :data:`HISTORY` deltas are kept in memory: a node reconnecting with a
version among them gets just the deltas it missed, anyone else a full map.
A subscriber whose queue overflows (a node too slow to read) is switched to
a full resync instead of holding the controller's memory hostage: deltas,
policies and agent updates alike, so what an unread stream holds is at most
:data:`QUEUE_LIMIT` messages (a policy's line is shared by every queue). A
resync sends the agents whole, and a node reconciles its own agents with
the controller on every whole list (meshd.agents.supervisor), so a
revocation dropped with the queue still ends the agent.

What a stored node or policy looks like on the stream (:func:`peer_node`,
:func:`policy_doc`) is decided here too: the hub is seeded with them from
the store at start-up (:meth:`NetmapHub.load`) and fed with them on every
change, so the map a restart rebuilds is the one that was streamed before.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from meshcore.addressing import MeshPrefixes
from meshcore.wire import PROTOCOL
from meshcore.wire.stream import (
    AgentUpdate,
    Netmap,
    NetmapDelta,
    PeerNode,
    PolicyDoc,
    Reachability,
    RouteOffer,
    StreamMessage,
)

from .rows import NodeRow, PolicyRow
from .store import Tx

__all__ = ["KEEPALIVE", "STREAMS_PER_NODE", "NetmapHub", "Outgoing", "Subscription", "peer_node", "policy_doc"]

HISTORY = 4096
QUEUE_LIMIT = 1024
_VERSION_KEY = "netmap_version"  # in the store's meta table


@dataclass(frozen=True)
class Outgoing:
    """A stream message and its line, serialised once for every subscriber."""

    message: StreamMessage
    line: bytes

    @classmethod
    def of(cls, message: StreamMessage) -> Outgoing:
        return cls(message, message.model_dump_json(exclude_none=True).encode() + b"\n")


KEEPALIVE = Outgoing.of(StreamMessage(type="keepalive"))
STREAMS_PER_NODE = 4
"""Open streams one node may hold at once."""
_OPENED = itertools.count(1)


@dataclass(eq=False)
class Subscription:
    node: str
    protocol: int = PROTOCOL
    """The wire protocol agreed with the node when its stream opened."""
    queue: asyncio.Queue[Outgoing] = field(default_factory=asyncio.Queue)
    resync: bool = False
    closed: bool = False
    opened: int = 0
    """Its place in the order streams opened (the oldest of a node's goes first)."""


class NetmapHub:
    def __init__(self, domain: str, prefixes: tuple[str, ...], version: int, nodes: dict[str, PeerNode]) -> None:
        self.domain = domain
        self.prefixes = prefixes
        self.version = version
        self.nodes = nodes
        self._history: deque[NetmapDelta] = deque(maxlen=HISTORY)
        self._subscribers: set[Subscription] = set()
        self.policy: PolicyDoc | None = None
        self._policy_out: Outgoing | None = None  # the policy's line, made once per version

    @classmethod
    def load(cls, tx: Tx, domain: str, prefixes: MeshPrefixes) -> NetmapHub:
        """The hub as the store left it: its version, every node, the policy in force."""
        version = int(tx.meta(_VERSION_KEY) or 0)
        nodes = {row.name: peer_node(row, prefixes) for row in tx.nodes()}
        hub = cls(domain, (str(prefixes.v4), str(prefixes.v6)), version, nodes)
        hub.policy = policy_doc(tx.policy())
        return hub

    # -- the map ------------------------------------------------------------
    def full(self) -> Netmap:
        return Netmap(version=self.version, domain=self.domain, prefixes=self.prefixes, nodes=dict(self.nodes))

    def since(self, version: int) -> list[NetmapDelta] | None:
        """The deltas after ``version``, or None when only a full map will do."""
        if version == self.version:
            return []
        if not self._history or version < self._history[0].base or version > self.version:
            return None
        return [d for d in self._history if d.base >= version]

    def bump(self, tx: Tx) -> int:
        """Reserve the next version inside the transaction making the change."""
        stored = int(tx.meta(_VERSION_KEY) or 0)
        nxt = max(stored, self.version) + 1
        tx.set_meta(_VERSION_KEY, str(nxt))
        return nxt

    def publish(self, version: int, upsert: tuple[PeerNode, ...] = (), remove: tuple[str, ...] = ()) -> NetmapDelta:
        """After the commit: update the map and send the delta to every subscriber."""
        delta = NetmapDelta(base=self.version, version=version, upsert=upsert, remove=remove)
        for name in remove:
            self.nodes.pop(name, None)
        for node in upsert:
            self.nodes[node.name] = node
        self.version = version
        self._history.append(delta)
        message = Outgoing.of(StreamMessage(type="delta", delta=delta))
        for sub in list(self._subscribers):
            if sub.node in remove:
                sub.closed = True  # a removed node's stream ends; its certificate is revoked
                sub.queue.put_nowait(KEEPALIVE)
            elif sub.queue.qsize() >= QUEUE_LIMIT:
                sub.resync = True
            elif not sub.resync:
                sub.queue.put_nowait(message)
        return delta

    def publish_policy(self, doc: PolicyDoc) -> None:
        """A new policy version goes to everyone at once; it is final."""
        self.policy, self._policy_out = doc, None
        message = self.policy_message()
        assert message is not None
        self._to_everyone(message)

    def policy_message(self) -> Outgoing | None:
        """The policy in force as its stream line, serialised once for every stream that opens (a policy
        may be megabytes, and a hundred nodes reconnect at once after a controller restart)."""
        if self._policy_out is None and self.policy is not None:
            self._policy_out = Outgoing.of(StreamMessage(type="policy", policy=self.policy))
        return self._policy_out

    def publish_agents(self, update: AgentUpdate) -> None:
        """Agent births and deaths go to every connected node at once: a revocation is what 'within a second'
        is about. A node too far behind to hear it within a second gets the whole list instead (see above)."""
        self._to_everyone(Outgoing.of(StreamMessage(type="agents", agents=update)))

    def send_to(self, node: str, message: StreamMessage) -> bool:
        """Queue ``message`` for ``node``'s open streams only (a call-me-maybe); False when it has none."""
        subs = [s for s in self._subscribers if s.node == node and not s.closed]
        outgoing = Outgoing.of(message)
        for sub in subs:
            if sub.queue.qsize() < QUEUE_LIMIT:
                sub.queue.put_nowait(outgoing)
        return bool(subs)

    def _to_everyone(self, message: Outgoing) -> None:
        """Queue ``message`` for every subscriber; one whose queue is full is resynced instead."""
        for sub in list(self._subscribers):
            if sub.queue.qsize() >= QUEUE_LIMIT:
                sub.resync = True
            elif not sub.resync:
                sub.queue.put_nowait(message)

    # -- subscribers -----------------------------------------------------------
    def subscribe(self, node: str, protocol: int = PROTOCOL) -> Subscription:
        """A new stream for ``node``; past :data:`STREAMS_PER_NODE` of its own, its oldest is ended
        (a node reconnecting leaves its old stream behind until the controller notices; a node opening
        streams in a loop must not hold the controller's memory)."""
        mine = sorted((s for s in self._subscribers if s.node == node and not s.closed), key=lambda s: s.opened)
        for old in mine[:max(0, len(mine) - STREAMS_PER_NODE + 1)]:
            old.closed = True
            old.queue.put_nowait(KEEPALIVE)  # wakes it to see it is closed
        sub = Subscription(node, protocol, opened=next(_OPENED))
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def backlogs(self) -> list[tuple[str, int]]:
        """Each stream's queue length. Read from the metrics thread while the event loop changes the set:
        copied in one step first (a single call under the GIL), never iterated live."""
        return [(sub.node, sub.queue.qsize()) for sub in tuple(self._subscribers)]

    @property
    def connected(self) -> int:
        return len(self._subscribers)


def peer_node(row: NodeRow, prefixes: MeshPrefixes) -> PeerNode:
    """A stored node as every other node sees it in the map."""
    block = prefixes.block(row.block_index)
    return PeerNode(name=row.name, wireguard_public_key=row.wg_public_key,
                    addresses=(str(block.node_v4), str(block.node_v6)), blocks=(str(block.v4), str(block.v6)),
                    endpoints=row.endpoints, owner=row.owner, tags=tuple(row.tags),
                    routing=RouteOffer.model_validate(row.routing), reach=Reachability.model_validate(row.reach),
                    mcp_ports=row.mcp_ports)


def policy_doc(row: PolicyRow | None) -> PolicyDoc | None:
    """A stored policy version as the stream carries it (None: no policy applied yet)."""
    if row is None:
        return None
    return PolicyDoc(version=row.version, hash=row.hash, filename=row.filename, text=row.text)
