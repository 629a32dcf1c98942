"""The identities the compiler works on: nodes, agents, and actors.

A *node* is a host (owned by a principal, or tagged, or neither); an *agent*
runs on a node for a principal with scopes. Both have their own overlay
addresses, one IPv4 and one IPv6. Policy rules match *actors*: an
:class:`Actor` is one source of traffic as a selector sees it —

* a node acting directly (``via="direct"``): its principal is its owner (a
  tagged node has none), it has no scopes;
* an agent (``via="agent"``): its own principal, scopes and how it was
  authorized (``grant`` or ``delegation``), and the name, owner and tags of
  the node it runs on (so ``{tag: agents, principal: P}`` means P's agents
  on nodes tagged ``agents``).

:class:`Identities` holds a mesh's nodes and agents with an index over their
actors, so a selector's members are found without scanning everyone, and
``with_*``/``without_*`` return a new :class:`Identities` in time
proportional to the change (copy-on-write of the touched index buckets).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..addressing import parse_address
from ..errors import InvalidInput
from ..scopes import Scope
from .cowmap import DELETE, CowMap
from .fields import AUTHORIZATIONS, Authorized, check_agent_name, check_label, check_principal

__all__ = ["Actor", "AgentIdentity", "Identities", "IndexKey", "NodeIdentity"]


def _checked(check: object, value: object) -> str:
    try:
        return check(value)  # type: ignore[operator, no-any-return]
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc


@dataclass(frozen=True, kw_only=True)
class NodeIdentity:
    """A node: owned by ``owner``, or tagged with ``tags``, or neither — never both."""

    name: str
    owner: str | None = None
    tags: frozenset[str] = frozenset()
    ipv4: str
    ipv6: str

    def __post_init__(self) -> None:
        _checked(lambda v: check_label("node", v), self.name)
        if self.owner is not None:
            _checked(check_principal, self.owner)
        object.__setattr__(self, "tags", frozenset(self.tags))
        for tag in self.tags:
            _checked(lambda v: check_label("tag", v), tag)
        if self.owner is not None and self.tags:
            raise InvalidInput(f"node {self.name}: a node is either owned or tagged, not both")
        object.__setattr__(self, "ipv4", parse_address(self.ipv4, f"node {self.name}: address", 4))
        object.__setattr__(self, "ipv6", parse_address(self.ipv6, f"node {self.name}: address", 6))


@dataclass(frozen=True, kw_only=True)
class AgentIdentity:
    """An agent: ``id`` is unique in the mesh, ``name`` is what rules call it.

    ``authorized`` is how it came to exist, as its certificate says:
    ``grant`` when the controller verified its principal's signed grant,
    ``delegation`` (the default) when a delegation let its node start it on
    the node's word alone. Selectors match it with ``authorized:``.
    """

    id: str
    name: str
    principal: str
    scopes: tuple[Scope, ...]
    node: str
    parent: str | None = None
    ipv4: str
    ipv6: str
    authorized: Authorized = "delegation"

    def __post_init__(self) -> None:
        _checked(check_agent_name, self.id)
        _checked(check_agent_name, self.name)
        _checked(check_principal, self.principal)
        _checked(lambda v: check_label("node", v), self.node)
        if self.authorized not in AUTHORIZATIONS:
            raise InvalidInput(f"agent {self.id}: authorized must be grant or delegation, not {self.authorized!r}")
        if not self.scopes:
            raise InvalidInput(f"agent {self.id}: an agent holds at least one scope")
        object.__setattr__(self, "scopes", tuple(sorted(set(self.scopes))))
        object.__setattr__(self, "ipv4", parse_address(self.ipv4, f"agent {self.id}: address", 4))
        object.__setattr__(self, "ipv6", parse_address(self.ipv6, f"agent {self.id}: address", 6))


@dataclass(frozen=True)
class Actor:
    """One source of traffic as selectors see it (module docstring).

    ``key`` is ``node:NAME`` or ``agent:ID`` for real identities; a
    hypothetical actor (a policy test's ``from``) has key ``hypothetical``
    and no addresses. ``groups`` is for hypothetical actors only: "some
    member of these groups" when no principal is named (a real actor's
    groups follow from its principal). ``authorized`` is an agent's
    (``grant`` or ``delegation``) and None for a node acting directly.
    """

    key: str
    via: Literal["direct", "agent"]
    principal: str | None
    node: str | None
    owner: str | None
    tags: frozenset[str]
    agent: str | None = None
    scopes: tuple[Scope, ...] = ()
    ipv4: str | None = None
    ipv6: str | None = None
    groups: frozenset[str] = frozenset()
    authorized: Authorized | None = None

    @classmethod
    def of_node(cls, node: NodeIdentity) -> Actor:
        return cls(
            key=f"node:{node.name}",
            via="direct",
            principal=node.owner,
            node=node.name,
            owner=node.owner,
            tags=node.tags,
            ipv4=node.ipv4,
            ipv6=node.ipv6,
        )

    @classmethod
    def of_agent(cls, agent: AgentIdentity, node: NodeIdentity) -> Actor:
        if agent.node != node.name:
            raise InvalidInput(f"agent {agent.id} runs on {agent.node}, not on {node.name}")
        return cls(
            key=f"agent:{agent.id}",
            via="agent",
            principal=agent.principal,
            node=node.name,
            owner=node.owner,
            tags=node.tags,
            agent=agent.name,
            scopes=agent.scopes,
            ipv4=agent.ipv4,
            ipv6=agent.ipv6,
            authorized=agent.authorized,
        )

    def index_keys(self) -> Iterator[IndexKey]:
        """The buckets of :class:`Identities` this actor belongs to.

        ``authorized`` has no bucket: it only ever narrows (each value would
        be a bucket of a large share of all agents, copied on every birth),
        so selectors naming it are matched field by field.
        """
        yield ("via", self.via)
        for name, value in (("principal", self.principal), ("node", self.node), ("owner", self.owner),
                            ("agent", self.agent)):
            if value is not None:
                yield (name, value)
        for tag in self.tags:
            yield ("tag", tag)
        for scope in self.scopes:  # so a scope selector looks at agents holding that resource or action
            yield ("scope.resource", scope.resource)
            yield ("scope.action", scope.action)


_NO_ACTORS: Mapping[str, Actor] = {}

IndexKey = tuple[str, str]
"""``("tag", "db")``, ``("principal", "nikita@acme.com")``, ``("via", "agent")``, ``("scope.resource", "db")``..."""


@dataclass(frozen=True)
class Identities:
    """A mesh's nodes and agents, and the actor index selectors are resolved with.

    Build with :meth:`build`; change with the ``with_*``/``without_*``
    methods, which check the same invariants: unique names and ids, unique
    addresses, every agent on a known node. The maps are :class:`CowMap` s,
    so a change copies the few shards and index buckets it touches.
    """

    nodes: Mapping[str, NodeIdentity] = field(default_factory=CowMap)
    agents: Mapping[str, AgentIdentity] = field(default_factory=CowMap)
    actors: Mapping[str, Actor] = field(default_factory=CowMap)
    index: Mapping[IndexKey, Mapping[str, Actor]] = field(default_factory=CowMap)
    _addresses: Mapping[str, str] = field(default_factory=CowMap, repr=False)

    @classmethod
    def build(cls, nodes: Iterable[NodeIdentity] = (), agents: Iterable[AgentIdentity] = ()) -> Identities:
        node_map: dict[str, NodeIdentity] = {}
        for node in nodes:
            if node.name in node_map:
                raise InvalidInput(f"node {node.name} is listed twice")
            node_map[node.name] = node
        agent_map: dict[str, AgentIdentity] = {}
        for agent in agents:
            if agent.id in agent_map:
                raise InvalidInput(f"agent {agent.id} is listed twice")
            if agent.node not in node_map:
                raise InvalidInput(f"agent {agent.id} runs on unknown node {agent.node}")
            agent_map[agent.id] = agent
        actors = [Actor.of_node(n) for n in node_map.values()]
        actors += [Actor.of_agent(a, node_map[a.node]) for a in agent_map.values()]
        addresses: dict[str, str] = {}
        buckets: dict[IndexKey, dict[str, Actor]] = {}
        for actor in actors:
            _claim_addresses(addresses, actor)
            for key in actor.index_keys():
                buckets.setdefault(key, {})[actor.key] = actor
        return cls(
            nodes=CowMap(node_map),
            agents=CowMap(agent_map),
            actors=CowMap((a.key, a) for a in actors),
            index=CowMap(buckets),
            _addresses=CowMap(addresses),
        )

    def node(self, name: str) -> NodeIdentity:
        try:
            return self.nodes[name]
        except KeyError:
            raise InvalidInput(f"unknown node {name!r}") from None

    def actor_of(self, identity: NodeIdentity | AgentIdentity) -> Actor:
        if isinstance(identity, NodeIdentity):
            return Actor.of_node(identity)
        return Actor.of_agent(identity, self.node(identity.node))

    def actor_at(self, address: str) -> Actor | None:
        """The identity holding an overlay address (canonical spelling), if any."""
        key = self._addresses.get(address)
        return None if key is None else self.actors.get(key)

    def bucket(self, key: IndexKey) -> Mapping[str, Actor]:
        """The actors in one index bucket, by actor key (empty if none). Do not modify."""
        return self.index.get(key) or _NO_ACTORS

    def _riders(self, name: str) -> list[AgentIdentity]:
        """The agents running on node ``name``, found through the index."""
        keys = self.bucket(("node", name))
        return [self.agents[k[len("agent:"):]] for k in sorted(keys) if k.startswith("agent:")]

    def with_node(self, node: NodeIdentity) -> Identities:
        """Add ``node``, or replace the node of that name (its agents see its new owner/tags)."""
        if node.name in self.nodes:
            riders = self._riders(node.name)
            removed = [self.actors[f"node:{node.name}"]] + [self.actors[f"agent:{a.id}"] for a in riders]
            added = [Actor.of_node(node)] + [Actor.of_agent(a, node) for a in riders]
        else:
            removed, added = [], [Actor.of_node(node)]
        return self._replace({node.name: node}, {}, removed, added)

    def without_node(self, name: str) -> Identities:
        """Remove node ``name`` and every agent running on it."""
        self.node(name)
        riders = self._riders(name)
        removed = [self.actors[f"node:{name}"]] + [self.actors[f"agent:{a.id}"] for a in riders]
        return self._replace({name: DELETE}, {a.id: DELETE for a in riders}, removed, [])

    def with_agent(self, agent: AgentIdentity) -> Identities:
        if agent.id in self.agents:
            raise InvalidInput(f"agent {agent.id} already exists")
        actor = Actor.of_agent(agent, self.node(agent.node))
        return self._replace({}, {agent.id: agent}, [], [actor])

    def without_agent(self, agent_id: str) -> Identities:
        if agent_id not in self.agents:
            raise InvalidInput(f"unknown agent {agent_id!r}")
        return self._replace({}, {agent_id: DELETE}, [self.actors[f"agent:{agent_id}"]], [])

    def _replace(
        self,
        node_changes: dict[str, object],
        agent_changes: dict[str, object],
        removed: list[Actor],
        added: list[Actor],
    ) -> Identities:
        actor_changes: dict[str, object] = {}
        address_changes: dict[str, object] = {}
        touched: dict[IndexKey, dict[str, Actor]] = {}
        for actor in removed:
            actor_changes[actor.key] = DELETE
            for address in (actor.ipv4, actor.ipv6):
                if address is not None:
                    address_changes[address] = DELETE
            for key in actor.index_keys():
                touched.setdefault(key, dict(self.bucket(key))).pop(actor.key, None)
        for actor in added:
            for address in (actor.ipv4, actor.ipv6):
                if address is None:
                    continue
                holder = self._addresses.get(address)
                if holder is not None and holder != actor.key and address_changes.get(address) is not DELETE:
                    raise InvalidInput(f"address {address} of {actor.key} is already held by {holder}")
                address_changes[address] = actor.key
            actor_changes[actor.key] = actor
            for key in actor.index_keys():
                touched.setdefault(key, dict(self.bucket(key)))[actor.key] = actor
        return Identities(
            nodes=_updated(self.nodes, node_changes),
            agents=_updated(self.agents, agent_changes),
            actors=_updated(self.actors, actor_changes),
            index=_updated(self.index, {k: v if v else DELETE for k, v in touched.items()}),
            _addresses=_updated(self._addresses, address_changes),
        )


def _updated(mapping: Mapping[Any, Any], changes: Mapping[Any, object]) -> Any:
    if not changes:
        return mapping
    base = mapping if isinstance(mapping, CowMap) else CowMap(mapping)
    return base.updated(changes)


def _claim_addresses(addresses: dict[str, str], actor: Actor) -> None:
    for address in (actor.ipv4, actor.ipv6):
        if address is None:
            continue
        holder = addresses.get(address)
        if holder is not None and holder != actor.key:
            raise InvalidInput(f"address {address} of {actor.key} is already held by {holder}")
        addresses[address] = actor.key
