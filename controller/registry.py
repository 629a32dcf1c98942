"""What the controller does, independent of HTTP: tokens, enrollment, nodes,
and deciding who a client certificate belongs to.

Each operation is one store transaction that also writes its audit rows, so
an identity event is never committed without its record. ``now`` is passed
in by the caller (the API passes the wall clock, tests a fixed one).
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import ipaddress
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509

from meshcore.addressing import MeshPrefixes
from meshcore.errors import Conflict, InvalidCertificate, InvalidInput, InvalidToken, NotFound, PermissionDenied
from meshcore.identity import (
    CertificateAuthority,
    Claims,
    Identity,
    SpiffeId,
    build_leaf,
    cert_pem,
    load_csr,
    verify_leaf,
)
from meshcore.tokens import hash_matches, new_token, parse_token, token_hash
from meshcore.wire.stream import AgentUpdate, EndpointReport, PeerNode, PolicyDoc, RouteOffer
from meshcore.policy import Gateway, NodeIdentity, Policy, check_delegation, load_policy, offer_users, run_tests
from meshcore.scopes import parse_scopes, scopes_within
from meshcore.wire.api import (
    RouteInfo,
    AgentInfo,
    AgentIssued,
    AgentIssueRequest,
    AuditEntry,
    EnrollRequest,
    FlowBatch,
    FlowRecord,
    EnrollResponse,
    NodeInfo,
    PolicyApply,
    PolicyInfo,
    RenewRequest,
    RenewResponse,
    TokenCreated,
    TokenCreateRequest,
    TokenInfo,
)

from .authority import DataDir, load_authority
from idmesh.metrics import Metrics

from .netmap import NetmapHub
from .ratelimit import FailureLimiter
from .store import AgentRow, NodeRow, PolicyRow, Store, TokenRow

__all__ = ["Controller"]


@dataclass
class Settings:
    domain: str
    url: str
    prefixes: MeshPrefixes
    node_cert_ttl: timedelta


class Controller:
    def __init__(self, store: Store, ca: CertificateAuthority, settings: Settings,
                 limiter: FailureLimiter | None = None) -> None:
        self.store = store
        self.ca = ca
        self.settings = settings
        self.limiter = limiter or FailureLimiter()
        self.metrics = Metrics()
        self.metrics.snapshot(self._gauges)
        with store.transaction() as tx:
            version = int(tx.meta("netmap_version") or 0)
            peers = {row.name: self._peer(row) for row in tx.nodes()}
            policy = tx.policy()
        self.hub = NetmapHub(settings.domain, (str(settings.prefixes.v4), str(settings.prefixes.v6)), version, peers)
        self.hub.policy = _policy_doc(policy)
        self._parsed: tuple[str, Policy] | None = None

    @classmethod
    def open(cls, data: Path) -> "Controller":
        dd = DataDir(data)
        ca = load_authority(data)
        store = Store.open(dd.database)
        with store.transaction() as tx:
            meta = {k: tx.meta(k) or "" for k in ("domain", "url", "prefix_v4", "prefix_v6", "block_v4",
                                                  "block_v6", "node_cert_ttl")}
        prefixes = MeshPrefixes(
            ipaddress.IPv4Network(meta["prefix_v4"]), ipaddress.IPv6Network(meta["prefix_v6"]),
            int(meta["block_v4"]), int(meta["block_v6"]),
        )
        settings = Settings(meta["domain"], meta["url"], prefixes, timedelta(seconds=int(meta["node_cert_ttl"])))
        return cls(store, ca, settings)

    # who is calling -------------------------------------------------------
    def authenticate(self, cert_der: bytes | None, now: datetime) -> Identity:
        """The identity behind a TLS client certificate, or PermissionDenied.

        The TLS layer already checked the chain; this adds the X509-SVID
        rules, the claims, and whether the controller still honors it.
        """
        if not cert_der:
            raise PermissionDenied("this call needs a client certificate (admin credential or node certificate)")
        try:
            ident = verify_leaf(x509.load_der_x509_certificate(cert_der), self.ca.cert, now)
        except (InvalidCertificate, ValueError) as exc:
            raise PermissionDenied(f"client certificate refused: {exc}") from exc
        with self.store.transaction() as tx:
            revoked = tx.certificate_revoked(ident.serial_hex)
            node = tx.node(ident.spiffe_id.name) if ident.spiffe_id.kind == "node" else None
        if revoked is None or revoked:
            raise PermissionDenied(f"client certificate of {ident.spiffe_id} has been revoked")
        if ident.spiffe_id.kind == "node" and (node is None or node.cert_serial != ident.serial_hex):
            raise PermissionDenied(f"{ident.spiffe_id} is no longer a member of this mesh")
        return ident

    @staticmethod
    def require(ident: Identity, kind: str) -> None:
        if ident.spiffe_id.kind != kind:
            raise PermissionDenied(f"{ident.spiffe_id} may not make this call ({kind} only)")

    # tokens ---------------------------------------------------------------
    def create_token(self, actor: str, req: TokenCreateRequest, now: datetime) -> TokenCreated:
        if req.owner and req.tags:
            # As in Tailscale: a tagged node belongs to the mesh, not to a person.
            raise InvalidInput("a node is either owned by a principal (--owner) or tagged (--tag), not both")
        token = new_token(self.settings.url, self.ca.fingerprint)
        line = token.encode()
        row = TokenRow(token.id, token_hash(line), sorted(set(req.tags)), req.owner, req.reusable, now,
                       now + timedelta(seconds=req.ttl_seconds), 0, actor)
        with self.store.transaction() as tx:
            tx.insert_token(row)
            tx.audit(now, actor, "token.created", token.id, tags=row.tags, owner=row.owner,
                     reusable=row.reusable, expires=row.expires_at)
        return TokenCreated(token=line, **_token_info(row).model_dump())

    def list_tokens(self) -> list[TokenInfo]:
        with self.store.transaction() as tx:
            return [_token_info(t) for t in tx.tokens()]

    def delete_token(self, actor: str, token_id: str, now: datetime) -> None:
        with self.store.transaction() as tx:
            if not tx.delete_token(token_id):
                raise NotFound(f"no token with id {token_id!r}")
            tx.audit(now, actor, "token.deleted", token_id)

    # enrollment -----------------------------------------------------------
    def enroll(self, req: EnrollRequest, source: str, now: datetime) -> EnrollResponse:
        self.limiter.check(source, now)
        try:
            token = parse_token(req.token)
        except InvalidToken as exc:
            self._refuse(source, None, str(exc), now)
            raise
        public_key = load_csr(req.csr)
        s = self.settings
        with self.store.transaction() as tx:
            row = tx.token(token.id)
            reason = _token_problem(row, req.token, now)
            if reason is None:
                assert row is not None
                if tx.node(req.name) is not None:
                    raise Conflict(
                        f"a node named {req.name!r} is already enrolled; remove it first "
                        f"(meshctl nodes remove {req.name}) or enroll with another --name"
                    )
                index = tx.allocate_block(s.prefixes.capacity)
                block = s.prefixes.block(index)
                addresses = (str(block.node_v4), str(block.node_v6))
                sid = SpiffeId(s.domain, "node", req.name)
                claims = Claims(kind="node", node=req.name, owner=row.owner, tags=tuple(row.tags),
                                addresses=addresses, blocks=(str(block.v4), str(block.v6)))
                t0 = time.perf_counter()
                cert = build_leaf(self.ca, public_key, sid, claims, now, s.node_cert_ttl)
                self.metrics.issuance_seconds.labels("node").observe(time.perf_counter() - t0)
                serial = format(cert.serial_number, "x")
                node = NodeRow(req.name, index, req.wireguard_public_key, row.owner, list(row.tags), serial,
                               cert.not_valid_after_utc, now, row.id)
                tx.insert_node(node)
                tx.insert_certificate(serial, str(sid), "node", req.name, now, cert.not_valid_after_utc)
                tx.use_token(row.id)
                actor = f"token:{row.id}"
                tx.audit(now, actor, "token.used", row.id, source, node=req.name)
                tx.audit(now, actor, "node.enrolled", str(sid), source, owner=row.owner, tags=row.tags,
                         addresses=list(addresses), wireguard_public_key=req.wireguard_public_key)
                tx.audit(now, actor, "certificate.issued", str(sid), source, serial=serial,
                         not_after=cert.not_valid_after_utc)
                version = self.hub.bump(tx)
        if reason is None:
            self.metrics.identities_issued.labels("node").inc()
            self.hub.publish(version, upsert=(self._peer(node),))
        if reason is not None:
            self._refuse(source, token.id, reason, now)
            raise InvalidToken(reason)
        return EnrollResponse(
            domain=s.domain,
            certificate=cert_pem(cert),
            ca=cert_pem(self.ca.cert),
            node=self._node_info(node),
            mesh_prefixes=[str(s.prefixes.v4), str(s.prefixes.v6)],
        )

    def _refuse(self, source: str, token_id: str | None, reason: str, now: datetime) -> None:
        self.limiter.record_failure(source, now)
        with self.store.transaction() as tx:
            tx.audit(now, "anonymous", "token.refused", token_id, source, reason=reason)

    # nodes ----------------------------------------------------------------
    def _node_info(self, row: NodeRow) -> NodeInfo:
        block = self.settings.prefixes.block(row.block_index)
        return NodeInfo(
            name=row.name,
            spiffe_id=str(SpiffeId(self.settings.domain, "node", row.name)),
            owner=row.owner,
            tags=row.tags,
            addresses=[str(block.node_v4), str(block.node_v6)],
            blocks=[str(block.v4), str(block.v6)],
            wireguard_public_key=row.wg_public_key,
            enrolled_at=row.enrolled_at,
            cert_not_after=row.cert_not_after,
        )

    def list_nodes(self) -> list[NodeInfo]:
        with self.store.transaction() as tx:
            return [self._node_info(n) for n in tx.nodes()]

    def remove_node(self, actor: str, name: str, now: datetime) -> NodeInfo:
        with self.store.transaction() as tx:
            row = tx.node(name)
            if row is None:
                raise NotFound(f"no node named {name!r}")
            tx.delete_node(name)
            revoked = tx.revoke_certificates_of_node(name, now)
            sid = str(SpiffeId(self.settings.domain, "node", name))
            tx.audit(now, actor, "node.removed", sid, certificates_revoked=revoked)
            tx.audit(now, actor, "certificate.revoked", sid, serial=row.cert_serial, reason="node removed")
            version = self.hub.bump(tx)
        self.hub.publish(version, remove=(name,))
        return self._node_info(row)

    def _peer(self, row: NodeRow) -> PeerNode:
        block = self.settings.prefixes.block(row.block_index)
        return PeerNode(name=row.name, wireguard_public_key=row.wg_public_key,
                        addresses=(str(block.node_v4), str(block.node_v6)), blocks=(str(block.v4), str(block.v6)),
                        endpoints=row.endpoints, owner=row.owner, tags=tuple(row.tags),
                        routing=RouteOffer.model_validate(row.routing))

    # policy ---------------------------------------------------------------
    def apply_policy(self, actor: str, req: PolicyApply, now: datetime) -> PolicyInfo:
        """Validate, run the file's tests, store as the next version, push to every node.

        A file that does not load or whose tests fail changes nothing; the
        previous version stays in force.
        """
        policy = load_policy(req.text, req.filename)
        failures = run_tests(policy)
        if failures:
            raise InvalidInput(f"{len(failures)} policy test(s) fail, first: {failures[0]}")
        digest = hashlib.sha256(req.text.encode()).hexdigest()
        with self.store.transaction() as tx:
            current = tx.policy()
            if current is not None and current.hash == digest:
                return _policy_info(current, unchanged=True)
            row = PolicyRow((current.version if current else 0) + 1, digest, req.filename, req.text, actor, now)
            tx.insert_policy(row)
            diff = "".join(difflib.unified_diff(
                (current.text if current else "").splitlines(keepends=True), req.text.splitlines(keepends=True),
                f"v{current.version if current else 0}", f"v{row.version}"))
            tx.audit(now, actor, "policy.applied", f"policy v{row.version}", hash=digest, filename=req.filename,
                     diff=diff[:20000])
        doc = _policy_doc(row)
        assert doc is not None
        self.hub.publish_policy(doc)
        return _policy_info(row)

    def _current_policy(self) -> Policy | None:
        """The policy in force, parsed once per version (issuing an agent must not re-read YAML)."""
        doc = self.hub.policy
        if doc is None:
            return None
        if self._parsed is None or self._parsed[0] != doc.hash:
            self._parsed = (doc.hash, load_policy(doc.text, doc.filename))
        return self._parsed[1]

    def list_routes(self) -> list[RouteInfo]:
        """Every advertised route and the policy rules that make it usable."""
        with self.store.transaction() as tx:
            rows = tx.nodes()
        gateways = {r.name: Gateway(r.name, frozenset(r.tags), tuple(r.routing.get("routes", ()))) for r in rows}
        gateways = {n: g for n, g in gateways.items() if g.routes}
        policy = self._current_policy() or Policy()
        out = []
        for (name, prefix), rules in sorted(offer_users(policy, gateways).items()):
            labels = [f"routes[{i}]" + (f" at {where}" if (where := policy.where("routes", i)) else "")
                      + f": {policy.routes[i].text()}" for i in rules]
            out.append(RouteInfo(node=name, tags=sorted(gateways[name].tags), prefix=prefix,
                                 exit=ipaddress.ip_network(prefix).prefixlen == 0, enabled_by=labels))
        return out

    def policy(self, version: int | None = None) -> PolicyInfo:
        with self.store.transaction() as tx:
            row = tx.policy(version)
        if row is None:
            raise NotFound("no policy has been applied yet" if version is None else f"no policy version {version}")
        return _policy_info(row)

    def policy_history(self) -> list[PolicyInfo]:
        with self.store.transaction() as tx:
            return [_policy_info(r, with_text=False) for r in tx.policies()]

    # agents -----------------------------------------------------------------
    def issue_agent(self, caller: Identity, req: AgentIssueRequest, now: datetime) -> AgentIssued:
        """Sign an agent identity for the calling node, if a delegation allows it.

        The node made the key and chose the addresses; the controller checks
        the addresses lie in that node's block, the policy's delegations, and
        for a sub-agent that it asks for no more than its parent holds and
        ends no later than its parent.
        """
        node_name = caller.spiffe_id.name
        public_key = load_csr(req.csr)
        scopes = parse_scopes(req.scopes)
        ttl = timedelta(seconds=req.ttl_seconds)
        policy = self._current_policy()
        try:
            with self.store.transaction() as tx:
                row = tx.node(node_name)
                if row is None:
                    raise NotFound(f"no node named {node_name!r}")
                block = self.settings.prefixes.block(row.block_index)
                for address in (req.ipv4, req.ipv6):
                    try:
                        inside = block.contains(address)
                    except ValueError as exc:
                        raise InvalidInput(f"invalid agent address {address!r}") from exc
                    if not inside or address in (str(block.node_v4), str(block.node_v6)):
                        raise PermissionDenied(f"agent address {address} is not in node {node_name}'s agent pool")
                taken = {a for other in tx.live_agents(now, node=node_name) for a in (other.ipv4, other.ipv6)}
                if req.ipv4 in taken or req.ipv6 in taken:
                    raise Conflict(f"agent address {req.ipv4}/{req.ipv6} is held by a live agent")
                if policy is None:
                    raise PermissionDenied("no policy is applied, so no delegation lets anyone mint agents")
                node = NodeIdentity(name=row.name, owner=row.owner, tags=frozenset(row.tags),
                                    ipv4=str(block.node_v4), ipv6=str(block.node_v6))
                if req.parent is None:
                    check_delegation(policy, req.principal, node, scopes, ttl)
                    not_after = now + ttl
                else:
                    parent = tx.agent(req.parent)
                    if parent is None or not parent.live(now) or parent.node != node_name:
                        raise PermissionDenied(f"parent agent {req.parent} is not a live agent of node {node_name}")
                    if parent.principal != req.principal:
                        raise PermissionDenied(f"a sub-agent acts for its parent's principal {parent.principal}")
                    if not scopes_within(scopes, parse_scopes(parent.scopes)):
                        raise PermissionDenied(f"sub-agent scopes {', '.join(req.scopes)} exceed its parent's "
                                               f"{', '.join(parent.scopes)}")
                    not_after = min(now + ttl, parent.not_after)
                agent_id = "a" + secrets.token_hex(8)
                sid = SpiffeId(self.settings.domain, "agent", agent_id)
                claims = Claims(kind="agent", node=node_name, principal=req.principal, scopes=scopes,
                                parent=req.parent, addresses=(req.ipv4, req.ipv6), name=req.name)
                t0 = time.perf_counter()
                cert = build_leaf(self.ca, public_key, sid, claims, now, not_after - now)
                self.metrics.issuance_seconds.labels("agent").observe(time.perf_counter() - t0)
                serial = format(cert.serial_number, "x")
                pem = cert_pem(cert)
                agent = AgentRow(agent_id, req.name, node_name, req.principal, [str(x) for x in scopes], req.parent,
                                 req.ipv4, req.ipv6, serial, pem, now, cert.not_valid_after_utc)
                tx.insert_agent(agent)
                tx.insert_certificate(serial, str(sid), "agent", node_name, now, cert.not_valid_after_utc)
                tx.audit(now, str(caller.spiffe_id), "agent.issued", str(sid), principal=req.principal,
                         scopes=agent.scopes, parent=req.parent, name=req.name, addresses=[req.ipv4, req.ipv6],
                         serial=serial, not_after=cert.not_valid_after_utc)
        except PermissionDenied as exc:
            with self.store.transaction() as tx:
                tx.audit(now, str(caller.spiffe_id), "agent.refused", None, principal=req.principal,
                         scopes=req.scopes, parent=req.parent, reason=str(exc))
            raise
        self.metrics.identities_issued.labels("agent").inc()
        self.hub.publish_agents(AgentUpdate(certificates=(pem,)))
        return AgentIssued(agent=self._agent_info(agent, now), certificate=pem)

    def end_agents(self, actor: Identity, now: datetime, agent_id: str | None = None,
                   principal: str | None = None) -> list[str]:
        """Revoke (admin) or retire (its own node) agents, with all their descendants."""
        is_admin = actor.spiffe_id.kind == "admin"
        reason = "revoked" if is_admin else "retired"
        with self.store.transaction() as tx:
            if agent_id is not None:
                row = tx.agent(agent_id)
                if row is None:
                    raise NotFound(f"no agent {agent_id!r}")
                if not is_admin and row.node != actor.spiffe_id.name:
                    raise PermissionDenied(f"agent {agent_id} belongs to node {row.node}")
                roots = [agent_id] if row.ended_at is None else []
            else:
                roots = [a.id for a in tx.live_agents(now, principal=principal)]
            ended: list[str] = []
            todo = list(roots)
            while todo:
                current = todo.pop()
                if current in ended:
                    continue
                ended.append(current)
                todo += tx.agent_children(current)
            for i, ended_id in enumerate(ended):
                why = reason if ended_id in roots else f"{reason} (parent {'revoked' if is_admin else 'ended'})"
                tx.end_agent(ended_id, now, why)
                tx.audit(now, str(actor.spiffe_id), f"agent.{reason}",
                         str(SpiffeId(self.settings.domain, "agent", ended_id)), reason=why)
        if ended:
            self.metrics.identities_ended.labels(reason).inc(len(ended))
            self.hub.publish_agents(AgentUpdate(revoked=tuple(ended)))
        return ended

    def list_agents(self, now: datetime, node: str | None = None) -> list[AgentInfo]:
        with self.store.transaction() as tx:
            return [self._agent_info(a, now) for a in tx.live_agents(now, node=node)]

    def agent_update_full(self, now: datetime) -> AgentUpdate:
        with self.store.transaction() as tx:
            return AgentUpdate(full=True, certificates=tuple(a.certificate for a in tx.live_agents(now)))

    def _agent_info(self, row: AgentRow, now: datetime) -> AgentInfo:
        state = (row.end_reason or "ended").split(" ")[0] if row.ended_at else ("live" if row.live(now) else "expired")
        return AgentInfo(id=row.id, name=row.name, spiffe_id=str(SpiffeId(self.settings.domain, "agent", row.id)),
                         node=row.node, principal=row.principal, scopes=row.scopes, parent=row.parent,
                         addresses=[row.ipv4, row.ipv6], issued_at=row.issued_at, expires=row.not_after, state=state)

    def _gauges(self) -> list[tuple[str, str, dict[str, str], float]]:
        """Read at scrape time from the store and the hub, so they cannot drift."""
        now = datetime.now(timezone.utc)
        with self.store.transaction() as tx:
            nodes = len(tx.nodes())
            agents = len(tx.live_agents(now))
        out = [
            ("idmesh_nodes", "Enrolled nodes", {}, float(nodes)),
            ("idmesh_identities_live", "Live identities, by kind", {"kind": "node"}, float(nodes)),
            ("idmesh_identities_live", "Live identities, by kind", {"kind": "agent"}, float(agents)),
            ("idmesh_netmap_version", "Current netmap version", {}, float(self.hub.version)),
            ("idmesh_policy_version", "Policy version in force (0: none)", {},
             float(self.hub.policy.version if self.hub.policy else 0)),
            ("idmesh_streams_connected", "Nodes with an open netmap stream", {}, float(self.hub.connected)),
        ]
        for node, backlog in self.hub.backlogs():
            out.append(("idmesh_stream_backlog_messages", "Messages queued for a node, not yet read (its lag)",
                        {"node": node}, float(backlog)))
        return out

    # flows ------------------------------------------------------------------
    def record_flows(self, ident: Identity, batch: FlowBatch) -> int:
        node = ident.spiffe_id.name
        rows = [(f.at, f.verdict, f.principal, f.model_copy(update={"node": node}).model_dump_json())
                for f in batch.flows]
        with self.store.transaction() as tx:
            tx.insert_flows(node, rows)
        return len(rows)

    def flows(self, denied: bool, principal: str | None, node: str | None, limit: int) -> list[FlowRecord]:
        with self.store.transaction() as tx:
            rows = tx.flows(denied, principal, node, limit)
        return [FlowRecord.model_validate_json(record) for _, record in rows]

    # audit ----------------------------------------------------------------
    def audit(self, since: datetime | None, action: str | None, principal: str | None, node: str | None,
              limit: int) -> list[AuditEntry]:
        node_id = str(SpiffeId(self.settings.domain, "node", node)) if node else None
        with self.store.transaction() as tx:
            rows = tx.audit_rows(since, action, principal, node_id, limit)
        return [AuditEntry(id=r.id, at=r.at, actor=r.actor, action=r.action, target=r.target, source=r.source,
                           detail=r.detail) for r in rows]

    # the data plane ---------------------------------------------------------
    def report_endpoints(self, ident: Identity, report: EndpointReport, observed: str | None,
                         now: datetime | None = None) -> PeerNode:
        """Record where a node can be reached — its own candidates, then the
        source address the controller saw (which may be a NAT's) — and the
        routes it offers (audited: offering to carry others' traffic is an
        identity event)."""
        name = ident.spiffe_id.name
        candidates = [_endpoint(e, self.settings.prefixes) for e in report.endpoints]
        if observed:
            candidates.append(_endpoint(_join(observed, report.listen_port), self.settings.prefixes))
        endpoints = tuple(dict.fromkeys(c for c in candidates if c))
        routing = _route_offer(report.routing, self.settings.prefixes).model_dump(mode="json", exclude_none=True)
        with self.store.transaction() as tx:
            row = tx.node(name)
            if row is None:
                raise NotFound(f"no node named {name!r}")
            if row.endpoints == endpoints and row.routing == routing:
                return self._peer(row)
            tx.set_node_endpoints(name, endpoints)
            if row.routing.get("routes", []) != routing.get("routes", []):
                tx.audit(now or datetime.now(timezone.utc), str(ident.spiffe_id), "node.routes",
                         str(ident.spiffe_id), routes=list(routing.get("routes", [])))
            tx.set_node_routing(name, routing)
            version = self.hub.bump(tx)
            row = tx.node(name)
            assert row is not None
        peer = self._peer(row)
        self.hub.publish(version, upsert=(peer,))
        return peer

    def renew(self, ident: Identity, req: RenewRequest, now: datetime) -> RenewResponse:
        """A fresh certificate for a node that still holds a valid one."""
        public_key = load_csr(req.csr)
        name = ident.spiffe_id.name
        with self.store.transaction() as tx:
            row = tx.node(name)
            if row is None:
                raise NotFound(f"no node named {name!r}")
            cert = build_leaf(self.ca, public_key, ident.spiffe_id, ident.claims, now, self.settings.node_cert_ttl)
            serial = format(cert.serial_number, "x")
            tx.insert_certificate(serial, str(ident.spiffe_id), "node", name, now, cert.not_valid_after_utc)
            tx.set_node_certificate(name, serial, cert.not_valid_after_utc)
            tx.audit(now, str(ident.spiffe_id), "certificate.renewed", str(ident.spiffe_id), serial=serial,
                     previous=ident.serial_hex, not_after=cert.not_valid_after_utc)
        return RenewResponse(certificate=cert_pem(cert))


def _policy_doc(row: PolicyRow | None) -> PolicyDoc | None:
    if row is None:
        return None
    return PolicyDoc(version=row.version, hash=row.hash, filename=row.filename, text=row.text)


def _policy_info(row: PolicyRow, unchanged: bool = False, with_text: bool = True) -> PolicyInfo:
    return PolicyInfo(version=row.version, hash=row.hash, filename=row.filename, applied_by=row.applied_by,
                      applied_at=row.applied_at, text=row.text if with_text else None, unchanged=unchanged)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _route_offer(offer: RouteOffer, prefixes: MeshPrefixes) -> RouteOffer:
    """Canonical prefixes, none inside the overlay (a gateway must not capture the mesh), a key, a port."""
    routes: list[str] = []
    for text in offer.routes:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise InvalidInput(f"advertised route {text!r}: {exc}") from exc
        overlay = prefixes.v4 if net.version == 4 else prefixes.v6
        if net.prefixlen and net.overlaps(overlay):  # type: ignore[arg-type]
            raise InvalidInput(f"advertised route {net} overlaps the mesh's own prefix {overlay}")
        routes.append(str(net))
    if routes and (offer.route_key is None or offer.gateway_port is None):
        raise InvalidInput("a node that advertises routes must give its route key and gateway port")
    if offer.route_key is not None:
        try:
            if len(base64.b64decode(offer.route_key, validate=True)) != 32:
                raise ValueError("not 32 bytes")
        except ValueError as exc:
            raise InvalidInput(f"route key {offer.route_key!r} is not a base64 X25519 key") from exc
    return RouteOffer(routes=tuple(sorted(set(routes), key=_prefix_order)), route_key=offer.route_key,
                      gateway_port=offer.gateway_port if routes else None)


def _prefix_order(text: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(text)
    return net.version, int(net.network_address), net.prefixlen


def _endpoint(text: str, prefixes: MeshPrefixes) -> str | None:
    """Normalise an underlay ``ip:port``; None for what can never be an endpoint.

    Loopback, link-local, multicast and the overlay itself are dropped (an
    endpoint inside the mesh would route the tunnel through itself).
    """
    host, sep, port = text.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        ip = getattr(ip, "ipv4_mapped", None) or ip  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
        number = int(port)
    except ValueError as exc:
        raise InvalidInput(f"invalid endpoint {text!r}: expected IP:PORT or [IPv6]:PORT") from exc
    if not sep or not 0 < number < 65536:
        raise InvalidInput(f"invalid endpoint {text!r}: expected IP:PORT or [IPv6]:PORT")
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or prefixes.block_of(str(ip)) is not None:
        return None
    return _join(str(ip), number)


def _token_problem(row: TokenRow | None, line: str, now: datetime) -> str | None:
    """Why a presented token cannot enroll, or None when it can.

    An unknown id and a wrong secret get the same answer, so the reply
    tells a guesser nothing about which ids exist.
    """
    if row is None or not hash_matches(line, row.hash):
        return "enrollment token is not valid for this mesh"
    if now >= row.expires_at:
        return f"enrollment token expired at {row.expires_at.isoformat(timespec='seconds')}"
    if not row.reusable and row.uses > 0:
        return "enrollment token was already used (it is single-use; create another with meshctl token create)"
    return None


def _token_info(row: TokenRow) -> TokenInfo:
    return TokenInfo(id=row.id, tags=row.tags, owner=row.owner, reusable=row.reusable, expires=row.expires_at,
                     created=row.created_at, uses=row.uses)
