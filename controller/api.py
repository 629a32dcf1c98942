"""The controller's HTTPS API (FastAPI): HTTP in, one concern function, HTTP out.

Who is calling is decided from the TLS client certificate alone (mTLS):
admin calls need the admin credential, node calls a node certificate;
enrollment and the CA certificate are open, the token being the credential.
Every error answer is ``{"error": "<one line>"}`` with a meaningful status
(each :class:`~meshcore.errors.IdmeshError` carries its own); a request body
over the limit is refused with 413 before it is read whole
(:mod:`controller.middleware`). A route parses the request, calls one
function of a concern module with the wall clock, and returns its result:
what the controller decides is decided there, never here.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes'
# annotations at run time, and ``Annotated[..., Depends(admin)]`` names
# dependencies local to create_app that a string annotation could not find.

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, ParamSpec, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshcore.errors import IdmeshError
from meshcore.identity import Identity, cert_pem
from meshcore.wire import MIN_PROTOCOL, PROTOCOL, PROTOCOL_HEADER, SUPPORTED_HEADER
from meshcore.wire.api import (
    AgentInfo,
    AgentIssued,
    AgentIssueRequest,
    AgentRevokeRequest,
    AgentsEnded,
    AuditEntry,
    EnrollRequest,
    EnrollResponse,
    ErrorBody,
    FlowBatch,
    FlowRecord,
    GrantInfo,
    GrantRegister,
    GrantRevokeRequest,
    GrantsRevoked,
    JwtSvid,
    JwtSvidRequest,
    LoginApprove,
    LoginPoll,
    LoginStart,
    LoginStarted,
    NodeInfo,
    PolicyApply,
    PolicyInfo,
    PrincipalInfo,
    RenewRequest,
    RenewResponse,
    RouteInfo,
    TokenCreated,
    TokenCreateRequest,
    TokenInfo,
    WorkloadSvid,
)
from meshcore.wire.stream import EndpointReport, PeerNode, ProbeAsk

from . import agents, auth, enrollment, flows, grants, logins, nodes, policies, routes, stream, tokens, workload
from . import audit as audit_log  # the names audit and endpoints are routes below
from . import endpoints as node_reports
from .context import Context
from .middleware import DEFAULT_MAX_BODY, BodyLimit

__all__ = ["TLS_EXTENSION", "create_app"]

log = logging.getLogger("idmesh.controller.api")

# Key in scope["extensions"] under which the TLS layer (server.py) hands the
# client certificate (DER) to the app.
TLS_EXTENSION = "idmesh.tls"
Limit = Annotated[int, Query(ge=1, le=100_000)]
Version = Annotated[int, Query(ge=0, le=2**63 - 1)]
"""A version number as the store keeps it (SQLite's int64): beyond it, a 422, not an OverflowError's 500."""
Since = Annotated[int, Query(ge=-(2**63), le=2**63 - 1)]
"""A stream's ``since``: any version a node may claim (one the hub cannot continue from gets a full map)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "malformed request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"malformed request: {where}: {first.get('msg', 'invalid')}{more}"


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in (
        (401, "an enrollment token or grant that is not valid (malformed, expired, used up, forged)"),
        (403, "no client certificate, a revoked or foreign one, or a caller of the wrong kind"),
        (404, "no such node, agent, token, grant or policy version"),
        (405, "a method this path does not take (Allow names the ones it does)"),
        (409, "a conflict: a name or address taken, a login already finished"),
        (413, "a body over the limit"),
        (422, "a malformed or invalid request; the error names the field"),
        (426, "a node too old for this controller's stream"),
        (429, "too many failures from this source: wait"),
        (503, "the controller's store is unavailable"),
        (507, "no room left (the mesh's addresses)"),
    )}
"""Every error an idmesh call may answer, each with the one-line ``{"error": ...}`` body (OpenAPI)."""

PUBLIC = frozenset({"/v1/health", "/v1/ca", "/v1/enroll", "/v1/jwks", "/.well-known/jwks.json"})
"""The calls anyone may make (enrollment proves itself with its token). Every other is authenticated first."""
_IDENTITY = "idmesh.identity"


class AuthenticateFirst:
    """ASGI: every call but :data:`PUBLIC` is authenticated — certificate, revocation, membership —
    before its body is read. An unknown client gets one 403 line, never a parse of what it sent
    (a 4 MiB policy) nor a 422 describing the API to it. What kind of caller a route wants is still
    the route's business (its ``Admin``/``Node``/``User`` dependency)."""

    def __init__(self, app: Any, ctx: Context) -> None:
        self.app, self.ctx = app, ctx

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in PUBLIC:
            der = scope.get("extensions", {}).get(TLS_EXTENSION, {}).get("client_cert")
            try:  # (its revocation check is a query: off the event loop)
                scope[_IDENTITY] = await asyncio.to_thread(auth.authenticate, self.ctx, der, _now())
            except IdmeshError as exc:  # refused, or the store is unavailable (503)
                await JSONResponse({"error": str(exc)}, status_code=exc.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


_P = ParamSpec("_P")
_T = TypeVar("_T")


async def _applied_at_once() -> None:
    return None


def create_app(ctx: Context, max_body: int = DEFAULT_MAX_BODY,
               settle: Callable[[], Awaitable[None]] = _applied_at_once) -> Any:
    """The API of ``ctx``; ``settle`` returns once this process has applied the changes it committed
    (:meth:`controller.follow.Follower.settle`)."""
    app = FastAPI(title="idmesh controller", version="1", docs_url=None, redoc_url=None, responses=ERRORS)

    async def off_loop(concern: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``concern`` in a worker thread (its SQL, signing, YAML parsing and fsync never hold the event
        loop, which carries every node's stream), then wait until the change it made is applied here."""
        result = await asyncio.to_thread(concern, *args, **kwargs)
        await settle()
        return result

    @app.exception_handler(IdmeshError)
    async def _idmesh_error(_: Request, exc: IdmeshError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # (its headers too: a 405 names what is Allowed)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error in the controller (see its log)"}, status_code=500)

    # The dependencies are coroutines: FastAPI runs a plain ``def`` one in its thread pool, a hop
    # (and a thread switch) per dependency per call, which an agent's birth should not pay.
    async def caller(request: Request) -> Identity:
        ident: Identity = request.scope[_IDENTITY]  # AuthenticateFirst put it there, before the body was read
        return ident

    async def admin(ident: Annotated[Identity, Depends(caller)]) -> Identity:
        auth.require(ident, "admin")
        return ident

    async def node(ident: Annotated[Identity, Depends(caller)]) -> Identity:
        auth.require(ident, "node")
        return ident

    async def admin_or_node(ident: Annotated[Identity, Depends(caller)]) -> Identity:
        auth.require_admin_or_node(ident)
        return ident

    async def user(ident: Annotated[Identity, Depends(caller)]) -> Identity:
        auth.require(ident, "user")
        return ident

    async def admin_or_user(ident: Annotated[Identity, Depends(caller)]) -> Identity:
        if ident.spiffe_id.kind != "user":
            auth.require(ident, "admin")
        return ident

    Admin = Annotated[Identity, Depends(admin)]
    Node = Annotated[Identity, Depends(node)]
    AdminOrNode = Annotated[Identity, Depends(admin_or_node)]
    User = Annotated[Identity, Depends(user)]
    AdminOrUser = Annotated[Identity, Depends(admin_or_user)]

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "domain": str(ctx.settings.domain)}

    @app.get("/v1/ca", response_class=PlainTextResponse)
    async def ca() -> str:
        return cert_pem(ctx.ca.cert)

    @app.post("/v1/enroll", response_model=EnrollResponse)
    async def enroll(req: EnrollRequest, request: Request) -> EnrollResponse:
        source = request.client.host if request.client else "unknown"
        return await off_loop(enrollment.enroll, ctx, req, source, _now())

    @app.post("/v1/tokens", response_model=TokenCreated)
    async def create_token(req: TokenCreateRequest, who: Admin) -> TokenCreated:
        return await off_loop(tokens.create_token, ctx, str(who.spiffe_id), req, _now())

    @app.get("/v1/tokens", response_model=list[TokenInfo])
    async def list_tokens(_: Admin) -> list[TokenInfo]:
        return await off_loop(tokens.list_tokens, ctx)

    @app.delete("/v1/tokens/{token_id}")
    async def delete_token(token_id: str, who: Admin) -> dict[str, str]:
        await off_loop(tokens.delete_token, ctx, str(who.spiffe_id), token_id, _now())
        return {"deleted": token_id}

    @app.get("/v1/nodes", response_model=list[NodeInfo])
    async def list_nodes(_: Admin) -> list[NodeInfo]:
        return await off_loop(nodes.list_nodes, ctx)

    @app.get("/v1/routes", response_model=list[RouteInfo])
    async def list_routes(_: Admin) -> list[RouteInfo]:
        return await off_loop(routes.list_routes, ctx)

    @app.delete("/v1/nodes/{name}", response_model=NodeInfo)
    async def remove_node(name: str, who: Admin) -> NodeInfo:
        return await off_loop(nodes.remove_node, ctx, str(who.spiffe_id), name, _now())

    @app.post("/v1/policy", response_model=PolicyInfo)
    async def apply_policy(req: PolicyApply, who: Admin) -> PolicyInfo:
        return await off_loop(policies.apply_policy, ctx, str(who.spiffe_id), req, _now())

    @app.get("/v1/policy", response_model=PolicyInfo)
    async def get_policy(_: Admin, version: Version | None = None) -> PolicyInfo:
        return await off_loop(policies.show_policy, ctx, version)

    @app.get("/v1/policy/history", response_model=list[PolicyInfo])
    async def policy_history(_: Admin) -> list[PolicyInfo]:
        return await off_loop(policies.policy_history, ctx)

    @app.post("/v1/agents", response_model=AgentIssued)
    async def issue_agent(req: AgentIssueRequest, who: Node) -> AgentIssued:
        return await off_loop(agents.issue_agent, ctx, who, req, _now())

    @app.get("/v1/agents", response_model=list[AgentInfo])
    async def list_agents(who: AdminOrNode) -> list[AgentInfo]:
        return await off_loop(agents.list_agents, ctx, who, _now())

    @app.delete("/v1/agents/{agent_id}", response_model=AgentsEnded)
    async def end_agent(agent_id: str, who: AdminOrNode) -> AgentsEnded:
        return await off_loop(agents.end_agent, ctx, who, agent_id, _now())

    @app.post("/v1/agents/revoke", response_model=AgentsEnded)
    async def revoke_principal(req: AgentRevokeRequest, who: Admin) -> AgentsEnded:
        return await off_loop(agents.revoke_principal, ctx, who, req.principal, _now())

    @app.post("/v1/agents/{agent_id}/svid", response_model=WorkloadSvid)
    async def agent_svid(agent_id: str, who: Node) -> WorkloadSvid:
        return await off_loop(workload.workload_svid, ctx, who, agent_id, _now())

    @app.post("/v1/agents/{agent_id}/jwt", response_model=JwtSvid)
    async def agent_jwt(agent_id: str, req: JwtSvidRequest, who: Node) -> JwtSvid:
        return await off_loop(workload.jwt_svid, ctx, who, agent_id, req.audience, _now())

    @app.get("/v1/jwks")
    @app.get("/.well-known/jwks.json")
    async def jwks() -> dict[str, Any]:
        return await off_loop(workload.jwks, ctx)

    @app.get("/v1/audit", response_model=list[AuditEntry])
    async def audit(_: Admin, since: datetime | None = None, action: str | None = None,
                    principal: str | None = None, node: str | None = None, limit: Limit = 1000) -> list[AuditEntry]:
        return await off_loop(audit_log.audit_entries, ctx, since, action, principal, node, limit)

    @app.post("/v1/flows")
    async def post_flows(batch: FlowBatch, who: Node) -> dict[str, int]:
        return {"recorded": await off_loop(flows.record_flows, ctx, who, batch, _now())}

    @app.get("/v1/flows", response_model=list[FlowRecord])
    async def get_flows(_: Admin, denied: bool = False, principal: str | None = None,
                        node_name: Annotated[str | None, Query(alias="node")] = None,
                        limit: Limit = 1000) -> list[FlowRecord]:
        return await off_loop(flows.find_flows, ctx, denied, principal, node_name, limit)

    @app.post("/v1/renew", response_model=RenewResponse)
    async def renew(req: RenewRequest, who: Node) -> RenewResponse:
        return await off_loop(enrollment.renew, ctx, who, req, _now())

    @app.post("/v1/endpoints", response_model=PeerNode)
    async def endpoints(report: EndpointReport, request: Request, who: Node) -> PeerNode:
        observed = request.client.host if request.client else None
        return await off_loop(node_reports.report_endpoints, ctx, who, report, observed, _now())

    # -- principals (SPEC §6) -----------------------------------------------------------------------------
    @app.post("/v1/login/approve", response_model=PrincipalInfo)
    async def approve_login(req: LoginApprove, request: Request, who: Admin) -> PrincipalInfo:
        source = request.client.host if request.client else "unknown"
        return await off_loop(logins.approve_login, ctx, who, req, source, _now())

    @app.post("/v1/login", response_model=LoginStarted)
    async def start_login(req: LoginStart, who: Node) -> LoginStarted:
        return await logins.start_login(ctx, who, req, _now())

    @app.post("/v1/login/{login_id}", response_model=LoginPoll)
    async def poll_login(login_id: str, who: Node) -> LoginPoll:
        return await logins.poll_login(ctx, who, login_id, _now())

    @app.get("/v1/whoami", response_model=PrincipalInfo)
    async def whoami(who: User) -> PrincipalInfo:
        return await off_loop(logins.whoami, ctx, who)

    @app.post("/v1/logout", response_model=GrantsRevoked)
    async def logout(who: User) -> GrantsRevoked:
        return await off_loop(logins.logout, ctx, who, _now())

    @app.post("/v1/grants", response_model=GrantInfo)
    async def register_grant(req: GrantRegister, who: User) -> GrantInfo:
        return await off_loop(grants.register_grant, ctx, who, req, _now())

    @app.get("/v1/grants", response_model=list[GrantInfo])
    async def list_grants(who: AdminOrUser, principal: str | None = None) -> list[GrantInfo]:
        return await off_loop(grants.list_grants, ctx, who, _now(), principal)

    @app.post("/v1/grants/revoke", response_model=GrantsRevoked)
    async def revoke_principal_grants(req: GrantRevokeRequest, who: Admin) -> GrantsRevoked:
        return await off_loop(grants.revoke_principal_grants, ctx, who, req.principal, _now())

    @app.delete("/v1/grants/{grant_id}", response_model=GrantsRevoked)
    async def revoke_grant(grant_id: str, who: AdminOrUser) -> GrantsRevoked:
        return await off_loop(grants.revoke_grant, ctx, who, grant_id, _now())

    @app.post("/v1/probe")
    async def probe(req: ProbeAsk, who: Node) -> dict[str, bool]:
        return {"sent": await off_loop(stream.ask_probe, ctx, who.spiffe_id.name, req.peer)}

    @app.get("/v1/netmap")
    async def netmap(who: Node, request: Request, since: Since | None = None) -> StreamingResponse:
        """The node's stream: a full map (or the deltas since ``since``), then
        deltas as they happen, and a keepalive line when nothing does."""
        protocol = stream.agree(who.spiffe_id.name, request.headers.get(PROTOCOL_HEADER))
        return StreamingResponse(stream.open_stream(ctx, who.spiffe_id.name, since, _now, protocol),
                                 media_type="application/x-ndjson",
                                 headers={PROTOCOL_HEADER: str(protocol),
                                          SUPPORTED_HEADER: f"{MIN_PROTOCOL}-{PROTOCOL}"})

    return BodyLimit(AuthenticateFirst(app, ctx), max_body,
                     larger={"/v1/policy": 4 * 1024 * 1024 + 4096, "/v1/flows": 1024 * 1024})
