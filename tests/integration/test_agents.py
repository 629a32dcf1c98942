"""Agent identities at the controller: delegations, sub-agents, revocation."""

from __future__ import annotations

import ipaddress
import json
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshcore.identity import build_csr, verify_leaf

from .conftest import Controller, cli

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:read", "web:*"]
    max_ttl: 1h
acls: []
"""


class Node:
    def __init__(self, controller: Controller, state: Path) -> None:
        record = json.loads((state / "node.json").read_text())
        self.name = record["name"]
        self.blocks = [ipaddress.ip_network(b) for b in record["blocks"]]
        ctx = ssl.create_default_context(cafile=str(state / "ca.crt"))
        ctx.load_cert_chain(state / "node.crt", state / "node.key")
        self.http = httpx.Client(base_url=controller.url, verify=ctx)
        self.ca = x509.load_pem_x509_certificate((state / "ca.crt").read_bytes())
        self.slot = 2

    def ask(self, principal: str = "nikita@acme.com", scopes: tuple[str, ...] = ("db:read",), ttl: int = 600,
            parent: str | None = None, v4: str | None = None) -> httpx.Response:
        self.slot += 1
        body = {"csr": build_csr(ed25519.Ed25519PrivateKey.generate()), "name": "helper", "principal": principal,
                "scopes": list(scopes), "ttl_seconds": ttl, "parent": parent,
                "ipv4": v4 or str(self.blocks[0].network_address + self.slot),
                "ipv6": str(self.blocks[1].network_address + self.slot)}
        return self.http.post("/v1/agents", json=body)


@pytest.fixture
def node(controller: Controller, tmp_path: Path) -> Iterator[Node]:
    (tmp_path / "policy.yaml").write_text(POLICY)
    cli("meshctl", "policy", "apply", str(tmp_path / "policy.yaml"), env=controller.env, check=True)
    token = controller.token("--tag", "agents")
    cli("meshd", "enroll", token, "--name", "agents-1", "--state", str(tmp_path / "n"), check=True)
    n = Node(controller, tmp_path / "n")
    yield n
    n.http.close()


def test_a_delegated_agent_gets_a_certificate_with_its_claims(node: Node) -> None:
    resp = node.ask(scopes=("db:read", "web:deploy"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ident = verify_leaf(x509.load_pem_x509_certificate(body["certificate"].encode()), node.ca,
                        datetime.now(UTC))
    assert str(ident.spiffe_id) == f"spiffe://acme.mesh/agent/{body['agent']['id']}"
    assert ident.claims.principal == "nikita@acme.com" and ident.claims.node == "agents-1"
    assert [str(s) for s in ident.claims.scopes] == ["db:read", "web:deploy"]
    assert ident.claims.name == "helper" and list(ident.claims.addresses) == body["agent"]["addresses"]


@pytest.mark.parametrize("ask, reason", [
    ({"principal": "li@acme.com"}, "no delegation lets any node mint agents for li@acme.com"),
    ({"scopes": ("db:write",)}, "no delegation grants nikita@acme.com the scope(s) db:write"),
    ({"ttl": 7200}, "lifetime 2h exceeds the delegation's max_ttl 1h"),
    ({"v4": "100.127.0.5"}, "is not in node agents-1's agent pool"),
])
def test_requests_beyond_the_delegation_are_refused_and_audited(node: Node, controller: Controller,
                                                                ask: dict[str, object], reason: str) -> None:
    resp = node.ask(**ask)  # type: ignore[arg-type]
    assert resp.status_code == 403 and reason in resp.json()["error"], resp.text
    refused = controller.query("SELECT detail FROM audit WHERE action = 'agent.refused'")
    assert len(refused) == 1 and reason in refused[0][0]


def test_a_sub_agent_is_attenuated_and_dies_with_its_parent(node: Node, controller: Controller) -> None:
    parent = node.ask(scopes=("db:read", "web:*"), ttl=600).json()["agent"]
    child = node.ask(scopes=("web:read",), ttl=3000, parent=parent["id"])
    assert child.status_code == 200, child.text
    assert child.json()["agent"]["expires"] <= parent["expires"]  # never outlives its parent
    wider = node.ask(scopes=("db:read", "db:write"), parent=parent["id"])
    assert wider.status_code == 403 and "exceed its parent's" in wider.json()["error"]
    revoked = cli("meshctl", "agent", "revoke", parent["id"], "--json", env=controller.env, check=True)
    assert set(json.loads(revoked.stdout)["ended"]) == {parent["id"], child.json()["agent"]["id"]}
    assert node.http.get("/v1/agents").json() == []
    orphan = node.ask(scopes=("web:read",), parent=parent["id"])
    assert orphan.status_code == 403 and "is not a live agent" in orphan.json()["error"]


def test_revoking_a_principal_ends_all_its_agents_and_a_node_retires_only_its_own(node: Node,
                                                                                   controller: Controller) -> None:
    ids = [node.ask().json()["agent"]["id"] for _ in range(3)]
    assert node.http.delete(f"/v1/agents/{ids[0]}").json() == {"ended": [ids[0]]}
    out = cli("meshctl", "agent", "revoke", "--principal", "nikita@acme.com", env=controller.env, check=True)
    assert out.stdout.startswith("revoked 2 agent(s)")
    listed = json.loads(cli("meshctl", "agent", "list", "--mesh", "--json", env=controller.env, check=True).stdout)
    assert listed == []
    actions = [r[0] for r in controller.query("SELECT action FROM audit WHERE action LIKE 'agent.%'")]
    assert actions.count("agent.issued") == 3 and actions.count("agent.retired") == 1
    assert actions.count("agent.revoked") == 2


def test_the_stream_carries_live_agents_and_revocations(node: Node, controller: Controller) -> None:
    agent = node.ask().json()["agent"]
    with node.http.stream("GET", "/v1/netmap", timeout=httpx.Timeout(10.0)) as stream:
        lines = stream.iter_lines()
        first = [json.loads(next(lines)) for _ in range(4)]
        assert [m["type"] for m in first] == ["policy", "full", "agents", "nat"]  # nat: STUN is on by default
        assert first[2]["agents"]["full"] is True and len(first[2]["agents"]["certificates"]) == 1
        cli("meshctl", "agent", "revoke", agent["id"], env=controller.env, check=True)
        update = json.loads(next(lines))
        assert update["type"] == "agents" and update["agents"]["revoked"] == [agent["id"]]


def test_an_address_is_one_address_however_it_is_spelled(node: Node) -> None:
    first = node.ask()
    assert first.status_code == 200, first.text
    held6 = ipaddress.ip_address(first.json()["agent"]["addresses"][1])
    body = {"csr": build_csr(ed25519.Ed25519PrivateKey.generate()), "name": "twin", "principal": "nikita@acme.com",
            "scopes": ["db:read"], "ttl_seconds": 600, "ipv4": str(node.blocks[0].network_address + 40),
            "ipv6": held6.exploded.upper()}  # FDD9:…:0002 is the live agent's fdd9:…::2
    twin = node.http.post("/v1/agents", json=body)
    assert twin.status_code == 409 and "is held by a live agent" in twin.json()["error"], twin.text
    for v4 in (node.blocks[0].network_address, node.blocks[0].broadcast_address):  # nobody's agent address
        body.update(ipv4=str(v4), ipv6=str(node.blocks[1].network_address + 41))
        refused = node.http.post("/v1/agents", json=body)
        assert refused.status_code == 403 and "agent pool" in refused.json()["error"], refused.text
    body.update(ipv4=str(node.blocks[0].network_address + 42).replace(".", "。"))
    assert node.http.post("/v1/agents", json=body).status_code == 422  # not an address at all


def test_removing_a_node_revokes_its_agents_everywhere(node: Node, controller: Controller, tmp_path: Path) -> None:
    """Everywhere: on every node that holds the agent (a rule admits Nikita's agents to the watcher)."""
    (tmp_path / "watch.yaml").write_text(POLICY.replace("acls: []", "acls:\n  - from: {principal: nikita@acme.com, "
                                                        "via: agent}\n    to: [\"tag:watch:443\"]"))
    cli("meshctl", "policy", "apply", str(tmp_path / "watch.yaml"), env=controller.env, check=True)
    token = controller.token("--tag", "watch")
    cli("meshd", "enroll", token, "--name", "watcher", "--state", str(tmp_path / "w"), check=True)
    watcher = Node(controller, tmp_path / "w")
    agent = node.ask().json()["agent"]
    with watcher.http.stream("GET", "/v1/netmap", timeout=httpx.Timeout(10.0)) as stream:
        lines = stream.iter_lines()
        assert [json.loads(next(lines))["type"] for _ in range(4)] == ["policy", "full", "agents", "nat"]
        cli("meshctl", "nodes", "remove", "agents-1", env=controller.env, check=True)
        updates = [json.loads(next(lines)) for _ in range(2)]
    assert {"type": "agents", "revoked": [agent["id"]]} in [
        {"type": u["type"], "revoked": u["agents"]["revoked"]} for u in updates if u["type"] == "agents"]
    listed = json.loads(cli("meshctl", "agent", "list", "--mesh", "--json", env=controller.env, check=True).stdout)
    assert listed == []
    reasons = [r[0] for r in controller.query("SELECT detail FROM audit WHERE action = 'agent.revoked'")]
    assert len(reasons) == 1 and "its node agents-1 was removed" in reasons[0]
    watcher.http.close()
