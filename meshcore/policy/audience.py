"""Which nodes need an agent identity: targeted distribution of agent births and deaths.

Pure: no I/O, no clock. The controller's stream hub asks it where an
:class:`~meshcore.wire.stream.AgentUpdate` must go, instead of sending every
agent to every node (as Tailscale sends a node only the peers its ACL lets it
see).

The rule
--------
A node uses the agent identities it receives (meshd) for its nftables filter
(:func:`~.compile.compile_node_filter`), its identity routes
(:func:`~.routes.compile_node_routes`), the requests it serves (``meshctl
serve`` looks the caller up by address) and ``whois``/the flow log. An agent
A — principal P, scopes S, name, authorization, running on node H (with H's
name, owner and tags) — changes what node N compiles only when

1. **N is H**, always: N's own agents are senders of its routes, the
   ``to`` sets of agents-as-servers rules, and what its workload API and
   ``meshctl agent list`` show;
2. **N is a destination of an acl whose** ``from`` **matches A**: A's
   address is in that rule's source set on N. Destinations are a service's
   nodes (``tag:``/``node:``), ``tag:T`` (every node tagged T), ``node:N``,
   and agents (``'{principal: P, scope: S}:PORT'``): *every node whose name,
   tags and owner the destination selector's* ``node``/``tag``/``owner``
   *allow* — every node if it names none — because the compiler puts such a
   rule, and A in its source set, on each of those nodes whether or not an
   agent it admits to runs there yet (a node knows its agents before the
   controller does: they are born there). An acl narrowed to some requests
   (``http``, ``mcp_tools``) counts whatever the node serves now (what it
   serves changes without the controller being told);
3. **N is a gateway a routes rule whose** ``from`` **matches A names** in
   ``via`` (``node:N``, or every node tagged T), whether or not it offers the
   prefix now (offers come and go with the netmap, not with the policy): A's
   address is in the gateway's forwarding grants.

Nothing else a node compiles depends on an agent of another node (its
WireGuard peers are nodes, whose blocks already cover their agents).
"Matches" is the compiler's :meth:`~.sources.SourceClass.matches` for the
agent as an actor (``via: direct`` rules never match an agent), with
whatever the caller does not say counted as matching: ``authorized`` and
the agent's ``name`` when not given, and the owner and tags of a node this
audience does not know. Groups are the policy's, so a membership change is
a policy change.

A node outside A's audience never holds A, so its ``whois`` does not know
A's address and its flow log attributes a denied packet from A to no one
(the controller, which keeps every agent, still can). That packet was
refused by rule, not for a missing identity: no rule on that node could
admit A.

Not narrowed on purpose (conservative: a missing identity is a wrongly
refused connection, an extra one only a delivery):

* agents destinations are not narrowed by ``delegations`` (which nodes may
  mint agents for P): an agent born under an older policy outlives a policy
  change, and a sub-agent is born on its parent's word;
* first-match among routes rules is ignored (which rule wins depends on the
  gateways' offers): every rule that matches counts.

Cost
----
:class:`Audience` is built once per (policy, nodes) in O(rules + nodes).
Per call: the agent's *signature* — (principal, scopes, the node's shape:
its name if a selector names it, its owner if a selector names an owner,
its tags that selectors name; name and authorization if selectors use
them) — is looked up in a memo; on a miss the acls and routes indexed under
its principal (and those naming no principal or group) are matched, and
the union of their targets is interned and resolved to node names once.
Adding, changing or removing a node updates the tag and owner indexes and
drops the resolved sets that name it, its tags or its owner (rebuilt on
demand; one pass over the distinct targets, a few hundred); the memo stays.
A new policy is a new :class:`Audience` (about 13 ms for 10,000 nodes and
50 rules: bench/bench_distribution.py).

:class:`LiveAgents` is the controller's index of live agents on top of it:
agents are grouped by target (the union of the destinations of the rules
they match: few, as there are few rules), so a birth or a death costs one
signature look-up, a stream opening (:meth:`LiveAgents.of_node`) one test
per group plus the agents returned, and a policy change
(:meth:`LiveAgents.rebase`) one signature per live agent — never nodes x
agents.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, KeysView, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import NamedTuple, Protocol, TypeVar

from ..scopes import Scope, parse_scope, scopes_overlap
from .fields import Authorized, NodeSpec
from .model import Policy, Selector
from .sources import SourceClass, source_class

__all__ = ["Audience", "AudienceNode", "LiveAgents", "NodeLike", "Reach", "Resend"]

T = TypeVar("T")

_MEMO_LIMIT = 1 << 17
"""Signatures remembered before the memo starts afresh (a miss costs one match of the indexed rules)."""


class NodeLike(Protocol):
    """What the audience needs of a node: :class:`NodeIdentity`, a netmap's ``PeerNode`` or :class:`AudienceNode`."""

    @property
    def name(self) -> str: ...

    @property
    def owner(self) -> str | None: ...

    @property
    def tags(self) -> Collection[str]: ...


class AudienceNode(NamedTuple):
    """A node as the audience sees it: no addresses needed."""

    name: str
    owner: str | None = None
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Reach:
    """Where one agent identity goes: its own node ``home``, and ``nodes`` (None: every node).

    ``nodes`` is shared between agents whose rules reach the same nodes: never modify it,
    and do not expect it to hold ``home``.
    """

    home: str
    nodes: frozenset[str] | None

    def __contains__(self, node: object) -> bool:
        return node == self.home or self.nodes is None or node in self.nodes

    def pick(self, subscribers: Mapping[str, T]) -> list[T]:
        """The subscribers (by node name) to deliver to, each once: the smaller side is iterated."""
        nodes = self.nodes
        if nodes is None:
            return list(subscribers.values())
        if len(nodes) <= len(subscribers):
            out = [s for n in nodes if (s := subscribers.get(n)) is not None]
        else:
            out = [s for n, s in subscribers.items() if n in nodes]
        if self.home not in nodes and (own := subscribers.get(self.home)) is not None:
            out.append(own)
        return out


@dataclass(frozen=True, slots=True)
class Resend:
    """After a change of policy or of a node: ``agents`` must be sent to ``nodes`` (None: every node).

    Some of those nodes may hold some of them already (the node skips a
    certificate it holds); none that needs one is left out.
    """

    nodes: frozenset[str] | None
    agents: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Target:
    """Nodes by name, by tag, by owner; ``every``: all of them."""

    every: bool = False
    names: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    owners: frozenset[str] = frozenset()

    def __or__(self, other: _Target) -> _Target:
        if self.every or other.every:
            return _EVERY
        return _Target(False, self.names | other.names, self.tags | other.tags, self.owners | other.owners)


_EVERY = _Target(every=True)
_NOBODY = _Target()
_NONE: frozenset[str] = frozenset()


def _spec_target(spec: NodeSpec) -> _Target:
    if spec.kind == "tag":
        return _Target(tags=frozenset((spec.name,)))
    if spec.kind == "owner":
        return _Target(owners=frozenset((spec.name,)))
    return _Target(names=frozenset((spec.name,)))


def _agents_target(selector: Selector) -> _Target:
    """The nodes an agents destination is compiled on (a superset when it names several of node/tag/owner)."""
    if selector.node is not None:
        return _Target(names=frozenset((selector.node,)))
    if selector.tag is not None:
        return _Target(tags=frozenset((selector.tag,)))
    if selector.owner is not None:
        return _Target(owners=frozenset((selector.owner,)))
    return _EVERY


def _targets(policy: Policy) -> dict[str, tuple[SourceClass, _Target]]:
    """Per source class (by set name): the class and every node its acls and routes reach."""
    out: dict[str, tuple[SourceClass, _Target]] = {}

    def add(selector: Selector, target: _Target) -> None:
        source = source_class(selector, policy.groups)
        if source.via == "direct":
            return  # never an agent
        had = out.get(source.name)
        out[source.name] = (source, target if had is None else had[1] | target)

    for acl in policy.acls:
        for dest in acl.to:
            if dest.kind == "service":
                for spec in policy.services[dest.name].nodes:
                    add(acl.source, _spec_target(spec))
            elif dest.kind == "agents":
                add(acl.source, _agents_target(dest.selector))
            else:
                add(acl.source, _spec_target(NodeSpec(dest.kind, dest.name)))
    for route in policy.routes:
        for spec in route.via:
            add(route.source, _spec_target(spec))
    return out


@lru_cache(maxsize=4096)
def _parse(text: str) -> Scope:
    return parse_scope(text)


def _scope(value: str | Scope) -> Scope:
    return value if isinstance(value, Scope) else _parse(value)


_Shape = tuple[str | None, str | None, frozenset[str], bool]
"""A node as selectors see it: (name if named, owner if owners are named, named tags, known)."""
_Key = tuple[str, frozenset[str | Scope], _Shape, str | None, str | None]


class Audience:
    """The nodes that need each agent identity under one policy (module docstring: the rule, the cost).

    ``nodes``: the mesh's nodes; change them with :meth:`add_node` and
    :meth:`remove_node`. A new policy needs a new audience.
    """

    def __init__(self, policy: Policy, nodes: Iterable[NodeLike] = ()) -> None:
        self.policy = policy
        rules = list(_targets(policy).values())
        self._rules: tuple[tuple[SourceClass, _Target], ...] = tuple(rules)
        by_principal: dict[str, list[int]] = {}
        anyone: list[int] = []
        for i, (source, _) in enumerate(rules):
            if source.principal is not None:
                by_principal.setdefault(source.principal, []).append(i)
            elif source.members is not None:
                for member in source.members:
                    by_principal.setdefault(member, []).append(i)
            else:
                anyone.append(i)
        self._by_principal = {p: tuple(v) for p, v in by_principal.items()}
        self._anyone = tuple(anyone)
        sources = [s for s, _ in rules]
        self._named_nodes = frozenset(s.node for s in sources if s.node is not None)
        self._named_tags = frozenset(s.tag for s in sources if s.tag is not None)
        self._owners_named = any(s.owner is not None for s in sources)
        self._names_used = any(s.agent is not None for s in sources)
        self._authorized_used = any(s.authorized is not None for s in sources)
        self.generation = 0
        """Grows with every node change: a resolved set taken before is stale."""
        self._nodes: dict[str, tuple[str | None, frozenset[str]]] = {}
        self._shapes: dict[str, _Shape] = {}
        self._by_tag: dict[str, set[str]] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._memo: dict[_Key, _Target] = {}
        self._interned: dict[_Target, _Target] = {}
        self._resolved: dict[int, frozenset[str] | None] = {}  # by id() of an interned target
        for node in nodes:
            self._put(node)

    # -- the mesh's nodes ------------------------------------------------------------------------------------
    @property
    def nodes(self) -> KeysView[str]:
        return self._nodes.keys()

    def knows(self, name: str) -> bool:
        return name in self._nodes

    def add_node(self, node: NodeLike) -> bool:
        """Add ``node`` or replace the node of its name; True when its owner or tags changed (its agents'
        signatures with them: :meth:`LiveAgents.node_changed`)."""
        old = self._nodes.get(node.name)
        self._put(node)
        new = self._nodes[node.name]
        self._stale(node.name, old, new)
        return old is not None and old != new

    def remove_node(self, name: str) -> None:
        old = self._nodes.get(name)
        self._drop(name)
        self._stale(name, old, None)

    def _stale(self, name: str, *seen: tuple[str | None, frozenset[str]] | None) -> None:
        """Forget the resolved sets a node joining, changing or leaving may change: those naming it, its
        tags or its owner (before and after), and those that held every node; the others stay."""
        tags = frozenset().union(*(s[1] for s in seen if s is not None))
        owners = {s[0] for s in seen if s is not None and s[0] is not None}
        for target in self._interned.values():
            key = id(target)
            if key not in self._resolved or target.every:
                continue
            if (self._resolved[key] is None or name in target.names or not tags.isdisjoint(target.tags)
                    or not owners.isdisjoint(target.owners)):
                del self._resolved[key]
        self.generation += 1

    def _put(self, node: NodeLike) -> None:
        self._drop(node.name)
        owner, tags = node.owner, frozenset(node.tags)
        self._nodes[node.name] = (owner, tags)
        for tag in tags:
            self._by_tag.setdefault(tag, set()).add(node.name)
        if owner is not None:
            self._by_owner.setdefault(owner, set()).add(node.name)
        self._shapes[node.name] = (node.name if node.name in self._named_nodes else None,
                                   owner if self._owners_named else None, tags & self._named_tags, True)

    def _drop(self, name: str) -> None:
        had = self._nodes.pop(name, None)
        if had is None:
            return
        del self._shapes[name]
        owner, tags = had
        for tag in tags:
            self._by_tag[tag].discard(name)
        if owner is not None:
            self._by_owner[owner].discard(name)

    # -- where an agent goes ---------------------------------------------------------------------------------
    def reach(self, principal: str, scopes: Iterable[str | Scope], node: str, name: str | None = None, *,
              authorized: Authorized | None = None) -> Reach:
        """Where an agent of ``principal`` with ``scopes`` on ``node`` must go; nothing copied.

        ``name`` (what ``agent:`` selectors match) and ``authorized`` are
        counted as matching when not given.
        """
        return Reach(node, self._shared(self._key(principal, scopes, node, name, authorized)))

    def nodes_for(self, principal: str, scopes: Iterable[str | Scope], node: str, name: str | None = None, *,
                  authorized: Authorized | None = None) -> frozenset[str] | None:
        """Every node that needs the agent, its own included; None: every node.

        Copies the shared set when ``node`` is not in it: :meth:`reach` does not.
        """
        shared = self._shared(self._key(principal, scopes, node, name, authorized))
        if shared is None or node in shared:
            return shared
        return shared | {node}

    def wants(self, node: str, principal: str, scopes: Iterable[str | Scope], agent_node: str,
              name: str | None = None, *, authorized: Authorized | None = None) -> bool:
        """Whether ``node`` needs the agent (of ``principal`` with ``scopes``, on ``agent_node``)."""
        if node == agent_node:
            return True
        shared = self._shared(self._key(principal, scopes, agent_node, name, authorized))
        return shared is None or node in shared

    def _key(self, principal: str, scopes: Iterable[str | Scope], node: str, name: str | None,
             authorized: Authorized | None) -> _Key:
        shape = self._shapes.get(node)
        if shape is None:  # a node not known (yet): its owner and tags match whatever a selector asks
            shape = (node if node in self._named_nodes else None, None, _NONE, False)
        return (principal, scopes if isinstance(scopes, frozenset) else frozenset(scopes), shape,
                name if self._names_used else None, authorized if self._authorized_used else None)

    def _shared(self, key: _Key) -> frozenset[str] | None:
        return self._nodes_of(self._target(key))

    def _target(self, key: _Key) -> _Target:
        target = self._memo.get(key)
        if target is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            target = self._memo[key] = self._match(key)
        return target

    def _nodes_of(self, target: _Target) -> frozenset[str] | None:
        try:
            return self._resolved[id(target)]
        except KeyError:
            resolved = self._resolved[id(target)] = self._resolve(target)
            return resolved

    def _match(self, key: _Key) -> _Target:
        """The union of the targets of every rule whose source matches the signature, interned."""
        principal, scopes, (shape_name, owner, tags, known), name, authorized = key
        held = [_scope(s) for s in scopes]
        target = _NOBODY
        for i in chain(self._by_principal.get(principal, ()), self._anyone):
            source, reached = self._rules[i]
            if (
                (source.principal is not None and source.principal != principal)
                or (source.members is not None and principal not in source.members)
                or (known and source.owner is not None and source.owner != owner)
                or (known and source.tag is not None and source.tag not in tags)
                or (source.node is not None and source.node != shape_name)
                or (source.agent is not None and name is not None and source.agent != name)
                or (source.authorized is not None and authorized is not None and source.authorized != authorized)
                or (source.scope is not None and not any(scopes_overlap(source.scope, s) for s in held))
            ):
                continue
            target = target | reached
            if target.every:
                break
        # interned (and kept): signatures with equal targets share one resolved set
        return self._interned.setdefault(target, target)

    def _resolve(self, target: _Target) -> frozenset[str] | None:
        if target.every:
            return None
        out = {n for n in target.names if n in self._nodes}
        for tag in target.tags:
            out |= self._by_tag.get(tag, set())
        for owner in target.owners:
            out |= self._by_owner.get(owner, set())
        if out and len(out) == len(self._nodes):
            return None
        return frozenset(out) if out else _NONE


@dataclass(slots=True)
class _Group:
    """Live agents with one target (interned, so one per distinct set of rules' destinations): where they go
    now (``shared``) and every node they may have reached (``delivered``)."""

    target: _Target
    members: set[str]
    shared: frozenset[str] | None
    delivered: frozenset[str] | None
    generation: int


@dataclass(slots=True)
class _Live:
    group: _Group
    node: str
    principal: str
    scopes: frozenset[str | Scope]
    name: str | None
    authorized: Authorized | None


def _union(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None or b is None:
        return None
    if a is b or b <= a:
        return a
    return a | b


class LiveAgents:
    """The controller's index of live agents: where each birth and death goes, what a node must hold.

    Agents are grouped by target (module docstring). Each group remembers
    every node its agents may have been sent to (``delivered``), so a death
    reaches every node that may hold the agent even after the policy or a
    node changed; the agent's own node is always one of them.

    The contract with the hub that sends: a birth goes to what :meth:`add`
    returns, a death to what :meth:`remove` returns, a node's stream starts
    with :meth:`of_node`, and every :class:`Resend` of :meth:`rebase` and
    :meth:`node_changed` is sent. Then every node that needs a live agent
    has been sent it, whatever the order of births, deaths, nodes joining,
    changing and leaving, streams reopening and policy changes
    (tests/unit/test_audience.py checks it). An agent that expires is
    :meth:`remove` d too (nothing to send: nodes expire it on their own
    clock), or the index keeps it.
    """

    def __init__(self, audience: Audience) -> None:
        self.audience = audience
        self._agents: dict[str, _Live] = {}
        self._groups: dict[int, _Group] = {}  # by id() of the audience's interned target
        self._by_node: dict[str, set[str]] = {}
        self._scope_sets: dict[frozenset[str | Scope], frozenset[str | Scope]] = {}  # interned: few distinct

    def __len__(self) -> int:
        return len(self._agents)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    @property
    def groups(self) -> int:
        return len(self._groups)

    def add(self, agent_id: str, principal: str, scopes: Iterable[str | Scope], node: str,
            name: str | None = None, *, authorized: Authorized | None = None) -> Reach:
        """A birth: remember the agent; returns where to send it."""
        if agent_id in self._agents:
            self.remove(agent_id)
        frozen = scopes if isinstance(scopes, frozenset) else frozenset(scopes)
        frozen = self._scope_sets.setdefault(frozen, frozen)
        group = self._group(self.audience._target(self.audience._key(principal, frozen, node, name, authorized)))
        group.members.add(agent_id)
        self._agents[agent_id] = _Live(group, node, principal, frozen, name, authorized)
        self._by_node.setdefault(node, set()).add(agent_id)
        return Reach(node, group.shared)

    def remove(self, agent_id: str) -> Reach | None:
        """A death: forget the agent; returns every node that may hold it (None: not live here)."""
        live = self._agents.pop(agent_id, None)
        if live is None:
            return None
        group = self._fresh(live.group)
        reach = Reach(live.node, group.delivered)
        group.members.discard(agent_id)
        if not group.members:
            del self._groups[id(group.target)]
        on_node = self._by_node[live.node]
        on_node.discard(agent_id)
        if not on_node:
            del self._by_node[live.node]
        return reach

    def reach_of(self, agent_id: str) -> Reach | None:
        """Where a live agent goes now (for a revocation, :meth:`remove` says more: every node it reached)."""
        live = self._agents.get(agent_id)
        return None if live is None else Reach(live.node, self._fresh(live.group).shared)

    def of_node(self, node: str) -> list[str]:
        """The live agents ``node`` must hold: what its stream starts with (``AgentUpdate(full=True)``).

        For a node that just enrolled, :meth:`node_changed` adds it to the audience (and answers for a
        stream opened before).
        Cost: one membership test per group, plus the agents returned.
        """
        out: list[str] = []
        taken: set[int] = set()
        for group in self._groups.values():
            shared = self._fresh(group).shared
            if shared is None or node in shared:
                out.extend(group.members)
                taken.add(id(group))
        for agent_id in self._by_node.get(node, ()):
            if id(self._agents[agent_id].group) not in taken:
                out.append(agent_id)
        return out

    def agents_on(self, node: str) -> list[str]:
        return list(self._by_node.get(node, ()))

    def rebase(self, audience: Audience) -> list[Resend]:
        """A new policy: regroup every live agent under ``audience``; returns what must be sent where.

        Only additions are returned (nodes that now need agents they may not
        hold); a node that no longer needs one keeps it until it dies or the
        node's stream restarts, which costs nothing but memory (a revocation
        would forbid it for good). Cost: one signature per live agent.
        """
        moving = [(g, self._fresh(g).shared, list(g.members)) for g in self._groups.values()]
        self.audience, self._groups = audience, {}
        return self._regroup(moving)

    def node_changed(self, node: NodeLike) -> list[Resend]:
        """A node was added or re-enrolled with other tags or owner: update the audience, regroup its agents.

        Returns what must be sent: its agents to the nodes that now need
        them, and to the node itself every agent it now needs — also when it
        just joined, for a stream it may have opened on a replica that had
        not heard of it yet (with no stream open, there is no one to send to).
        """
        joined = not self.audience.knows(node.name)
        moving: dict[int, tuple[_Group, frozenset[str] | None, list[str]]] = {}
        for agent_id in self._by_node.get(node.name, ()):
            group = self._agents[agent_id].group
            entry = moving.get(id(group))
            if entry is None:  # what its agents were sent, before the change
                entry = moving[id(group)] = (group, self._fresh(group).shared, [])
            entry[2].append(agent_id)
        if not self.audience.add_node(node) and not joined:
            return []
        for group, _, ids in moving.values():
            group.members.difference_update(ids)
            if not group.members:
                del self._groups[id(group.target)]
        out = self._regroup(list(moving.values()))
        wanted = [a for a in self.of_node(node.name) if self._agents[a].node != node.name]  # it has its own
        if wanted:
            out.append(Resend(frozenset((node.name,)), tuple(wanted)))
        return out

    def forget_node(self, name: str) -> list[str]:
        """A node left the mesh: forget it and its agents (every node drops them on the netmap delta)."""
        gone = list(self._by_node.get(name, ()))
        for agent_id in gone:
            self.remove(agent_id)
        self.audience.remove_node(name)
        return gone

    def _regroup(self, moving: list[tuple[_Group, frozenset[str] | None, list[str]]]) -> list[Resend]:
        """Move agents from their old groups to the ones the audience says now; returns the nodes in a new
        group's ``shared`` that were not in the old one's (every member of a group has been sent its
        ``shared``: at birth, in a stream's start, or in a Resend; ``delivered`` may say more)."""
        pairs: dict[tuple[int, int], tuple[frozenset[str] | None, _Group, list[str]]] = {}
        for old, held, ids in moving:
            for agent_id in ids:
                live = self._agents[agent_id]
                new = self._group(self.audience._target(self.audience._key(
                    live.principal, live.scopes, live.node, live.name, live.authorized)))
                new.members.add(agent_id)
                live.group = new
                pair = pairs.get((id(old), id(new)))
                if pair is None:
                    pair = pairs[(id(old), id(new))] = (held, new, [])
                    new.delivered = _union(new.delivered, old.delivered)
                pair[2].append(agent_id)
        out: list[Resend] = []
        for held, new, ids in pairs.values():
            if new.shared is None:
                if held is not None:
                    out.append(Resend(None, tuple(ids)))
            elif held is not None and (extra := new.shared - held):
                out.append(Resend(extra, tuple(ids)))
        return out

    def _group(self, target: _Target) -> _Group:
        group = self._groups.get(id(target))  # interned by the audience, which outlives its groups
        if group is None:
            shared = self.audience._nodes_of(target)
            group = self._groups[id(target)] = _Group(target, set(), shared, shared, self.audience.generation)
            return group
        return self._fresh(group)

    def _fresh(self, group: _Group) -> _Group:
        """The group with ``shared`` as the audience says now (nodes came or went since)."""
        if group.generation != self.audience.generation:
            group.shared = self.audience._nodes_of(group.target)
            group.delivered = _union(group.delivered, group.shared)
            group.generation = self.audience.generation
        return group

    def __iter__(self) -> Iterator[str]:
        return iter(self._agents)
