"""What the controller signs for nodes' Workload APIs (controller.workload): short X509-SVIDs, JWT-SVIDs, the JWKS."""

from __future__ import annotations

import os
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jwt as pyjwt
from cryptography import x509

from meshcore.identity import verify_leaf

from .conftest import Controller, cli
from .test_agents import Node, node  # noqa: F401 (the fixture)


def trusting(controller: Controller) -> ssl.SSLContext:
    """No client certificate: the JWKS is public."""
    return ssl.create_default_context(cafile=str(controller.data / "ca.crt"))


def born(node: Node, ttl: int = 600) -> tuple[str, x509.Certificate]:  # noqa: F811
    resp = node.ask(ttl=ttl)
    assert resp.status_code == 200, resp.text
    return resp.json()["agent"]["id"], x509.load_pem_x509_certificate(resp.json()["certificate"].encode())


def test_an_svid_is_the_agents_key_and_claims_for_at_most_the_svid_ttl(controller: Controller, node: Node) -> None:  # noqa: F811
    controller.stop()
    controller.extra = ["--svid-ttl", "30s"]
    controller.start()
    agent_id, birth = born(node)
    resp = node.http.post(f"/v1/agents/{agent_id}/svid")
    assert resp.status_code == 200, resp.text
    svid = x509.load_pem_x509_certificate(resp.json()["certificate"].encode())
    now = datetime.now(UTC)
    ident, first = verify_leaf(svid, node.ca, now), verify_leaf(birth, node.ca, now)
    assert ident.spiffe_id == first.spiffe_id and ident.claims == first.claims
    assert svid.public_key() == birth.public_key() and svid.serial_number != birth.serial_number
    assert svid.not_valid_after_utc - now <= timedelta(seconds=31)  # (notBefore is backdated for skew)
    audit = cli("meshctl", "audit", "--action", "agent.svid", "--json", env=controller.env, check=True).stdout
    assert agent_id in audit


def test_an_svid_never_outlives_its_agent(node: Node) -> None:  # noqa: F811
    agent_id, birth = born(node, ttl=20)  # shorter than the default hour
    svid = x509.load_pem_x509_certificate(node.http.post(f"/v1/agents/{agent_id}/svid").json()["certificate"].encode())
    assert svid.not_valid_after_utc <= birth.not_valid_after_utc


def test_a_revoked_or_foreign_agent_gets_no_svid_and_no_jwt(controller: Controller, node: Node,  # noqa: F811
                                                            tmp_path: Path) -> None:
    agent_id, _ = born(node)
    other_token = controller.token("--tag", "agents")
    cli("meshd", "enroll", other_token, "--name", "agents-2", "--state", str(tmp_path / "other"), check=True)
    other = Node(controller, tmp_path / "other")
    try:
        for path, body in ((f"/v1/agents/{agent_id}/svid", None), (f"/v1/agents/{agent_id}/jwt", {"audience": ["db"]})):
            assert other.http.post(path, json=body).status_code == 404  # not its agent
    finally:
        other.http.close()
    cli("meshctl", "agent", "revoke", agent_id, env=controller.env, check=True)
    resp = node.http.post(f"/v1/agents/{agent_id}/svid")
    assert resp.status_code == 403 and "revoked" in resp.json()["error"], resp.text
    assert node.http.post(f"/v1/agents/{agent_id}/jwt", json={"audience": ["db"]}).status_code == 403


def test_a_jwt_svid_verifies_with_the_published_jwks_for_its_audience_only(controller: Controller,
                                                                          node: Node) -> None:  # noqa: F811
    agent_id, _ = born(node)
    resp = node.http.post(f"/v1/agents/{agent_id}/jwt", json={"audience": ["db", "web"]})
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]
    jwks = httpx.get(f"{controller.url}/.well-known/jwks.json", verify=trusting(controller)).json()
    assert jwks == httpx.get(f"{controller.url}/v1/jwks", verify=trusting(controller)).json()
    assert jwks["keys"][0]["use"] == "jwt-svid" and "d" not in jwks["keys"][0]
    key = pyjwt.PyJWKSet.from_dict(jwks).keys[0]
    claims = pyjwt.decode(token, key.key, algorithms=["ES256"], audience="web")
    assert claims["sub"] == f"spiffe://acme.mesh/agent/{agent_id}" and claims["principal"] == "nikita@acme.com"
    assert claims["scopes"] == ["db:read"] and claims["authorized_by"].startswith("node agents-1")
    assert claims["exp"] - claims["iat"] <= 300
    assert pyjwt.get_unverified_header(token)["kid"] == jwks["keys"][0]["kid"]
    try:
        pyjwt.decode(token, key.key, algorithms=["ES256"], audience="mail")
        raise AssertionError("a JWT-SVID for db and web was accepted for mail")
    except pyjwt.InvalidAudienceError:
        pass
    assert os.stat(controller.data / "jwt.key").st_mode & 0o077 == 0
    bad: dict[str, list[str]]
    for bad in ({"audience": list[str]()}, {"audience": [""]}, {"audience": ["x" * 300]}, {}):
        assert node.http.post(f"/v1/agents/{agent_id}/jwt", json=bad).status_code == 422, bad


def test_the_jwt_key_survives_a_restart(controller: Controller, node: Node) -> None:  # noqa: F811
    ca = trusting(controller)
    before = httpx.get(f"{controller.url}/v1/jwks", verify=ca).json()
    controller.stop()
    controller.start()
    assert httpx.get(f"{controller.url}/v1/jwks", verify=ca).json() == before
