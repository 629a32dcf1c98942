"""The controller's concerns called in process, on a fixed clock: no server, no sleeping."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from controller import agents, auth, enrollment, policies
from controller.authority import init_data_dir
from controller.context import Context
from controller.follow import apply_pending
from controller.tokens import create_token
from meshcore.errors import InvalidToken
from meshcore.identity import Identity, build_csr
from meshcore.wire.api import AgentIssueRequest, EnrollRequest, PolicyApply, TokenCreateRequest

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ADMIN = "spiffe://acme.mesh/admin/admin"
# SPEC's seed example: nikita@acme.com may delegate web:* to agents of nodes tagged agents
POLICY = (Path(__file__).resolve().parents[2] / "examples" / "policy.yaml").read_text()


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    init_data_dir(tmp_path / "data", "acme.mesh", "https://127.0.0.1:8443", NOW)
    c = Context.open(tmp_path / "data")
    c.hub.on_commit = lambda: apply_pending(c)  # what the follower does in a running controller
    yield c
    c.store.close()


def enroll(ctx: Context, token: str, name: str, now: datetime) -> Identity:
    wg = x25519.X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                     serialization.PublicFormat.Raw)
    req = EnrollRequest(token=token, csr=build_csr(ed25519.Ed25519PrivateKey.generate()),
                        wireguard_public_key=base64.b64encode(wg).decode(), name=name)
    pem = enrollment.enroll(ctx, req, "192.0.2.1", now).certificate
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return auth.authenticate(ctx, der, now)


def agent(ctx: Context, node: Identity, slot: int, now: datetime, ttl: int, parent: str | None = None,
          scopes: tuple[str, ...] = ("web:deploy",)) -> str:
    v4, v6 = ctx.settings.prefixes.block(0).agent_address(slot)
    req = AgentIssueRequest(csr=build_csr(ed25519.Ed25519PrivateKey.generate()), name="helper",
                            principal="nikita@acme.com", scopes=list(scopes), ttl_seconds=ttl, parent=parent,
                            ipv4=str(v4), ipv6=str(v6))
    return agents.issue_agent(ctx, node, req, now).agent.id


def test_a_token_expires_on_the_clock_it_is_given(ctx: Context) -> None:
    token = create_token(ctx, ADMIN, TokenCreateRequest(tags=["db"], ttl_seconds=60, reusable=True), NOW).token
    assert enroll(ctx, token, "db-1", NOW + timedelta(seconds=59)).spiffe_id.name == "db-1"
    with pytest.raises(InvalidToken, match="enrollment token expired at 2026-06-01T12:01:00"):
        enroll(ctx, token, "db-2", NOW + timedelta(seconds=60))
    with ctx.store.transaction() as tx:
        assert [r.action for r in tx.audit_rows(action="token")][-2:] == ["token.used", "token.refused"]


def test_a_sub_agent_ends_no_later_than_its_parent_and_with_it(ctx: Context) -> None:
    policies.apply_policy(ctx, ADMIN, PolicyApply(text=POLICY), NOW)
    token = create_token(ctx, ADMIN, TokenCreateRequest(tags=["agents"]), NOW).token
    node = enroll(ctx, token, "agents-1", NOW)
    parent = agent(ctx, node, 3, NOW, ttl=600)
    child = agent(ctx, node, 4, NOW + timedelta(seconds=60), ttl=3000, parent=parent)
    live = {a.id: a.expires for a in agents.list_agents(ctx, node, NOW + timedelta(seconds=61))}
    assert live == {parent: NOW + timedelta(seconds=600), child: NOW + timedelta(seconds=600)}
    sub = ctx.hub.subscribe("agents-1")
    assert agents.end_agent(ctx, node, parent, NOW + timedelta(seconds=120)).ended == [parent, child]
    update = sub.queue.get_nowait().message.agents
    assert update is not None and update.revoked == (parent, child)
    assert agents.list_agents(ctx, node, NOW + timedelta(seconds=121)) == []


def test_an_agent_goes_only_to_the_nodes_a_rule_could_admit_it_to(ctx: Context) -> None:
    """Targeted distribution: the seed policy lets Nikita's read agents reach tag:db, nothing else."""
    policies.apply_policy(ctx, ADMIN, PolicyApply(text=POLICY), NOW)
    home = enroll(ctx, create_token(ctx, ADMIN, TokenCreateRequest(tags=["agents"]), NOW).token, "agents-1", NOW)
    for name, tag in (("db-1", "db"), ("web-1", "web")):
        enroll(ctx, create_token(ctx, ADMIN, TokenCreateRequest(tags=[tag]), NOW).token, name, NOW)
    subs = {name: ctx.hub.subscribe(name) for name in ("agents-1", "db-1", "web-1")}
    born = agent(ctx, home, 3, NOW, ttl=600, scopes=("db:read",))
    got = {name: [m.type for m in _drain(sub)] for name, sub in subs.items()}
    assert got == {"agents-1": ["agents"], "db-1": ["agents"], "web-1": []}
    agents.end_agent(ctx, home, born, NOW + timedelta(seconds=1))
    got = {name: [m.agents.revoked for m in _drain(sub) if m.agents] for name, sub in subs.items()}
    assert got == {"agents-1": [(born,)], "db-1": [(born,)], "web-1": []}
    assert ctx.hub.live.of_node("web-1") == [] and len(ctx.hub.live) == 0


def test_a_policy_that_widens_an_agents_reach_sends_it_to_the_new_nodes_whole(ctx: Context) -> None:
    policies.apply_policy(ctx, ADMIN, PolicyApply(text=POLICY), NOW)
    home = enroll(ctx, create_token(ctx, ADMIN, TokenCreateRequest(tags=["agents"]), NOW).token, "agents-1", NOW)
    enroll(ctx, create_token(ctx, ADMIN, TokenCreateRequest(tags=["web"]), NOW).token, "web-1", NOW)
    web = ctx.hub.subscribe("web-1")
    born = agent(ctx, home, 3, NOW, ttl=600)
    assert _drain(web) == []
    wider = POLICY.replace("acls:\n", "acls:\n  - from: {principal: nikita@acme.com, via: agent}\n"
                                       "    to: [\"tag:web:443\"]\n", 1)
    policies.apply_policy(ctx, ADMIN, PolicyApply(text=wider), NOW)
    assert web.agents_stale  # its stream sends the agents it needs whole (controller.stream)
    assert ctx.hub.live.of_node("web-1") == [born]


def test_a_denied_flow_from_an_agent_its_receiver_was_never_sent_is_named_by_the_controller(ctx: Context) -> None:
    from controller import flows
    from meshcore.wire.api import FlowBatch

    policies.apply_policy(ctx, ADMIN, PolicyApply(text=POLICY), NOW)
    home = enroll(ctx, create_token(ctx, ADMIN, TokenCreateRequest(tags=["agents"]), NOW).token, "agents-1", NOW)
    web = enroll(ctx, create_token(ctx, ADMIN, TokenCreateRequest(tags=["web"]), NOW).token, "web-1", NOW)
    born = agent(ctx, home, 3, NOW, ttl=600)  # web:deploy: no rule admits it to web-1, which never holds it
    address = str(ctx.settings.prefixes.block(0).agent_address(3)[0])
    seen = {"at": NOW.isoformat(), "verdict": "deny", "rule": "default deny", "source": address,
            "destination": "100.64.0.65", "protocol": "tcp", "port": 443}
    flows.record_flows(ctx, web, FlowBatch.model_validate({"flows": [seen, {**seen, "source": "100.64.0.1"}]}), NOW)
    named, node = flows.find_flows(ctx, False, None, None, 10)
    assert (named.agent, named.principal, named.source_node, named.scopes) == (born, "nikita@acme.com", "agents-1",
                                                                                ["web:deploy"])
    assert node.agent is None and node.principal is None  # the node itself: no agent to name


def _drain(sub: Any) -> list[Any]:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait().message)
    return out


def test_the_policy_in_force_is_parsed_once_per_version(ctx: Context) -> None:
    assert policies.in_force(ctx) is None
    policies.apply_policy(ctx, ADMIN, PolicyApply(text=POLICY), NOW)
    first = policies.in_force(ctx)
    assert first is not None and policies.in_force(ctx) is first
    policies.apply_policy(ctx, ADMIN, PolicyApply(text=POLICY + "# v2\n"), NOW)
    assert policies.in_force(ctx) is not first


def _admin(ctx: Context, data: Path) -> Identity:
    import json

    cert = x509.load_pem_x509_certificate(json.loads((data / "admin.conf").read_text())["certificate"].encode())
    return auth.authenticate(ctx, cert.public_bytes(serialization.Encoding.DER), NOW)


def test_an_approval_code_expires_after_ten_minutes_and_works_once(ctx: Context, tmp_path: Path) -> None:
    import asyncio

    from controller import logins
    from meshcore.wire.api import LoginApprove, LoginStart

    token = create_token(ctx, ADMIN, TokenCreateRequest(owner="nikita@acme.com", ttl_seconds=3600), NOW).token
    laptop = enroll(ctx, token, "laptop", NOW)
    admin = _admin(ctx, tmp_path / "data")
    started = asyncio.run(logins.start_login(ctx, laptop, LoginStart(csr=build_csr(ed25519.Ed25519PrivateKey.generate())),
                                             NOW))
    late = NOW + logins.APPROVAL_TTL
    with pytest.raises(InvalidToken, match="no login is waiting for code"):
        logins.approve_login(ctx, admin, LoginApprove(code=started.user_code, principal="nikita@acme.com"), "a", late)
    with pytest.raises(InvalidToken, match="the login code expired"):
        asyncio.run(logins.poll_login(ctx, laptop, started.id, late))
    again = asyncio.run(logins.start_login(ctx, laptop, LoginStart(csr=build_csr(ed25519.Ed25519PrivateKey.generate())),
                                           NOW))
    first = logins.approve_login(ctx, admin, LoginApprove(code=again.user_code, principal="nikita@acme.com"), "a", NOW)
    assert first.principal == "nikita@acme.com" and first.device == "laptop"
    with pytest.raises(InvalidToken, match="already used"):
        logins.approve_login(ctx, admin, LoginApprove(code=again.user_code, principal="li@acme.com"), "a", NOW)
    assert asyncio.run(logins.poll_login(ctx, laptop, again.id, NOW)).principal == "nikita@acme.com"


def test_a_stream_whose_body_never_starts_holds_no_subscription(ctx: Context) -> None:
    import asyncio

    from controller.stream import open_stream

    async def run() -> None:
        never = open_stream(ctx, "n1", None, lambda: NOW)  # the client went away before the body started
        del never
        assert ctx.hub.connected == 0
        started = open_stream(ctx, "n1", None, lambda: NOW)
        assert (await anext(started)).startswith(b'{"type":')  # its first message: it is subscribed now
        assert ctx.hub.connected == 1
        await started.aclose()  # the client went away mid-stream
        assert ctx.hub.connected == 0

    asyncio.run(run())


def test_the_flow_log_keeps_a_week_and_at_most_its_cap(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller import flows
    from meshcore.wire.api import FlowBatch

    monkeypatch.setattr(flows, "PRUNE_EVERY", 3)
    token = create_token(ctx, ADMIN, TokenCreateRequest(tags=["db"]), NOW).token
    db = enroll(ctx, token, "db", NOW)

    def batch(at: datetime, n: int) -> FlowBatch:
        one = {"at": at.isoformat(), "verdict": "deny", "rule": "default deny", "source": "100.64.0.9",
               "destination": "100.64.0.65", "protocol": "tcp", "port": 5432}
        return FlowBatch.model_validate({"flows": [one] * n})

    flows.record_flows(ctx, db, batch(NOW - timedelta(days=8), 5), NOW)  # a week and a day old
    flows.record_flows(ctx, db, batch(NOW, 10), NOW)
    assert len(flows.find_flows(ctx, False, None, None, 1000)) == 15  # not pruned yet: every third batch
    flows.record_flows(ctx, db, batch(NOW, 10), NOW, keep=12)  # the third: the old ones go, then all but 12
    kept = flows.find_flows(ctx, False, None, None, 1000)
    assert len(kept) == 12 and all(f.at == NOW for f in kept)


def test_a_shorter_flow_retention_is_kept_even_when_no_batch_arrives(ctx: Context) -> None:
    """``serve --flow-retention 1h``: the hourly prune takes what is older, with no batch to prune on."""
    from controller import flows
    from meshcore.wire.api import FlowBatch

    token = create_token(ctx, ADMIN, TokenCreateRequest(tags=["db"]), NOW).token
    db = enroll(ctx, token, "db", NOW)
    one = {"verdict": "deny", "rule": "default deny", "source": "100.64.0.9", "destination": "100.64.0.65",
           "protocol": "tcp", "port": 5432}
    for age in (timedelta(hours=2), timedelta(minutes=30)):
        flows.record_flows(ctx, db, FlowBatch.model_validate({"flows": [{**one, "at": (NOW - age).isoformat()}]}),
                           NOW)
    ctx.flow_retention = timedelta(hours=1)
    assert flows.prune_flows(ctx, NOW) == 1
    assert [f.at for f in flows.find_flows(ctx, False, None, None, 10)] == [NOW - timedelta(minutes=30)]


def test_the_openapi_document_names_every_error_an_operation_may_answer(ctx: Context) -> None:
    from controller.api import ERRORS, create_app

    app = create_app(ctx)
    while not hasattr(app, "openapi"):  # below the ASGI middleware
        app = app.app
    doc = app.openapi()
    operations = [op for item in doc["paths"].values() for op in item.values()]
    assert len(operations) >= 30
    for op in operations:
        assert {str(s) for s in ERRORS} <= set(op["responses"]), op["operationId"]
        (body,) = op["responses"]["403"]["content"].values()  # (in the route's media type: text/plain for /v1/ca)
        assert body["schema"]["$ref"].endswith("/ErrorBody")
