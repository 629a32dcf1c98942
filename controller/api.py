"""The controller's HTTPS API (FastAPI): a thin layer over :class:`Controller`.

Who is calling is decided from the TLS client certificate alone (mTLS):
admin calls need the admin credential, node calls a node certificate;
enrollment and the CA certificate are open, the token being the credential.
Every error answer is ``{"error": "<one line>"}`` with a meaningful status;
a request body over the limit is refused with 413 before it is read whole.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from idmesh.logs import request_id
from meshcore.errors import IdmeshError
from meshcore.identity import Identity, cert_pem
from meshcore.wire.stream import EndpointReport, NetmapDelta, PeerNode, StreamMessage
from meshcore.wire.api import (
    AgentInfo,
    AgentIssued,
    AgentIssueRequest,
    AgentRevokeRequest,
    AgentsEnded,
    AuditEntry,
    EnrollRequest,
    FlowBatch,
    FlowRecord,
    EnrollResponse,
    NodeInfo,
    PolicyApply,
    RouteInfo,
    PolicyInfo,
    RenewRequest,
    RenewResponse,
    TokenCreated,
    TokenCreateRequest,
    TokenInfo,
)

from .netmap import KEEPALIVE, Outgoing
from .registry import Controller

__all__ = ["create_app", "BodyLimit", "TLS_EXTENSION"]

log = logging.getLogger("idmesh.controller.api")

# Key in scope["extensions"] under which the TLS layer (server.py) hands the
# client certificate (DER) to the app.
TLS_EXTENSION = "idmesh.tls"
DEFAULT_MAX_BODY = 64 * 1024
# A keepalive line this often keeps NATs open and lets a node notice a dead
# controller within KEEPALIVE + its read timeout.
KEEPALIVE_SECONDS = 10.0




def _now() -> datetime:
    return datetime.now(timezone.utc)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a correlation id for every request (``X-Request-Id``,
    taken from the client or made here, echoed in the answer and in every log
    record written while serving it), and bodies over ``limit`` bytes refused
    with 413 before they are read whole. ``larger`` raises the limit for named
    paths (a policy file may be big).
    """

    def __init__(self, app: Any, limit: int = DEFAULT_MAX_BODY, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.default = limit
        self.larger = larger or {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # a correlation id for every request: the client's X-Request-Id, or a new one
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode(errors="replace")[:64]
        rid = given if given.replace("-", "").isalnum() else secrets.token_hex(8)
        token = request_id.set(rid)
        try:
            await self._limited(scope, receive, send, rid)
        finally:
            request_id.reset(token)

    async def _limited(self, scope: dict[str, Any], receive: Any, send: Any, rid: str) -> None:
        limit = max(self.default, self.larger.get(scope.get("path", ""), 0))
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                return await self._refuse(send, limit)
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send: Any, limit: int) -> None:
        body = b'{"error":"request body too large (limit %d bytes)"}' % limit
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "malformed request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"malformed request: {where}: {first.get('msg', 'invalid')}{more}"


def create_app(controller: Controller, max_body: int = DEFAULT_MAX_BODY) -> Any:
    app = FastAPI(title="idmesh controller", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(IdmeshError)
    async def _idmesh_error(_: Request, exc: IdmeshError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error in the controller (see its log)"}, status_code=500)

    def caller(request: Request) -> Identity:
        der = request.scope.get("extensions", {}).get(TLS_EXTENSION, {}).get("client_cert")
        return controller.authenticate(der, _now())

    def admin(ident: Identity = Depends(caller)) -> Identity:
        controller.require(ident, "admin")
        return ident

    def node(ident: Identity = Depends(caller)) -> Identity:
        controller.require(ident, "node")
        return ident

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "domain": str(controller.settings.domain)}

    @app.get("/v1/ca", response_class=PlainTextResponse)
    async def ca() -> str:
        return cert_pem(controller.ca.cert)

    @app.post("/v1/enroll", response_model=EnrollResponse)
    async def enroll(req: EnrollRequest, request: Request) -> EnrollResponse:
        source = request.client.host if request.client else "unknown"
        return controller.enroll(req, source, _now())

    @app.post("/v1/tokens", response_model=TokenCreated)
    async def create_token(req: TokenCreateRequest, who: Identity = Depends(admin)) -> TokenCreated:
        return controller.create_token(str(who.spiffe_id), req, _now())

    @app.get("/v1/tokens", response_model=list[TokenInfo])
    async def list_tokens(_: Identity = Depends(admin)) -> list[TokenInfo]:
        return controller.list_tokens()

    @app.delete("/v1/tokens/{token_id}")
    async def delete_token(token_id: str, who: Identity = Depends(admin)) -> dict[str, str]:
        controller.delete_token(str(who.spiffe_id), token_id, _now())
        return {"deleted": token_id}

    @app.get("/v1/nodes", response_model=list[NodeInfo])
    async def list_nodes(_: Identity = Depends(admin)) -> list[NodeInfo]:
        return controller.list_nodes()

    @app.get("/v1/routes", response_model=list[RouteInfo])
    async def list_routes(_: Identity = Depends(admin)) -> list[RouteInfo]:
        return controller.list_routes()

    @app.delete("/v1/nodes/{name}", response_model=NodeInfo)
    async def remove_node(name: str, who: Identity = Depends(admin)) -> NodeInfo:
        return controller.remove_node(str(who.spiffe_id), name, _now())

    @app.post("/v1/policy", response_model=PolicyInfo)
    async def apply_policy(req: PolicyApply, who: Identity = Depends(admin)) -> PolicyInfo:
        return controller.apply_policy(str(who.spiffe_id), req, _now())

    @app.get("/v1/policy", response_model=PolicyInfo)
    async def get_policy(version: int | None = None, _: Identity = Depends(admin)) -> PolicyInfo:
        return controller.policy(version)

    @app.get("/v1/policy/history", response_model=list[PolicyInfo])
    async def policy_history(_: Identity = Depends(admin)) -> list[PolicyInfo]:
        return controller.policy_history()

    @app.post("/v1/agents", response_model=AgentIssued)
    async def issue_agent(req: AgentIssueRequest, who: Identity = Depends(node)) -> AgentIssued:
        return controller.issue_agent(who, req, _now())

    @app.get("/v1/agents", response_model=list[AgentInfo])
    async def list_agents(who: Identity = Depends(caller)) -> list[AgentInfo]:
        own = None if who.spiffe_id.kind == "admin" else who.spiffe_id.name
        if who.spiffe_id.kind not in ("admin", "node"):
            controller.require(who, "admin")
        return controller.list_agents(_now(), own)

    @app.delete("/v1/agents/{agent_id}", response_model=AgentsEnded)
    async def end_agent(agent_id: str, who: Identity = Depends(caller)) -> AgentsEnded:
        if who.spiffe_id.kind not in ("admin", "node"):
            controller.require(who, "admin")
        return AgentsEnded(ended=controller.end_agents(who, _now(), agent_id=agent_id))

    @app.post("/v1/agents/revoke", response_model=AgentsEnded)
    async def revoke_principal(req: AgentRevokeRequest, who: Identity = Depends(admin)) -> AgentsEnded:
        return AgentsEnded(ended=controller.end_agents(who, _now(), principal=req.principal))

    @app.get("/v1/audit", response_model=list[AuditEntry])
    async def audit(since: datetime | None = None, action: str | None = None, principal: str | None = None,
                    node: str | None = None, limit: int = Query(default=1000, ge=1, le=100_000),
                    _: Identity = Depends(admin)) -> list[AuditEntry]:
        return controller.audit(since, action, principal, node, limit)

    @app.post("/v1/flows")
    async def post_flows(batch: FlowBatch, who: Identity = Depends(node)) -> dict[str, int]:
        return {"recorded": controller.record_flows(who, batch)}

    @app.get("/v1/flows", response_model=list[FlowRecord])
    async def get_flows(denied: bool = False, principal: str | None = None, node_name: str | None = Query(
            default=None, alias="node"), limit: int = Query(default=1000, ge=1, le=100_000),
            _: Identity = Depends(admin)) -> list[FlowRecord]:
        return controller.flows(denied, principal, node_name, limit)

    @app.post("/v1/renew", response_model=RenewResponse)
    async def renew(req: RenewRequest, who: Identity = Depends(node)) -> RenewResponse:
        return controller.renew(who, req, _now())

    @app.post("/v1/endpoints", response_model=PeerNode)
    async def endpoints(report: EndpointReport, request: Request, who: Identity = Depends(node)) -> PeerNode:
        observed = request.client.host if request.client else None
        return controller.report_endpoints(who, report, observed)

    @app.get("/v1/netmap")
    async def netmap(since: int | None = None, who: Identity = Depends(node)) -> StreamingResponse:
        """The node's stream: a full map (or the deltas since ``since``), then
        deltas as they happen, and a keepalive line when nothing does."""
        hub = controller.hub
        sub = hub.subscribe(who.spiffe_id.name)
        backlog = hub.since(since) if since is not None else None

        def everything(deltas: list[NetmapDelta] | None) -> list[Outgoing]:
            """What a node needs to be whole: policy first, then the map, then the agents."""
            out = [Outgoing.of(StreamMessage(type="policy", policy=hub.policy))] if hub.policy else []
            out += ([Outgoing.of(StreamMessage(type="delta", delta=d)) for d in deltas] if deltas is not None
                    else [Outgoing.of(StreamMessage(type="full", full=hub.full()))])
            out.append(Outgoing.of(StreamMessage(type="agents", agents=controller.agent_update_full(_now()))))
            return out

        first = everything(backlog)

        async def lines() -> AsyncIterator[bytes]:
            try:
                for message in first:
                    yield message.line
                while not sub.closed:
                    if sub.resync:  # it fell behind: drop its queue, send it whole again
                        while not sub.queue.empty():
                            sub.queue.get_nowait()
                        sub.resync = False
                        for message in everything(None):
                            yield message.line
                        continue
                    try:
                        message = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_SECONDS)
                    except TimeoutError:
                        message = KEEPALIVE
                    if sub.closed:
                        break
                    yield message.line
            finally:
                hub.unsubscribe(sub)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return BodyLimit(app, max_body, larger={"/v1/policy": 4 * 1024 * 1024 + 4096, "/v1/flows": 1024 * 1024})
