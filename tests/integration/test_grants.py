"""A person's grant lets a node start agents the node's word alone may not (SPEC §6), and nothing more.

The seed policy (examples/policy.yaml): Nikita's agents may read on the
node's word, but a delegation ``requires_grant: ["db:write"]``. Nikita logs
in (approved by the administrator), signs grants with ``meshctl grant
create`` (the real command, with her principal certificate) and a tagged
node asks for agents with them.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshcore.grants import sign_grant
from meshcore.identity import build_csr, key_pem, load_certificate, verify_leaf
from meshctl.principal import Principal

from .conftest import Controller, Device, cli, enroll_device

SEED = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"


@dataclass
class Lab:
    controller: Controller
    agents: Device
    other: Device
    env: dict[str, str]
    """meshctl's environment as Nikita (her IDMESH_USER_STATE) and as the administrator."""
    slot: int = 2

    def grant(self, *args: str) -> str:
        return cli("meshctl", "grant", "create", *args, env=self.env, check=True).stdout.strip()

    def ask(self, scopes: tuple[str, ...] = ("db:write",), grant: str | None = None, ttl: int = 600,
            device: Device | None = None, principal: str = "nikita@acme.com") -> httpx.Response:
        device = device or self.agents
        self.slot += 1
        b4, b6 = (ipaddress.ip_network(b) for b in device.record["blocks"])
        v4, v6 = str(b4.network_address + self.slot), str(b6.network_address + self.slot)
        body = {"csr": build_csr(ed25519.Ed25519PrivateKey.generate()), "name": "writer", "principal": principal,
                "scopes": list(scopes), "ttl_seconds": ttl, "parent": None, "ipv4": v4, "ipv6": v6, "grant": grant}
        return device.http.post("/v1/agents", json=body)


def login_as(controller: Controller, device: Device, state: Path, principal: str) -> None:
    """What meshctl login does, with the administrator approving; the login lands in ``state``."""
    key = ed25519.Ed25519PrivateKey.generate()
    _, login = device.login(key)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(device.http.post, f"/v1/login/{login['id']}")
        cli("meshctl", "login", "approve", str(login["user_code"]), "--principal", principal, env=controller.env,
            check=True)
        done = waiting.result(10).json()
    Principal.save(state, key_pem(key), done["certificate"], (controller.data / "ca.crt").read_text(),
                   principal=principal, controller=controller.url, domain="acme.mesh", device=device.name,
                   not_after=load_certificate(done["certificate"]).not_valid_after_utc)


@pytest.fixture
def lab(controller: Controller, tmp_path: Path) -> Iterator[Lab]:
    cli("meshctl", "policy", "apply", str(SEED), env=controller.env, check=True)
    agents = enroll_device(controller, tmp_path / "agents-1", "agents-1", "--tag", "agents")
    other = enroll_device(controller, tmp_path / "agents-2", "agents-2", "--tag", "agents")
    laptop = enroll_device(controller, tmp_path / "laptop", "laptop", "--owner", "nikita@acme.com")
    env = {**controller.env, "IDMESH_USER_STATE": str(tmp_path / "nikita")}
    login_as(controller, laptop, tmp_path / "nikita", "nikita@acme.com")
    lab = Lab(controller, agents, other, env)
    yield lab
    for d in (agents, other, laptop):
        d.close()


def test_the_nodes_word_reads_but_only_nikitas_grant_writes(lab: Lab) -> None:
    assert lab.ask(("db:read",)).status_code == 200
    refused = lab.ask(("db:write",))
    assert refused.status_code == 403
    assert "needs a grant from nikita@acme.com" in refused.json()["error"], refused.text
    grant = lab.grant("--node", "agents-1", "--scope", "db:write", "--ttl", "30m", "--uses", "1")
    born = lab.ask(("db:write",), grant)
    assert born.status_code == 200, born.text
    agent = born.json()["agent"]
    assert agent["authorized_by"].startswith("nikita@acme.com (grant g") and agent["grant"]
    ca = load_certificate((lab.controller.data / "ca.crt").read_bytes())
    ident = verify_leaf(load_certificate(born.json()["certificate"]), ca, datetime.now(UTC))
    assert ident.claims.grant == agent["grant"] and ident.claims.authorized == "grant"
    rows = json.loads(cli("meshctl", "audit", "--action", "agent.issued", "--json", env=lab.env, check=True).stdout)
    assert rows[-1]["detail"]["authorized_by"] == agent["authorized_by"]
    assert rows[0]["detail"]["authorized_by"] == "node agents-1 (delegation)"


@pytest.mark.parametrize(("case", "reason"), [
    ("other node", "is for agents-2, not node agents-1"),
    ("used up", "is used up (1 of 1 used)"),
    ("scopes", "exceed grant"),
    ("lifetime", "would outlive grant"),
    ("tampered", "signature does not verify"),
    ("unregistered", "is not registered"),
    ("beyond delegation", "no delegation grants nikita@acme.com the scope(s) ops:root"),
])
def test_a_grant_that_does_not_fit_is_refused_saying_what_does_not(lab: Lab, case: str, reason: str) -> None:
    ask: dict[str, Any]
    if case == "other node":
        grant, ask = lab.grant("--node", "agents-2", "--scope", "db:write"), {}
    elif case == "used up":
        grant = lab.grant("--node", "agents-1", "--scope", "db:write", "--uses", "1")
        assert lab.ask(("db:write",), grant).status_code == 200
        ask = {}
    elif case == "scopes":
        grant, ask = lab.grant("--node", "agents-1", "--scope", "db:read"), {"scopes": ("db:write",)}
    elif case == "lifetime":
        grant, ask = lab.grant("--node", "agents-1", "--scope", "db:write", "--ttl", "5m"), {"ttl": 3600}
    elif case == "tampered":
        head, body, sig = lab.grant("--node", "agents-1", "--scope", "db:write").split(".")
        grant, ask = f"{head}.{body[:-4]}AAAA.{sig}", {}
    elif case == "unregistered":
        me = Principal.load(Path(lab.env["IDMESH_USER_STATE"]))
        key = serialization.load_pem_private_key(me.key_file.read_bytes(), password=None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        grant = sign_grant(key, load_certificate(me.cert_file.read_bytes()), me.principal, "acme.mesh", "agents-1",
                           ["db:write"], timedelta(minutes=5), datetime.now(UTC))
        ask = {}
    else:
        grant, ask = lab.grant("--node", "agents-1", "--scope", "ops:root"), {"scopes": ("ops:root",)}
    refused = lab.ask(grant=grant, **ask)
    assert refused.status_code == 403, refused.text
    assert reason in refused.json()["error"]
    rows = json.loads(cli("meshctl", "audit", "--action", "agent.refused", "--json", env=lab.env, check=True).stdout)
    assert reason in rows[-1]["detail"]["reason"]


def test_revoking_a_grant_revokes_its_agents_and_stops_new_births(lab: Lab) -> None:
    grant = lab.grant("--node", "tag:agents", "--scope", "db:write", "--json")
    line, grant_id = json.loads(grant)["grant"], json.loads(grant)["id"]
    born = [lab.ask(("db:write",), line).json()["agent"]["id"] for _ in range(2)]
    kept = lab.ask(("db:read",)).json()["agent"]["id"]  # the node's word: no grant behind it
    done = cli("meshctl", "grant", "revoke", grant_id, env=lab.env, check=True).stdout
    assert f"revoked 1 grant(s): {grant_id}; 2 agent(s)" in done
    live = {a["id"] for a in json.loads(cli("meshctl", "agent", "list", "--mesh", "--json", env=lab.env,
                                            check=True).stdout)}
    assert kept in live and not live & set(born)
    again = lab.ask(("db:write",), line)
    assert again.status_code == 403 and "is revoked" in again.json()["error"]


def test_logging_out_revokes_the_principal_certificate_its_grants_and_their_agents(lab: Lab) -> None:
    grant = lab.grant("--node", "agents-1", "--scope", "db:write")
    agent = lab.ask(("db:write",), grant).json()["agent"]["id"]
    out = cli("meshctl", "logout", env=lab.env, check=True).stdout
    assert "logged out nikita@acme.com" in out and "1 grant(s) and 1 agent(s)" in out
    refused = lab.ask(("db:write",), grant)
    assert refused.status_code == 403 and "revoked" in refused.json()["error"]
    live = {a["id"] for a in json.loads(cli("meshctl", "agent", "list", "--mesh", "--json", env=lab.env,
                                            check=True).stdout)}
    assert agent not in live
    whoami = cli("meshctl", "whoami", env=lab.env)
    assert whoami.returncode == 3 and "not logged in" in whoami.stderr
    assert not os.path.exists(Path(lab.env["IDMESH_USER_STATE"]) / "principal.key")


def test_grants_are_listed_for_their_principal_and_the_admin_revokes_them_all(lab: Lab) -> None:
    for node in ("agents-1", "tag:agents"):
        lab.grant("--node", node, "--scope", "db:write")
    mine = json.loads(cli("meshctl", "grant", "list", "--json", env=lab.env, check=True).stdout)
    assert [g["node"] for g in mine] == ["agents-1", "tag:agents"] and {g["state"] for g in mine} == {"live"}
    done = json.loads(cli("meshctl", "grant", "revoke", "--principal", "nikita@acme.com", "--json", env=lab.env,
                          check=True).stdout)
    assert sorted(done["grants"]) == sorted(g["id"] for g in mine)
    assert {g["state"] for g in json.loads(cli("meshctl", "grant", "list", "--principal", "all", "--json",
                                               env=lab.env, check=True).stdout)} == {"revoked"}


def test_whoami_says_who_where_and_until_when(lab: Lab) -> None:
    me: dict[str, Any] = json.loads(cli("meshctl", "whoami", "--json", env=lab.env, check=True).stdout)
    assert me["principal"] == "nikita@acme.com" and me["device"] == "laptop" and not me["expired"]
    key = Path(lab.env["IDMESH_USER_STATE"]) / "principal.key"
    assert key.stat().st_mode & 0o777 == 0o600
