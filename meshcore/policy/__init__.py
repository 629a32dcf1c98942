"""The policy core of idmesh: the policy file, its compiler, and single-flow decisions.

Pure code: it reads the YAML text it is given and nothing else — no
nftables, no network, no clock. The controller stores and serves policies,
the node daemon's firewall applier renders :class:`NodeFilter` s; both sit
outside this package.

Semantics
---------

**Default deny.** Nothing reaches a node over the mesh unless some acl
allows it; an empty policy allows nothing (replies to allowed flows pass
by connection tracking).

**Acls are a union of allows; there are no deny rules.** A flow is allowed
when *any* acl's ``from`` matches its source and one of that acl's ``to``
entries covers its destination, protocol and port. Rule order does not
matter. We chose this, as Tailscale and Headscale do, because

* each rule can be read, reviewed and tested on its own — adding a rule can
  only ever open what it says, never close or reopen something elsewhere;
* there is no "first match wins" trap where a broad rule high up silently
  shadows a narrower one below (and no precedence to get wrong between
  allow and deny);
* it compiles to sets and an unordered list of accepts, which is what
  nftables evaluates in constant time per packet;
* the narrowing that deny rules are usually wanted for is expressed in the
  selector instead: ``via``, ``scope`` and ``agent`` say exactly which
  identities a rule is about ("reads from Nikita's agents, writes only from
  Nikita's own devices" is two allows, no deny).

**Selectors** (``from``) AND their fields: ``principal``, ``group``,
``owner``, ``tag``, ``node``, ``agent``, ``scope``, ``authorized: grant |
delegation`` and ``via: direct | agent | any`` (default ``any``).
``direct`` is a node's own address — a person's device or a tagged server
acting without an agent; a node acting directly acts as its owner, and a
tagged node has no principal. An agent acts with its own principal and
scopes, from the node it runs on (whose name, owner and tags selectors
also see). ``scope``, ``agent`` and ``authorized`` match agents only, so
they imply ``via: agent``. ``authorized: grant`` matches the agents born
from their principal's verified grant, ``authorized: delegation`` those
born on their node's word; without ``authorized`` a selector matches
agents either way (and its text and set name are what they always were).
In a test's or ``explain``'s ``from`` an agent is ``delegation``-authorized
unless it says ``authorized: grant``. Scope wildcards: see :mod:`.sources`.
Fields that contradict or hide each other are errors: see :mod:`.checks`.

**Delegations** say which nodes may start agents for a principal, with
which scopes, for how long — and ``requires_grant``, when the node's word
is not enough: ``false`` (the default) never, ``true`` always, or a list of
scope patterns: a birth needs the principal's grant when ANY scope it asks
for *overlaps* a listed pattern (some concrete ``resource:action`` lies
within both), so with ``["db:write"]`` a request for ``db:write`` or
``db:*`` needs one and ``db:read`` does not. A pattern that overlaps none
of the delegation's own scopes is an error. A birth is allowed when one
delegation covers it whole: see :func:`check_delegation`.

**Destinations** (``to``): service names, ``tag:NAME[:PORT]``,
``node:NAME[:PORT]``; a port is ``5432``, ``8000-8100`` or ``*``, and no
port means every port. A service brings its own nodes, ports and
protocol(s); for tag and node destinations the acl's ``protocol`` applies
(``tcp`` if not given; ``tcp``, ``udp``, ``icmp`` or a list).

Where to read on: the compiled data and its evaluation order —
:class:`NodeFilter`; the model — :mod:`.model`; errors with file locations —
:func:`load_policy`.
"""

from .compile import (
    AddressSet,
    Change,
    FilterDelta,
    FilterRule,
    MeshFilters,
    NodeFilter,
    apply_delta,
    compile_mesh,
    compile_node_filter,
    identity_delta,
)
from .delegations import check_delegation, grant_needed_for, node_named, within_grant
from .evaluate import (
    Decision,
    PolicyTestFailure,
    Target,
    actor_for,
    decide,
    decide_flow,
    explain,
    explain_address,
    run_tests,
)
from .fields import ALL_PORTS, Authorized, Destination, NodeSpec, PortRange, Protocol
from .identities import Actor, AgentIdentity, Identities, NodeIdentity
from .load import load_policy, validate_policy
from .model import Acl, Delegation, FlowSource, HttpMatch, Policy, PolicyTest, Route, Selector, Service
from .requests import AppRequest, RequestDecision, decide_request, decide_request_flow, scopes_supported
from .routes import (
    Gateway,
    NodeRoutes,
    RouteChoice,
    RouteDecision,
    compile_node_routes,
    explain_route,
    offer_users,
    route_for,
    routes_of,
)
from .sources import SourceClass, scopes_overlap, set_name

__all__ = [
    "ALL_PORTS",
    "Acl",
    "Actor",
    "AddressSet",
    "AgentIdentity",
    "AppRequest",
    "Authorized",
    "Change",
    "Decision",
    "Delegation",
    "Destination",
    "FilterDelta",
    "FilterRule",
    "FlowSource",
    "Gateway",
    "HttpMatch",
    "Identities",
    "MeshFilters",
    "NodeFilter",
    "NodeIdentity",
    "NodeRoutes",
    "NodeSpec",
    "Policy",
    "PolicyTest",
    "PolicyTestFailure",
    "PortRange",
    "Protocol",
    "RequestDecision",
    "Route",
    "RouteChoice",
    "RouteDecision",
    "Selector",
    "Service",
    "SourceClass",
    "Target",
    "actor_for",
    "apply_delta",
    "check_delegation",
    "compile_mesh",
    "compile_node_filter",
    "compile_node_routes",
    "decide",
    "decide_flow",
    "decide_request",
    "decide_request_flow",
    "explain",
    "explain_address",
    "explain_route",
    "grant_needed_for",
    "identity_delta",
    "load_policy",
    "node_named",
    "offer_users",
    "route_for",
    "routes_of",
    "run_tests",
    "scopes_overlap",
    "scopes_supported",
    "set_name",
    "validate_policy",
    "within_grant",
]
