"""The policy file of SPEC.md §4 as pydantic models.

The models check each value's shape (names, ports, scopes, prefixes); the
checks that need the whole file — unknown groups and services, fields that
can never matter — run in :mod:`.checks` when a :class:`Policy` is built, so
a :class:`Policy` that exists is a policy that is valid as a whole. Build one
with :func:`~meshcore.policy.load_policy` to get errors with file locations.

Sections and what a missing one means:

* ``groups``: name -> principals. Missing: no groups.
* ``services``: name -> nodes (``tag:``/``node:``), ports, protocol (tcp by default).
* ``acls``: allow rules, ``from`` a selector ``to`` destinations. Missing: nothing is allowed.
* ``tests``: flows with an expected verdict, run by ``policy check`` and before every apply.
* ``delegations``: who may mint agents for whom, and which scopes need the principal's grant
  (:mod:`.delegations`).
* ``routes``: which gateway carries whose traffic to a prefix (:mod:`.routes`).
* ``mcp``: what meshd does with MCP requests from sources that are not agents (shadow MCP,
  :mod:`.requests`): ``report`` (the default) logs them, ``agents-only`` refuses them too.

An acl may narrow what it allows at the application layer, for the ports
meshd serves (``meshctl serve``): ``http`` lists methods and path globs,
``mcp_tools`` the MCP tools (``tools/call`` names) that may be called
(:mod:`.requests`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    TypeAdapter,
    field_validator,
    model_validator,
)

from ..durations import format_duration
from ..problems import ProblemsFound
from ..scopes import Scope
from .fields import (
    Authorized,
    Destination,
    NodeSpec,
    PortRange,
    Prefix,
    Protocol,
    check_agent_name,
    check_authorized,
    check_label,
    check_method,
    check_path,
    check_path_glob,
    check_principal,
    check_tool_name,
    parse_destination,
    parse_duration_value,
    parse_node_spec,
    parse_port_range,
    parse_prefix,
    parse_protocols,
    parse_scope_value,
)

if TYPE_CHECKING:
    from ..yamlsource import SourceMap

__all__ = [
    "Acl",
    "Delegation",
    "FlowSource",
    "HttpMatch",
    "Policy",
    "PolicyTest",
    "Route",
    "Selector",
    "Service",
    "Via",
]

Via = Literal["direct", "agent", "any"]


def _optional(check: Any) -> PlainValidator:
    """A validator that refuses an explicit null: ``principal: ~`` must not mean "anyone"."""

    def validate(value: object) -> object:
        if value is None:
            raise ValueError("a value is required here (remove the key to leave it out)")
        return check(value)

    return PlainValidator(validate)


# Optional fields keep their validator on the whole ``X | None`` annotation,
# so an explicit YAML null reaches it and is refused instead of meaning "any".
_Principal = Annotated[str | None, _optional(check_principal)]
_Agent = Annotated[str | None, _optional(check_agent_name)]
_Group = Annotated[str | None, _optional(lambda v: check_label("group", v))]
_Tag = Annotated[str | None, _optional(lambda v: check_label("tag", v))]
_Node = Annotated[str | None, _optional(lambda v: check_label("node", v))]
_ScopeOpt = Annotated[Scope | None, _optional(parse_scope_value), PlainSerializer(lambda s: None if s is None else str(s))]
_ScopeItem = Annotated[Scope, PlainValidator(parse_scope_value), PlainSerializer(str)]
_AuthorizedOpt = Annotated[Authorized | None, _optional(check_authorized)]
_PrincipalItem = Annotated[str, PlainValidator(check_principal)]
_GroupKey = Annotated[str, PlainValidator(lambda v: check_label("group", v))]
_ServiceKey = Annotated[str, PlainValidator(lambda v: check_label("service", v))]
_Port = Annotated[PortRange, PlainValidator(parse_port_range), PlainSerializer(str)]
_Protocols = Annotated[tuple[Protocol, ...], PlainValidator(parse_protocols), PlainSerializer(list)]
_ProtocolsOpt = Annotated[
    tuple[Protocol, ...] | None, _optional(parse_protocols), PlainSerializer(lambda v: None if v is None else list(v))
]
def _destination(value: object) -> Destination:
    """``db``, ``tag:NAME[:PORT]``, ``node:NAME[:PORT]``, or agents: ``'{principal: P, scope: S}:PORT'``."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        text, colon, port = value.strip().rpartition("}:")
        if not colon:
            text = value.strip()[:-1] if value.strip().endswith("}") else ""
        try:
            data = yaml.safe_load(text + "}") if text else None
        except yaml.YAMLError as exc:
            raise ValueError(f"invalid destination {value!r}: expected agents as '{{principal: P, scope: S}}:PORT'"
                             ) from exc
        if not isinstance(data, dict):
            raise ValueError(f"invalid destination {value!r}: expected agents as '{{principal: P, scope: S}}:PORT'")
        if data.get("via", "agent") != "agent":
            raise ValueError(f"invalid destination {value!r}: a selector destination names agents (via: agent)")
        selector = Selector.model_validate({**data, "via": "agent"})
        return Destination("agents", selector.text(), parse_port_range(port) if colon else None, selector)
    return parse_destination(value)


_Destination = Annotated[Destination, PlainValidator(_destination), PlainSerializer(str)]
_Target = Annotated[NodeSpec, PlainValidator(parse_node_spec), PlainSerializer(str)]
_DelegateNodes = Annotated[
    NodeSpec, PlainValidator(lambda v: parse_node_spec(v, ("owner", "tag", "node"))), PlainSerializer(str)
]
_Duration = Annotated[timedelta, PlainValidator(parse_duration_value), PlainSerializer(format_duration)]
_Method = Annotated[str, PlainValidator(check_method)]
_Path = Annotated[str, PlainValidator(check_path)]
_PathGlob = Annotated[str, PlainValidator(check_path_glob)]
_ToolName = Annotated[str, PlainValidator(check_tool_name)]
_Prefix = Annotated[Prefix, PlainValidator(parse_prefix), PlainSerializer(str)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Selector(_Model):
    """``from``: whom a rule is about. Fields are ANDed; a missing field matches anything.

    ``via`` says how the identity acts: ``direct`` is a node's own address (a
    person's device, or a tagged server, acting without an agent), ``agent``
    is an agent's address, ``any`` (the default) is both. ``scope``,
    ``agent`` and ``authorized`` only ever match agents, so they imply
    ``via: agent``. ``authorized: grant`` matches agents born from their
    principal's verified grant, ``authorized: delegation`` agents born on
    their node's word (a delegation that did not require a grant).
    """

    principal: _Principal = None
    group: _Group = None
    owner: _Principal = None
    tag: _Tag = None
    node: _Node = None
    via: Via | None = None
    agent: _Agent = None
    scope: _ScopeOpt = None
    authorized: _AuthorizedOpt = None

    @property
    def effective_via(self) -> Via:
        """The ``via`` the selector means, with ``scope``/``agent``/``authorized`` implying agents."""
        if self.scope is not None or self.agent is not None or self.authorized is not None:
            return "agent"
        return self.via or "any"

    def text(self) -> str:
        """Canonical one-line form: equal selectors (by meaning) have equal text.

        Set names are derived from it, so it must not change between releases
        without a reason: a changed text renames every set on every node.
        """
        parts = [
            f"{key}: {value}"
            for key, value in (
                ("principal", self.principal),
                ("group", self.group),
                ("owner", self.owner),
                ("tag", self.tag),
                ("node", self.node),
            )
            if value is not None
        ]
        if self.effective_via != "any" or not parts and self.agent is None:
            parts.append(f"via: {self.effective_via}")
        if self.agent is not None:
            parts.append(f"agent: {self.agent}")
        if self.authorized is not None:  # only when set, so the texts (and set names) of older selectors stay
            parts.append(f"authorized: {self.authorized}")
        if self.scope is not None:
            parts.append(f'scope: "{self.scope}"')
        return "{" + ", ".join(parts) + "}"


class Service(_Model):
    """A named destination: nodes (``tag:NAME``/``node:NAME``), ports and protocol(s)."""

    nodes: tuple[_Target, ...] = Field(min_length=1)
    ports: tuple[_Port, ...] = ()
    protocol: _Protocols = ("tcp",)


class HttpMatch(_Model):
    """One entry of an acl's ``http``: requests with one of ``methods`` to a path matching one of ``paths``.

    A missing list matches anything: ``{methods: [GET]}`` is every GET. Paths
    are globs (``*`` within one segment, ``**`` across segments) matched
    against the request's path without its query.
    """

    methods: tuple[_Method, ...] | None = Field(default=None, min_length=1)
    paths: tuple[_PathGlob, ...] | None = Field(default=None, min_length=1)

    def text(self) -> str:
        parts = []
        if self.methods is not None:
            parts.append(f"methods: [{', '.join(self.methods)}]")
        if self.paths is not None:
            parts.append(f"paths: [{', '.join(self.paths)}]")
        return "{" + ", ".join(parts) + "}"


class Acl(_Model):
    """An allow rule. ``protocol`` applies to ``tag:``/``node:`` destinations (tcp if missing);
    a service brings its own.

    ``http`` and ``mcp_tools`` narrow the rule to some requests (:mod:`.requests`):
    such a rule admits connections only to ports meshd serves, where each
    request is checked; on any other port it allows nothing.
    """

    source: Selector = Field(alias="from")
    to: tuple[_Destination, ...] = Field(min_length=1)
    protocol: _ProtocolsOpt = None
    http: tuple[HttpMatch, ...] | None = Field(default=None, min_length=1)
    mcp_tools: tuple[_ToolName, ...] | None = Field(default=None, min_length=1)

    @property
    def narrowed(self) -> bool:
        """The rule allows some requests only, not whole connections."""
        return self.http is not None or self.mcp_tools is not None

    def text(self) -> str:
        proto = "" if self.protocol is None else f", protocol: {'/'.join(self.protocol)}"
        http = "" if self.http is None else f", http: [{', '.join(m.text() for m in self.http)}]"
        tools = "" if self.mcp_tools is None else f", mcp_tools: [{', '.join(self.mcp_tools)}]"
        return f"from {self.source.text()} to [{', '.join(str(d) for d in self.to)}]{proto}{http}{tools}"


_SCOPE_LIST: TypeAdapter[tuple[Scope, ...]] = TypeAdapter(tuple[_ScopeItem, ...])


def _requires_grant(value: object) -> bool | tuple[Scope, ...]:
    """``true``, ``false`` or a list of scope patterns (each checked where it is written)."""
    if isinstance(value, bool):
        return value
    if value is None:
        raise ValueError("a value is required here: true, false or a list of scopes (or remove the key)")
    if isinstance(value, str):
        raise ValueError(f'expected true, false or a list of scopes: for one scope write ["{value}"]')  # noqa: TRY004
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected true, false or a list of scopes, got {value!r}")  # noqa: TRY004
    # A ValidationError raised here keeps its item locations (requires_grant[1]), below this field's.
    return _SCOPE_LIST.validate_python(value)


def _requires_grant_data(value: bool | tuple[Scope, ...]) -> bool | list[str]:
    return value if isinstance(value, bool) else [str(s) for s in value]


_RequiresGrant = Annotated[
    bool | tuple[Scope, ...], PlainValidator(_requires_grant), PlainSerializer(_requires_grant_data)
]


class Delegation(_Model):
    """Which nodes may mint agents for ``principal``, with which scopes, for how long.

    ``requires_grant`` says which requests need the principal's own signed
    grant rather than the node's word: ``false`` (the default) none, ``true``
    all, a list of scope patterns those asking for a scope that overlaps one
    of them (:mod:`.delegations`).
    """

    principal: _PrincipalItem
    nodes: tuple[_DelegateNodes, ...] = Field(min_length=1)
    scopes: tuple[_ScopeItem, ...] = Field(min_length=1)
    max_ttl: _Duration
    requires_grant: _RequiresGrant = False


def _one_or_many(value: object) -> object:
    """``to: 10.20.0.0/16`` and ``to: [10.20.0.0/16]`` mean the same."""
    return [value] if isinstance(value, str) else value


class Route(_Model):
    """Traffic ``from`` a selector ``to`` prefixes goes ``via`` gateways, tried in the order given.

    ``via`` names a node (``node:NAME``) or every node with a tag
    (``tag:NAME``, in name order); only gateways that advertise a route
    covering the prefix count. The first listed gateway that is up carries
    the traffic; the others take over when it stops answering.
    """

    source: Selector = Field(alias="from")
    to: tuple[_Prefix, ...] = Field(min_length=1)
    via: tuple[_Target, ...] = Field(min_length=1)

    @field_validator("to", "via", mode="before")
    @classmethod
    def _scalar(cls, value: object) -> object:
        return _one_or_many(value)

    def text(self) -> str:
        return (f"from {self.source.text()} to [{', '.join(str(p) for p in self.to)}] "
                f"via [{', '.join(str(v) for v in self.via)}]")


class FlowSource(_Model):
    """A test's ``from``: one hypothetical identity, not a pattern.

    ``via`` is ``agent`` when ``scope``/``scopes``/``agent``/``authorized``
    is given, else ``direct``. An agent is ``authorized: delegation`` unless
    it says ``authorized: grant``, as every agent a node starts on its own
    word is. Acting directly, a node's principal is its owner, so
    ``principal`` alone describes a device that person owns. Groups follow
    from the principal and the policy's ``groups``; ``group`` instead of a
    principal describes "some member of that group": rules naming the group
    match it, rules naming a particular principal do not.
    """

    principal: _Principal = None
    group: _Group = None
    owner: _Principal = None
    tag: _Tag = None
    node: _Node = None
    via: Literal["direct", "agent"] | None = None
    agent: _Agent = None
    scope: _ScopeOpt = None
    scopes: tuple[_ScopeItem, ...] | None = None
    authorized: _AuthorizedOpt = None

    @property
    def effective_via(self) -> Literal["direct", "agent"]:
        if self.via is not None:
            return self.via
        return "agent" if self.scope or self.scopes or self.agent or self.authorized else "direct"

    @property
    def effective_authorized(self) -> Authorized:
        """An agent described without ``authorized`` is one born on its node's word: ``delegation``."""
        return self.authorized or "delegation"

    @property
    def all_scopes(self) -> tuple[Scope, ...]:
        return ((self.scope,) if self.scope else ()) + (self.scopes or ())

    def text(self) -> str:
        parts = [f"{k}: {getattr(self, k)}" for k in ("principal", "group", "owner", "tag", "node")
                 if getattr(self, k)]
        parts.append(f"via: {self.effective_via}")
        if self.agent is not None:
            parts.append(f"agent: {self.agent}")
        if self.authorized is not None:
            parts.append(f"authorized: {self.authorized}")
        scopes = self.all_scopes
        if len(scopes) == 1:
            parts.append(f'scope: "{scopes[0]}"')
        elif scopes:
            parts.append("scopes: [" + ", ".join(f'"{s}"' for s in scopes) + "]")
        return "{" + ", ".join(parts) + "}"


class PolicyTest(_Model):
    """A flow and the verdict the policy must give it.

    With ``method``/``path`` or ``tool`` the test is about one request to a
    port meshd serves (:mod:`.requests`): ``path`` alone means a GET, ``tool``
    an MCP ``tools/call`` (a POST to ``/mcp`` unless ``path`` says otherwise).
    """

    source: FlowSource = Field(alias="from")
    to: _Destination
    protocol: Protocol = "tcp"
    method: _Method | None = None
    path: _Path | None = None
    tool: _ToolName | None = None
    expect: Literal["allow", "deny"]

    @property
    def is_request(self) -> bool:
        return self.method is not None or self.path is not None or self.tool is not None


def _empty_section(value: object, default: object) -> object:
    return default if value is None else value


class Policy(_Model):
    """A whole policy, valid as a whole (see the module docstring)."""

    groups: dict[_GroupKey, tuple[_PrincipalItem, ...]] = Field(default_factory=dict)
    services: dict[_ServiceKey, Service] = Field(default_factory=dict)
    acls: tuple[Acl, ...] = ()
    tests: tuple[PolicyTest, ...] = ()
    delegations: tuple[Delegation, ...] = ()
    routes: tuple[Route, ...] = ()
    mcp: Literal["report", "agents-only"] = "report"

    # Not part of the policy's value: where it came from (for messages) and
    # the compiled plan, built once on first use. __eq__ below ignores both.
    _source: SourceMap | None = PrivateAttr(default=None)
    _plan: object = PrivateAttr(default=None)

    @field_validator("groups", "services", mode="before")
    @classmethod
    def _null_mapping(cls, value: object) -> object:
        """``groups:`` with nothing under it is an empty section, not an error."""
        return _empty_section(value, {})

    @field_validator("acls", "tests", "delegations", "routes", mode="before")
    @classmethod
    def _null_list(cls, value: object) -> object:
        return _empty_section(value, ())

    @model_validator(mode="after")
    def _check_whole(self) -> Policy:
        from .checks import policy_problems

        found = policy_problems(self)
        if found:
            raise ProblemsFound(found)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def to_data(self) -> dict[str, Any]:
        """Plain JSON-able data that validates back to an equal policy (keys as in the file)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def members(self, group: str) -> frozenset[str]:
        return frozenset(self.groups.get(group, ()))

    def groups_of(self, principal: str | None) -> tuple[str, ...]:
        """Every group ``principal`` belongs to, sorted."""
        if principal is None:
            return ()
        return tuple(sorted(name for name, members in self.groups.items() if principal in members))

    def where(self, *path: str | int) -> str | None:
        """``policy.yaml:12:5``, where ``path`` starts in the file; None when not loaded from text."""
        if self._source is None or not self._source.values:
            return None
        line, column = self._source.locate(path)
        return f"{self._source.filename}:{line}:{column}"
