"""People log in (SPEC §6): by an administrator's approval, or through a real OpenID provider's device flow.

The controller is the real ``mesh-controller serve``; the provider is panva's
oidc-provider (tests/oidc), and the person approving at it is played with
plain HTTP forms. A device is an enrolled node speaking with its own
certificate, as meshd does for ``meshctl login``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.oidc import OidcProvider

from .conftest import Controller, Device, cli, enroll_device


@pytest.fixture
def device(controller: Controller, tmp_path: Path) -> Iterator[Device]:
    d = enroll_device(controller, tmp_path / "laptop", "laptop", "--owner", "nikita@acme.com")
    yield d
    d.close()


def poll(device: Device, login: dict[str, Any]) -> httpx.Response:
    return device.http.post(f"/v1/login/{login['id']}")


def approve(controller: Controller, code: str, principal: str = "nikita@acme.com") -> subprocess.CompletedProcess[str]:
    return cli("meshctl", "login", "approve", code, "--principal", principal, env=controller.env)


def audit(controller: Controller, action: str) -> list[dict[str, Any]]:
    return list(json.loads(cli("meshctl", "audit", "--action", action, "--json", env=controller.env,
                               check=True).stdout))


def openssl_verify(controller: Controller, pem: str, tmp_path: Path) -> str:
    (tmp_path / "principal.crt").write_text(pem)
    done = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(controller.data / "ca.crt"),
                           str(tmp_path / "principal.crt")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(tmp_path / "principal.crt")],
                          capture_output=True, text=True, check=True).stdout
    return text


def test_an_administrator_approves_a_login_and_the_device_gets_a_principal_certificate(
        controller: Controller, device: Device, tmp_path: Path) -> None:
    _, login = device.login()
    assert login["mode"] == "approval" and len(str(login["user_code"])) == 9 and login["expires_in"] == 600
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(poll, device, login)  # waits at the controller for the approval
        approved = approve(controller, str(login["user_code"]))
        assert approved.returncode == 0, approved.stderr
        assert "approved: nikita@acme.com is logged in on laptop" in approved.stdout
        done = waiting.result(10)
    assert done.status_code == 200 and done.json()["status"] == "done", done.text
    san = openssl_verify(controller, done.json()["certificate"], tmp_path)
    assert "URI:spiffe://acme.mesh/user/acme.com/nikita" in san
    (row,) = audit(controller, "principal.logged_in")
    assert row["detail"]["principal"] == "nikita@acme.com" and row["detail"]["node"] == "laptop"
    assert row["detail"]["via"] == "approval by spiffe://acme.mesh/admin/admin"


def test_a_wrong_used_or_foreign_code_is_refused_and_changes_nothing(controller: Controller, device: Device) -> None:
    _, login = device.login()
    wrong = approve(controller, "BBBB-BBBB")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "meshctl: error: no login is waiting for code 'BBBB-BBBB' (wrong, already used or expired)"
    assert approve(controller, str(login["user_code"]).lower().replace("-", "")).returncode == 0  # forgiving input
    again = approve(controller, str(login["user_code"]))
    assert again.returncode == 2 and "already used" in again.stderr
    assert [r["detail"]["reason"] for r in audit(controller, "login.refused")] == ["no pending login has this code"] * 2
    other = device.http.post("/v1/login/l-not-a-login")
    assert other.status_code == 404 and "no login" in other.json()["error"]


def test_wrong_codes_are_rate_limited_like_enrollment_tokens(controller: Controller, device: Device) -> None:
    codes = [approve(controller, f"BBBB-BB{c}{c}").returncode for c in "BCDFGHJKLMN"]
    assert codes[:10] == [2] * 10 and codes[10] == 5  # the 11th attempt within the window: refused outright


def test_only_an_administrator_approves_and_only_a_node_starts(controller: Controller, device: Device) -> None:
    refused = device.http.post("/v1/login/approve", json={"code": "BBBB-BBBB", "principal": "nikita@acme.com"})
    assert refused.status_code == 403 and "admin only" in refused.json()["error"]
    from idmesh.client import AdminCredential, client_ssl_context

    admin = AdminCredential.load(controller.data / "admin.conf")
    with httpx.Client(base_url=controller.url, verify=client_ssl_context(admin.ca, admin.certificate, admin.key),
                      trust_env=False) as http:
        started = http.post("/v1/login", json={"csr": "x"})
    assert started.status_code == 403 and "node only" in started.json()["error"]


# -- through the organisation's OpenID provider -------------------------------------------------------------------
@pytest.fixture
def with_provider(controller: Controller, oidc_provider: OidcProvider, tmp_path: Path) -> OidcProvider:
    secret = tmp_path / "oidc-secret"
    secret.write_text(oidc_provider.client_secret + "\n")
    secret.chmod(0o600)
    done = cli("mesh-controller", "oidc", "set", "--data", str(controller.data), "--issuer", oidc_provider.issuer,
               "--client-id", oidc_provider.client_id, "--client-secret-file", str(secret),
               "--ca-file", str(oidc_provider.ca_file))
    assert done.returncode == 0, done.stderr
    return oidc_provider


def finish(device: Device, login: dict[str, Any], polls: int = 20) -> httpx.Response:
    """Poll as RFC 8628 says (the interval, longer after slow_down) until the login ends either way."""
    import time

    interval = float(login["interval"])
    for _ in range(polls):
        resp = poll(device, login)
        if resp.status_code != 200 or resp.json()["status"] == "done":
            return resp
        interval = float(resp.json()["interval"])
        time.sleep(interval)
    raise AssertionError("the login did not finish")


def test_a_login_through_the_openid_provider_gives_the_verified_email_as_principal(
        controller: Controller, device: Device, with_provider: OidcProvider, tmp_path: Path) -> None:
    shown = cli("mesh-controller", "oidc", "show", "--data", str(controller.data), "--json", check=True).stdout
    assert json.loads(shown)["issuer"] == with_provider.issuer and "secret" not in json.loads(shown).get("client_id")
    _, login = device.login()
    assert login["mode"] == "oidc" and str(login["verification_uri"]).startswith(with_provider.issuer)
    with_provider.approve(str(login["verification_uri_complete"]), login="li@acme.com")
    done = finish(device, login)
    assert done.status_code == 200 and done.json()["principal"] == "li@acme.com", done.text
    assert "URI:spiffe://acme.mesh/user/acme.com/li" in openssl_verify(controller, done.json()["certificate"], tmp_path)
    (row,) = audit(controller, "principal.logged_in")
    assert row["detail"]["via"] == with_provider.issuer


def test_an_unverified_email_gets_no_certificate(controller: Controller, device: Device,
                                                  with_provider: OidcProvider) -> None:
    _, login = device.login()
    with_provider.approve(str(login["verification_uri_complete"]), login="mallory@acme.com")
    done = finish(device, login)
    assert done.status_code == 403
    assert done.json()["error"] == ("the identity provider has not verified email mallory@acme.com: no principal "
                                    "certificate for it")
    assert poll(device, login).status_code == 403  # the login is over
    assert audit(controller, "principal.logged_in") == []


def test_a_person_who_refuses_at_the_provider_ends_the_login(controller: Controller, device: Device,
                                                             with_provider: OidcProvider) -> None:
    _, login = device.login()
    with_provider.deny(str(login["verification_uri_complete"]))
    done = finish(device, login)
    assert done.status_code == 403 and "refused at the identity provider" in done.json()["error"]


def test_polling_faster_than_the_interval_is_told_to_slow_down(controller: Controller, device: Device,
                                                               with_provider: OidcProvider) -> None:
    _, login = device.login()
    first, second = poll(device, login), poll(device, login)
    assert first.json()["status"] == "pending"
    assert second.json() == {**second.json(), "status": "slow_down", "interval": int(str(login["interval"])) + 5}


def test_a_provider_that_rotated_its_keys_is_still_trusted(controller: Controller, device: Device,
                                                           with_provider: OidcProvider) -> None:
    _, login = device.login()
    with_provider.approve(str(login["verification_uri_complete"]))
    assert finish(device, login).status_code == 200  # the controller has the old keys cached now
    with_provider.rotate_keys(retire_old=True)
    _, login = device.login()
    with_provider.approve(str(login["verification_uri_complete"]))
    done = finish(device, login)
    assert done.status_code == 200 and done.json()["principal"] == "nikita@acme.com", done.text


def test_oidc_clear_goes_back_to_approval(controller: Controller, device: Device, with_provider: OidcProvider) -> None:
    cleared = cli("mesh-controller", "oidc", "clear", "--data", str(controller.data), check=True)
    assert "administrator's approval" in cleared.stdout
    _, login = device.login()
    assert login["mode"] == "approval"
    assert [r["action"] for r in audit(controller, "oidc")] == ["oidc.set", "oidc.cleared"]
