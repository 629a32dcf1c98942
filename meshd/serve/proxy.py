"""One served port: an ASGI application that decides each request and forwards it with its caller's identity.

The caller is the source address of the connection, which the mesh has
already authenticated (WireGuard's allowed-IPs for a node's addresses, the
receiving node's own verification for an agent's) and which the firewall
let in; its identity is looked up in what this node enforces now
(:attr:`meshd.mesh.dataplane.DataPlane.enforced`), never in anything the
request says. For each request, in order:

1. every incoming ``Idmesh-*`` header is removed (a client cannot pose);
2. ``/.well-known/oauth-protected-resource[/...]`` is answered here (RFC 9728),
   with the scopes the policy names for this port;
3. a path an upstream could read as another path (dot segments, encoded
   ``/``, ``.``, ``\\``) is refused with 400: path globs must not be walked around;
4. the body is read whole (at most :data:`MAX_BODY`, within :data:`BODY_TIMEOUT`);
   a JSON body is read as MCP (:mod:`meshcore.mcp`);
5. MCP from a source that is not an agent is *shadow MCP*: logged, and
   refused when the policy says ``mcp: agents-only``;
6. the policy decides the request (:func:`meshcore.policy.decide_request`);
   a refusal is 403 with an OAuth ``insufficient_scope`` challenge pointing
   at the metadata;
7. an allowed request goes to the upstream with ``Idmesh-Principal``,
   ``-Agent``, ``-Scopes``, ``-Node``, ``-Authorized-By`` and
   ``-Assertion``; the answer streams back as it comes (server-sent events
   pass), and an upstream that does not answer is a 502 with one line.

Refusals, shadow MCP and allowed requests go to the flow log with the
request (``POST /mcp tools/call query``), each at most once a second per
source (:data:`LOG_EVERY`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import httpx

from meshcore.errors import InvalidInput
from meshcore.mcp import McpBody, is_json, read_body
from meshcore.policy import Actor, AppRequest, Identities, NodeIdentity, Policy, decide_request, scopes_supported
from meshcore.wire.api import FlowReport
from meshd.serve.assertions import Assertions
from meshd.serve.entries import ServeEntry

__all__ = ["BODY_TIMEOUT", "MAX_BODY", "MAX_HEAD", "METADATA_PATH", "ServeContext", "ServeProxy"]

log = logging.getLogger("meshd.serve")

MAX_BODY = 4 * 1024 * 1024
MAX_HEAD = 16 * 1024
BODY_TIMEOUT = 30.0
METADATA_PATH = "/.well-known/oauth-protected-resource"
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                         b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
_WALKS = re.compile(r"%2[ef]|%5c|\\|(^|/)\.\.?(/|$)", re.IGNORECASE)
LOG_EVERY = 1.0
MAX_LOGGED = 10_000

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class ServeContext(Protocol):
    """What a served port needs of the node (the daemon)."""

    node: str
    domain: str
    assertions: Assertions

    def enforced(self) -> tuple[Policy, Identities] | None: ...

    def authorized_by(self, address: str) -> str | None: ...

    def report(self, record: FlowReport) -> None: ...

    def count(self, port: int, verdict: str) -> None: ...


class _Refusal(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None,
                 verdict: str = "bad") -> None:
        super().__init__(message)
        self.status, self.headers, self.verdict = status, dict(headers or {}), verdict


class ServeProxy:
    def __init__(self, entry: ServeEntry, ctx: ServeContext) -> None:
        self.entry = entry
        self.ctx = ctx
        self.upstream = httpx.AsyncClient(base_url=entry.upstream, trust_env=False, follow_redirects=False,
                                          timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=10.0),
                                          limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self._logged: dict[tuple[str, str, str], float] = {}  # (source, kind, verdict) -> when last logged

    async def close(self) -> None:
        await self.upstream.aclose()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            await self._handle(scope, receive, send)
        except _Refusal as refusal:
            self.ctx.count(self.entry.port, refusal.verdict)
            await _answer(send, refusal.status, {"error": str(refusal)}, refusal.headers)

    async def _handle(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raw_path = scope["raw_path"].decode("latin-1")
        head = len(raw_path) + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if head > MAX_HEAD:  # h11 bounds a head still arriving; one that came whole in one read is checked here
            raise _Refusal(431, f"the request head is larger than {MAX_HEAD} bytes")
        headers = [(k, v) for k, v in scope["headers"] if not k.startswith(b"idmesh-")]  # (h11 lower-cases names)
        host = _header(headers, b"host") or f"{scope['server'][0]}:{self.entry.port}"
        if raw_path == METADATA_PATH or raw_path.startswith(METADATA_PATH + "/"):
            await self._metadata(send, host, raw_path[len(METADATA_PATH):])
            return
        policy, actor, here = self._caller(scope)
        if not raw_path.startswith("/"):
            raise _Refusal(400, f"request target {raw_path[:100]!r}: only a path (origin form) is served")
        if _WALKS.search(raw_path):
            raise _Refusal(400, f"path {raw_path[:100]!r} could be read as another path: send it normalized")
        body = await _read_body(receive)
        mcp = self._mcp(headers, scope["method"], body)
        request = AppRequest(scope["method"], raw_path, mcp.tools if mcp else ())
        text = _request_text(request, mcp)
        if mcp is not None and actor.via != "agent":
            self._shadow(scope, policy, actor, text)
        decision = decide_request(policy, actor, here, self.entry.port, request)
        if not decision.allowed:
            self._log(scope, actor, "deny", decision.rule_text, "request", text)
            raise _Refusal(403, f"{text} refused: {decision.rule_text}", self._challenge(host, decision.scopes),
                           "deny")
        self._log(scope, actor, "allow", decision.rule_text, "request", text)
        await self._forward(scope, headers, body, actor, host, send)

    def _caller(self, scope: dict[str, Any]) -> tuple[Policy, Actor, NodeIdentity]:
        """The policy in force, the caller's identity and this node's, as the kernel enforces them now."""
        enforced = self.ctx.enforced()
        address = scope["client"][0] if scope.get("client") else None
        actor = enforced[1].actor_at(address) if enforced is not None and address else None
        if enforced is None or actor is None or self.ctx.node not in enforced[1].nodes:
            raise _Refusal(403, f"no identity this node honors holds {address}", verdict="deny")
        return enforced[0], actor, enforced[1].nodes[self.ctx.node]

    def _mcp(self, headers: list[tuple[bytes, bytes]], method: str, body: bytes) -> McpBody | None:
        if method != "POST" or not body or not is_json(_header(headers, b"content-type")):
            return None
        try:
            return read_body(body)
        except InvalidInput as exc:
            raise _Refusal(400, str(exc)) from exc

    def _shadow(self, scope: dict[str, Any], policy: Policy, actor: Actor, text: str) -> None:
        refuse = policy.mcp == "agents-only"
        who = f"node {actor.node}" + (f" ({actor.principal})" if actor.principal else "")
        self._log(scope, actor, "deny" if refuse else "allow", "mcp: agents-only" if refuse else
                  "shadow MCP: a source that is not an agent speaks MCP", "shadow-mcp", text)
        if refuse:
            raise _Refusal(403, f"{text} refused: {who} is not an agent, and this mesh takes MCP from agents "
                           "only (policy: mcp: agents-only); run the client with meshctl agent run",
                           verdict="shadow-mcp")
        self.ctx.count(self.entry.port, "shadow-mcp")

    def _challenge(self, host: str, scopes: tuple[str, ...]) -> dict[str, str]:
        parts = ['Bearer error="insufficient_scope"']
        if scopes:
            parts.append(f'scope="{" ".join(scopes)}"')
        parts.append(f'resource_metadata="http://{host}{METADATA_PATH}"')
        return {"www-authenticate": ", ".join(parts)}

    async def _metadata(self, send: Send, host: str, suffix: str) -> None:
        """RFC 9728 §3: the resource, its name, the scopes the policy names for it; no bearer tokens taken."""
        enforced = self.ctx.enforced()
        scopes: list[str] = []
        if enforced is not None and self.ctx.node in enforced[1].nodes:
            scopes = scopes_supported(enforced[0], enforced[1].nodes[self.ctx.node], self.entry.port)
        await _answer(send, 200, {"resource": f"http://{host}{suffix}", "resource_name": self.entry.name,
                                  "scopes_supported": scopes, "bearer_methods_supported": []})

    async def _forward(self, scope: dict[str, Any], headers: list[tuple[bytes, bytes]], body: bytes, actor: Actor,
                       host: str, send: Send) -> None:
        out = [(k, v) for k, v in headers if k not in _HOP_BY_HOP]
        out += [(k.encode(), v.encode()) for k, v in self._identity(actor, scope["client"][0]).items()]
        out += [(b"x-forwarded-for", scope["client"][0].encode()), (b"x-forwarded-proto", b"http"),
                (b"x-forwarded-host", host.encode())]
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        request = self.upstream.build_request(scope["method"], self.entry.upstream + target.decode("latin-1"),
                                              headers=out, content=body)
        try:
            answer = await self.upstream.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _Refusal(502, f"the upstream {self.entry.upstream} does not answer: {_reason(exc)}",
                           verdict="upstream-down") from exc
        self.ctx.count(self.entry.port, "allow")
        try:
            await send({"type": "http.response.start", "status": answer.status_code,
                        "headers": [(k, v) for k, v in answer.headers.raw if k.lower() not in _HOP_BY_HOP]})
            async for chunk in answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:  # the upstream broke off mid-answer: so does this one
            log.warning("serve %d: the upstream broke off its answer: %s", self.entry.port, _reason(exc))
        finally:
            await answer.aclose()

    def _identity(self, actor: Actor, address: str) -> dict[str, str]:
        agent = _agent_id(actor)
        values = {"Idmesh-Principal": actor.principal, "Idmesh-Agent": agent,
                  "Idmesh-Scopes": " ".join(str(s) for s in actor.scopes) or None, "Idmesh-Node": actor.node,
                  "Idmesh-Authorized-By": self.ctx.authorized_by(address) if agent else None}
        headers = {k: v for k, v in values.items() if v}
        claims: dict[str, Any] = {"sub": _spiffe(actor, self.ctx.domain), "node": actor.node}
        for claim, value in (("principal", actor.principal), ("agent", agent), ("agent_name", actor.agent),
                             ("authorized_by", headers.get("Idmesh-Authorized-By"))):
            if value:
                claims[claim] = value
        if agent:
            claims["scopes"] = [str(s) for s in actor.scopes]
        headers["Idmesh-Assertion"] = self.ctx.assertions.get(actor.key, self.entry.name, claims)
        return headers

    def _log(self, scope: dict[str, Any], actor: Actor, verdict: str, rule: str,
             kind: Literal["request", "shadow-mcp"], text: str) -> None:
        """One record per source, kind and verdict a second at most: a busy client must not flood the log."""
        key, now = (scope["client"][0], kind, verdict), time.monotonic()
        if now - self._logged.get(key, -LOG_EVERY) < LOG_EVERY:
            return
        if len(self._logged) >= MAX_LOGGED:
            self._logged.clear()
        self._logged[key] = now
        self.ctx.report(FlowReport(
            at=datetime.now(UTC), verdict=verdict, rule=rule[:200], source=scope["client"][0],
            source_node=actor.node, principal=actor.principal, agent=_agent_id(actor),
            scopes=[str(s) for s in actor.scopes],
            authorized_by=self.ctx.authorized_by(scope["client"][0]) if actor.via == "agent" else None,
            destination=scope["server"][0], protocol="tcp", port=self.entry.port, kind=kind, request=text[:300]))


def _agent_id(actor: Actor) -> str | None:
    """An agent's id (its key's tail; ``actor.agent`` is its name), None for a node acting directly."""
    return actor.key.removeprefix("agent:") if actor.via == "agent" else None


def _spiffe(actor: Actor, domain: str) -> str:
    agent = _agent_id(actor)
    return f"spiffe://{domain}/agent/{agent}" if agent else f"spiffe://{domain}/node/{actor.node}"


def _request_text(request: AppRequest, mcp: McpBody | None) -> str:
    if mcp is None:
        return f"{request.method} {request.path}"
    calls = " ".join(f"tools/call {t}" for t in mcp.tools) or " ".join(dict.fromkeys(mcp.methods))
    return f"{request.method} {request.path} {calls}"


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Refusal(400, "the client went away before its request body ended")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > MAX_BODY:
                    raise _Refusal(413, f"the request body is larger than {MAX_BODY} bytes")
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
    except TimeoutError:
        raise _Refusal(408, f"the request body did not arrive within {BODY_TIMEOUT:.0f} s") from None


async def _answer(send: Send, status: int, data: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps(data).encode() + b"\n"
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
