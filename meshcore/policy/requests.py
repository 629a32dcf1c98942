"""Decisions for single requests at the application layer: the acls' ``http`` and ``mcp_tools``.

meshd terminates HTTP on the ports it serves (``meshctl serve``) and asks
:func:`decide_request` about each request. The connection-level rules still
come first: an acl takes part only if it allows the connection (its ``from``
matches the caller, its ``to`` covers this node's TCP port, as in
:func:`~.evaluate.decide`). Among those, an acl without ``http`` or
``mcp_tools`` allows every request; one with them allows a request when

* ``http`` is missing, or one of its entries lists the method (or no
  methods) and has a path glob matching the path (or no paths); and
* ``mcp_tools`` is missing, or the request calls no tool, or the tool it
  calls matches one of the names (globs, as ``read_*``).

``mcp_tools`` narrows MCP's ``tools/call`` only: ``initialize``,
``tools/list`` and the rest of the protocol pass, or no client could work.
A request calling several tools (a JSON-RPC batch) is allowed only if each
of its calls is, by some acl: a batch mixing allowed and refused calls is
refused whole, never split.

Acls stay a union of allows, so order never changes a verdict. A refusal
names what would have allowed it: the scopes of acls whose request filter
covers the refused call (the OAuth ``insufficient_scope`` challenge carries
them) and near misses, as :func:`~.evaluate.decide` does.

Path globs: ``*`` matches within one segment, ``**`` across segments; both
are matched against the path as sent, without its query. meshd refuses
paths that an upstream could read as another path (dot segments, encoded
``/``, ``.`` or ``\\``) before asking, so a glob cannot be walked around.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

from .evaluate import Target, _rule_label, actor_for, decide, flow_targets
from .fields import Destination
from .identities import Actor, NodeIdentity
from .model import Acl, FlowSource, HttpMatch, Policy
from .plan import plan_policy

__all__ = ["MCP_PATH", "AppRequest", "RequestDecision", "decide_request", "decide_request_flow", "path_matches",
           "scopes_supported"]

MCP_PATH = "/mcp"
"""Where a test's ``tool`` is posted unless it names a ``path``: the MCP endpoint's usual path."""


@dataclass(frozen=True)
class AppRequest:
    """One HTTP request as the policy sees it: method, path (as sent, no query), the MCP tools it calls."""

    method: str
    path: str
    tools: tuple[str, ...] = ()

    def text(self, tool: str | None = None) -> str:
        """``POST /mcp (tools/call query)``: the request, or one of its calls."""
        calls = (tool,) if tool is not None else self.tools
        return f"{self.method} {self.path}" + (f" (tools/call {', '.join(calls)})" if calls else "")


@dataclass(frozen=True)
class RequestDecision:
    """The verdict for one request; ``str()`` is one line.

    ``refused_tool`` is the first call of a refused request that no acl
    allows (None when the request itself is refused); ``scopes`` the scopes
    an agent would need for it, from acls whose request filter covers it.
    """

    allowed: bool
    rule_index: int | None
    rule_text: str
    flow: str
    refused_tool: str | None = None
    scopes: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else "deny"

    def __str__(self) -> str:
        return f"{self.verdict}: {self.flow}: {self.rule_text}"


@lru_cache(maxsize=1024)
def _glob_pattern(glob: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*)", glob)
    body = "".join(".*" if p == "**" else "[^/]*" if p == "*" else re.escape(p) for p in parts)
    return re.compile(body + r"\Z")


def path_matches(glob: str, path: str) -> bool:
    """``/v1/*`` matches ``/v1/items`` but not ``/v1/items/7``; ``/v1/**`` matches both."""
    return _glob_pattern(glob).match(path) is not None


def _http_allows(entries: Sequence[HttpMatch] | None, request: AppRequest) -> bool:
    if entries is None:
        return True
    return any((m.methods is None or request.method in m.methods)
               and (m.paths is None or any(path_matches(g, request.path) for g in m.paths)) for m in entries)


def _allows(acl: Acl, request: AppRequest, tool: str | None) -> bool:
    """Whether ``acl``'s request filter lets ``request`` (calling ``tool``, or none) through."""
    if not _http_allows(acl.http, request):
        return False
    return tool is None or acl.mcp_tools is None or any(fnmatchcase(tool, name) for name in acl.mcp_tools)


def decide_request(policy: Policy, source: Actor, dest: Target | NodeIdentity, port: int,
                   request: AppRequest, *, source_text: str | None = None) -> RequestDecision:
    """Is ``request`` from ``source`` to ``dest``'s TCP ``port`` allowed? (module docstring)."""
    connection = decide(policy, source, dest, port, "tcp", source_text=source_text)
    flow = f"{connection.flow} {request.text()}"
    if not connection.allowed:
        return RequestDecision(False, None, connection.rule_text, flow, hints=connection.hints)
    plan = plan_policy(policy)
    target = Target.of_node(dest) if isinstance(dest, NodeIdentity) else dest
    covering = sorted({g.acl for g in plan.grants_for(target.name, target.tags) if g.covers("tcp", port)})
    allowing = [connection.rule_index, *connection.also]
    first: int | None = None
    for tool in request.tools or (None,):
        passing = [i for i in allowing if i is not None and _allows(policy.acls[i], request, tool)]
        if not passing:
            return _refused(policy, covering, allowing, request, tool, flow)
        first = min(passing) if first is None else min(first, min(passing))
    assert first is not None
    return RequestDecision(True, first, f"{_rule_label(policy, first)}: {policy.acls[first].text()}", flow)


def _refused(policy: Policy, covering: list[int], allowing: list[int | None], request: AppRequest,
             tool: str | None, flow: str) -> RequestDecision:
    what = request.text(tool)
    scopes = sorted({str(policy.acls[i].source.scope) for i in covering
                     if policy.acls[i].source.scope is not None and _allows(policy.acls[i], request, tool)})
    hints = [f"{_rule_label(policy, i)} allows this connection but not {what}"
             for i in allowing if i is not None][:3]
    if scopes:
        hints.append(f"an agent with scope {' or '.join(scopes)} may")
    return RequestDecision(False, None, f"no rule allows {what}: default deny", flow, refused_tool=tool,
                           scopes=tuple(scopes), hints=tuple(hints))


def decide_request_flow(policy: Policy, source: FlowSource, to: Destination, method: str | None,
                        path: str | None, tool: str | None) -> RequestDecision:
    """A request as a policy test (or ``policy explain``) writes it; a service is allowed only if every
    member allows it. ``path`` alone is a GET; ``tool`` a POST to :data:`MCP_PATH` by default."""
    request = AppRequest(method or ("POST" if tool is not None else "GET"),
                         path or (MCP_PATH if tool is not None else "/"), (tool,) if tool is not None else ())
    assert to.ports is not None, "a test's destination names its port (checked when the policy is loaded)"
    actor = actor_for(source)
    decisions = [decide_request(policy, actor, target, to.ports.lo, request, source_text=source.text())
                 for target in flow_targets(policy, to)]
    return next((d for d in decisions if not d.allowed), decisions[0])


def scopes_supported(policy: Policy, dest: Target | NodeIdentity, port: int) -> list[str]:
    """The scopes acls name for this node's TCP ``port``: RFC 9728's ``scopes_supported`` of a served port."""
    plan = plan_policy(policy)
    target = Target.of_node(dest) if isinstance(dest, NodeIdentity) else dest
    acls = {g.acl for g in plan.grants_for(target.name, target.tags) if g.covers("tcp", port)}
    return sorted({str(policy.acls[i].source.scope) for i in acls if policy.acls[i].source.scope is not None})
