"""Fan-out of the netmap: the mesh-wide map, its version, recent deltas, and
one queue per connected node.

Every change is written to the mesh's change log (the ``changes`` table)
inside the transaction that makes it (``record_*``), as the very line the
streams will carry, numbered by one counter whose row stays locked until
the commit: the log's order is the commit order, on every replica. A hub
never publishes what it wrote itself; it applies the log, in order, as
:class:`controller.follow.Follower` reads it (:meth:`NetmapHub.apply`), so
one replica and five see the same sequence, and a node that moves to
another replica continues from its ``since``. The netmap version is the
number of the last delta (policy and agent changes take numbers too, so
delta versions are increasing, not consecutive).

The last :data:`HISTORY` deltas are kept in memory (and in the log, so a
replica starting up has them too): a node reconnecting with a version among
them gets just the deltas it missed, anyone else a full map. A subscriber
whose queue overflows (a node too slow to read) is switched to a full
resync instead of holding the controller's memory hostage: deltas,
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
import heapq
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meshcore.addressing import MeshPrefixes
from meshcore.policy import Authorized, Policy, load_policy
from meshcore.policy.audience import Audience, AudienceNode, LiveAgents, Reach, Resend
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

from .rows import AgentRow, NodeRow, PolicyRow
from .store import Tx, iso

__all__ = ["KEEPALIVE", "STREAMS_PER_NODE", "NetmapHub", "Outgoing", "Subscription", "log_change", "log_delta", "peer_node",
           "policy_doc"]

HISTORY = 4096
QUEUE_LIMIT = 1024
_VERSION_KEY = "netmap_version"  # in the store's meta table: the last delta's number
CHANGE_KEY = "change_seq"  # the change log's counter
CHANNEL = "idmesh_changes"
"""PostgreSQL's NOTIFY channel: a replica that committed a change wakes the others' followers at once."""


@dataclass(frozen=True)
class Outgoing:
    """A stream line, serialised once for every subscriber (and once for the change log)."""

    line: bytes

    @classmethod
    def of(cls, message: StreamMessage) -> Outgoing:
        return cls(message.model_dump_json(exclude_none=True).encode() + b"\n")

    @property
    def message(self) -> StreamMessage:
        return StreamMessage.model_validate_json(self.line)


KEEPALIVE = Outgoing.of(StreamMessage(type="keepalive"))
_NO_POLICY = load_policy("acls: []\n", "(no policy)")
"""Before any policy: no rule admits an agent anywhere but its own node."""
PRUNE_EVERY = 1000
KEEP_CHANGES = 20_000
"""Changes kept in the log besides the last :data:`HISTORY` deltas: a replica further behind reloads."""
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
    agents_stale: bool = False
    """The agents its node must hold changed (a policy, a node): its stream sends them whole again."""
    closed: bool = False
    opened: int = 0
    """Its place in the order streams opened (the oldest of a node's goes first)."""


class NetmapHub:
    def __init__(self, domain: str, prefixes: tuple[str, ...], version: int, nodes: dict[str, PeerNode],
                 applied: int = 0, controllers: tuple[str, ...] = ()) -> None:
        self.domain = domain
        self.prefixes = prefixes
        self.version = version
        self.nodes = nodes
        self.applied = applied
        """The number of the last change of the log applied here."""
        self.committed = 0
        """The number of the last change this process committed (what its callers wait to see applied)."""
        self.controllers = controllers
        self._history: deque[NetmapDelta] = deque(maxlen=HISTORY)
        self._subscribers: set[Subscription] = set()
        self._by_node: dict[str, set[Subscription]] = {}
        self.policy: PolicyDoc | None = None
        self.parsed: Policy | None = None
        """The policy in force, parsed (once per version, off the event loop: controller.follow)."""
        self._policy_out: Outgoing | None = None  # the policy's line, made once per version
        self.live = LiveAgents(Audience(_NO_POLICY))
        """Every live agent and the nodes it must reach (targeted distribution: meshcore.policy.audience)."""
        self._expiry: list[tuple[str, str]] = []  # (not_after as iso(), agent id), a heap
        self.on_commit: Callable[[], None] = lambda: None
        """Called, in the committing thread, after each change this process wrote (wakes the follower)."""

    @classmethod
    def load(cls, tx: Tx, domain: str, prefixes: MeshPrefixes, now: datetime | None = None) -> NetmapHub:
        """The hub as the store left it: its version and history, every node, the policy in force, the live
        agents.

        The log's number is read first: a change committed while the rest is
        read is applied again by the follower, which changes nothing (a node
        upserted twice is the same node, a delta already had is skipped).
        """
        applied = int(tx.meta(CHANGE_KEY) or 0)
        version = int(tx.meta(_VERSION_KEY) or 0)
        nodes = {row.name: peer_node(row, prefixes) for row in tx.nodes()}
        hub = cls(domain, (str(prefixes.v4), str(prefixes.v6)), version, nodes, applied, tuple(tx.controllers()))
        for line in tx.recent_deltas(HISTORY):
            delta = StreamMessage.model_validate_json(line).delta
            if delta is not None and delta.version <= version:
                hub._history.append(delta)
        hub.policy = policy_doc(tx.policy())
        hub._adopt(load_policy(hub.policy.text, hub.policy.filename) if hub.policy is not None else None)
        for row in tx.live_agents(now or datetime.now(UTC)):
            hub._born(AgentFacts.of(row))
        return hub

    def reload(self, fresh: NetmapHub) -> None:
        """Start again from ``fresh``, loaded from the store (the log was pruned past what this hub applied):
        every stream is sent whole again."""
        self.version, self.nodes, self.applied, self.controllers = (fresh.version, fresh.nodes, fresh.applied,
                                                                    fresh.controllers)
        self._history, self.policy, self._policy_out = fresh._history, fresh.policy, None
        self.parsed, self.live, self._expiry = fresh.parsed, fresh.live, fresh._expiry
        for sub in self._subscribers:
            sub.resync = True
            sub.queue.put_nowait(KEEPALIVE)

    # -- writing: inside the transaction that makes the change --------------------------------------
    def record_delta(self, tx: Tx, upsert: tuple[PeerNode, ...] = (), remove: tuple[str, ...] = (),
                     controllers: tuple[str, ...] | None = None) -> int:
        """Log a change of the map; its number is the new netmap version."""
        return self._mine(tx, log_delta(tx, upsert, remove, controllers))

    def record_policy(self, tx: Tx, doc: PolicyDoc) -> int:
        return self._mine(tx, log_change(tx, "policy", StreamMessage(type="policy", policy=doc)))

    def record_agents(self, tx: Tx, update: AgentUpdate, born: Sequence[AgentFacts] = ()) -> int:
        """Log agent births (``born`` says who each is: where it goes is worked out from that, on every
        replica, without reading its certificate) and deaths (``update.revoked``)."""
        about = json.dumps({"born": [f.doc() for f in born], "ended": list(update.revoked)})
        return self._mine(tx, log_change(tx, "agents", StreamMessage(type="agents", agents=update), about=about))

    def record_for(self, tx: Tx, node: str, message: StreamMessage) -> int:
        """Log a message for ``node``'s streams alone, whichever replica holds them (a call-me-maybe)."""
        return self._mine(tx, log_change(tx, "node", message, node))

    def _mine(self, tx: Tx, seq: int) -> int:
        def committed() -> None:
            self.committed = max(self.committed, seq)
            self.on_commit()

        tx.committed.append(committed)
        return seq

    # -- applying: the log, in order -------------------------------------------------------------------
    def apply(self, seq: int, kind: str, node: str | None, line: str, about: str | None = None,
              parsed: Policy | None = None) -> None:
        """Apply change ``seq`` of the log, the next after :attr:`applied` (see :class:`controller.follow.Follower`,
        which parses a policy's text, ``parsed``, off the event loop)."""
        if seq <= self.applied:
            return
        self.applied = seq
        out = Outgoing(line.encode())
        if kind == "delta":
            delta = out.message.delta
            if delta is not None and delta.version > self.version:
                self._publish(delta, out)
        elif kind == "policy":
            doc = out.message.policy
            if doc is not None:
                self.publish_policy(doc, out, parsed)
        elif kind == "agents":
            self._agents(out, json.loads(about or "{}"))
        elif kind == "node" and node is not None:
            self._to_node(node, out)

    # -- the map ------------------------------------------------------------
    def full(self) -> Netmap:
        return Netmap(version=self.version, domain=self.domain, prefixes=self.prefixes, nodes=dict(self.nodes),
                      controllers=self.controllers)

    def since(self, version: int) -> list[NetmapDelta] | None:
        """The deltas after ``version``, or None when only a full map will do."""
        if version == self.version:
            return []
        if not self._history or version < self._history[0].base or version > self.version:
            return None
        return [d for d in self._history if d.base >= version]

    def publish(self, version: int, upsert: tuple[PeerNode, ...] = (), remove: tuple[str, ...] = ()) -> NetmapDelta:
        """Update the map and send the delta to every subscriber (what applying a logged delta does)."""
        delta = NetmapDelta(base=self.version, version=version, upsert=upsert, remove=remove)
        self._publish(delta, Outgoing.of(StreamMessage(type="delta", delta=delta)))
        return delta

    def _publish(self, delta: NetmapDelta, message: Outgoing) -> None:
        for name in delta.remove:
            self.nodes.pop(name, None)
        for node in delta.upsert:
            self.nodes[node.name] = node
        if delta.controllers is not None:
            self.controllers = delta.controllers
        resends = [r for node in delta.upsert
                   for r in self.live.node_changed(AudienceNode(node.name, node.owner, frozenset(node.tags)))]
        for name in delta.remove:
            self.live.forget_node(name)
        self._resend(resends)
        self.version = delta.version
        self._history.append(delta)
        remove = delta.remove
        for sub in list(self._subscribers):
            if sub.node in remove:
                sub.closed = True  # a removed node's stream ends; its certificate is revoked
                sub.queue.put_nowait(KEEPALIVE)
            elif sub.queue.qsize() >= QUEUE_LIMIT:
                sub.resync = True
            elif not sub.resync:
                sub.queue.put_nowait(message)

    def publish_policy(self, doc: PolicyDoc, line: Outgoing | None = None, parsed: Policy | None = None) -> None:
        """A new policy version goes to everyone at once; it is final. The nodes that now need agents they
        may not hold get their agents whole after it."""
        self.policy, self._policy_out = doc, line
        message = self.policy_message()
        assert message is not None
        self._to_everyone(message)
        self._resend(self._adopt(parsed or load_policy(doc.text, doc.filename)))

    def policy_message(self) -> Outgoing | None:
        """The policy in force as its stream line, serialised once for every stream that opens (a policy
        may be megabytes, and a hundred nodes reconnect at once after a controller restart)."""
        if self._policy_out is None and self.policy is not None:
            self._policy_out = Outgoing.of(StreamMessage(type="policy", policy=self.policy))
        return self._policy_out

    # -- agents: each birth and death to the nodes some rule could admit it to --------------------------
    def _agents(self, out: Outgoing, about: dict[str, Any]) -> None:
        """Agent births and deaths go at once to every node that needs them: a revocation is what 'within a
        second' is about. A node too far behind to hear it within a second gets the whole list instead."""
        reaches = [self._born(AgentFacts.from_doc(doc)) for doc in about.get("born", ())]
        reaches += [r for agent_id in about.get("ended", ()) if (r := self.live.remove(agent_id)) is not None]
        if any(r.nodes is None for r in reaches):
            self._to_everyone(out)
            return
        names = {r.home for r in reaches}.union(*(r.nodes for r in reaches if r.nodes is not None))
        self._to_subs([s for name in names for s in self._by_node.get(name, ())], out)

    def _born(self, facts: AgentFacts) -> Reach:
        heapq.heappush(self._expiry, (facts.not_after, facts.id))
        return self.live.add(facts.id, facts.principal, facts.scopes, facts.node, facts.name,
                             authorized=facts.authorized)

    def _adopt(self, parsed: Policy | None) -> list[Resend]:
        """``parsed`` is in force: who needs which agent is worked out again."""
        self.parsed = parsed
        nodes = [AudienceNode(n.name, n.owner, frozenset(n.tags)) for n in self.nodes.values()]
        return self.live.rebase(Audience(parsed or _NO_POLICY, nodes))

    def _resend(self, resends: list[Resend]) -> None:
        """Streams whose node now needs agents it may not hold send its agents whole."""
        for resend in resends:
            subs = self._subscribers if resend.nodes is None else [
                s for name in resend.nodes for s in self._by_node.get(name, ())]
            for sub in subs:
                if not sub.agents_stale:
                    sub.agents_stale = True
                    sub.queue.put_nowait(KEEPALIVE)  # wakes its stream

    def expire(self, now: datetime) -> int:
        """Forget the agents whose certificates ended (nodes drop them on their own clock): the index holds
        live agents only. How many went."""
        gone, stamp = 0, iso(now)
        while self._expiry and self._expiry[0][0] <= stamp:
            _, agent_id = heapq.heappop(self._expiry)
            gone += self.live.remove(agent_id) is not None
        return gone

    def _to_node(self, node: str, outgoing: Outgoing) -> None:
        """Queue ``outgoing`` for ``node``'s open streams on this replica only."""
        for sub in self._by_node.get(node, ()):
            if not sub.closed and sub.queue.qsize() < QUEUE_LIMIT:
                sub.queue.put_nowait(outgoing)

    def _to_everyone(self, message: Outgoing) -> None:
        self._to_subs(list(self._subscribers), message)

    def _to_subs(self, subs: Iterable[Subscription], message: Outgoing) -> None:
        """Queue ``message`` for ``subs``; one whose queue is full is resynced instead."""
        for sub in subs:
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
        self._by_node.setdefault(node, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        mine = self._by_node.get(sub.node)
        if mine is not None:
            mine.discard(sub)
            if not mine:
                del self._by_node[sub.node]

    def backlogs(self) -> list[tuple[str, int]]:
        """Each stream's queue length. Read from the metrics thread while the event loop changes the set:
        copied in one step first (a single call under the GIL), never iterated live."""
        return [(sub.node, sub.queue.qsize()) for sub in tuple(self._subscribers)]

    @property
    def connected(self) -> int:
        return len(self._subscribers)


def log_delta(tx: Tx, upsert: tuple[PeerNode, ...] = (), remove: tuple[str, ...] = (),
              controllers: tuple[str, ...] | None = None) -> int:
    """Log a change of the map in ``tx``; its number is the new netmap version."""
    seq = tx.next_counter(CHANGE_KEY)
    base = int(tx.meta(_VERSION_KEY) or 0)  # read under the counter's lock: the last delta committed
    tx.set_meta(_VERSION_KEY, str(seq))
    delta = NetmapDelta(base=base, version=seq, upsert=upsert, remove=remove, controllers=controllers)
    _insert(tx, seq, "delta", StreamMessage(type="delta", delta=delta), None)
    return seq


def log_change(tx: Tx, kind: str, message: StreamMessage, node: str | None = None, about: str | None = None) -> int:
    """Log ``message`` (a policy, agents, or for ``node`` alone) in ``tx``; its number in the log."""
    seq = tx.next_counter(CHANGE_KEY)
    _insert(tx, seq, kind, message, node, about)
    return seq


def _insert(tx: Tx, seq: int, kind: str, message: StreamMessage, node: str | None, about: str | None = None) -> None:
    tx.insert_change(seq, kind, node, about, Outgoing.of(message).line.decode())  # (its trigger NOTIFYs CHANNEL)
    if seq % PRUNE_EVERY == 0:
        tx.prune_changes(seq - KEEP_CHANGES, HISTORY)


@dataclass(frozen=True)
class AgentFacts:
    """Who an agent is, as far as where it must go depends on it (logged with its birth)."""

    id: str
    principal: str
    scopes: tuple[str, ...]
    node: str
    name: str
    authorized: Authorized
    not_after: str
    """iso() of its certificate's end."""

    @classmethod
    def of(cls, row: AgentRow) -> AgentFacts:
        return cls(row.id, row.principal, tuple(row.scopes), row.node, row.name,
                   "grant" if row.grant_id else "delegation", iso(row.not_after))

    def doc(self) -> dict[str, Any]:
        return {"id": self.id, "principal": self.principal, "scopes": list(self.scopes), "node": self.node,
                "name": self.name, "authorized": self.authorized, "not_after": self.not_after}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> AgentFacts:
        return cls(doc["id"], doc["principal"], tuple(doc["scopes"]), doc["node"], doc["name"], doc["authorized"],
                   doc["not_after"])


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
