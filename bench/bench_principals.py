"""What proving who you are costs (SPEC §6): the login round trip without the human, and a grant's check.

* **login, approval mode**: a real controller (``mesh-controller serve``) on
  loopback; a device (a node certificate, as meshd) starts a login and
  waits on its poll; the administrator's approval is sent (the API call
  ``meshctl login approve`` makes); the clock runs from that call until the
  principal certificate is on the device's disk (written and fsynced, as
  meshctl does);
* **login, OpenID provider**: the same against panva's oidc-provider
  (tests/oidc): the person approves at the provider, then the clock runs
  over the device's next poll — the controller's token request to the
  provider, the ID token's checks, the signature — until the certificate is
  on disk. The polling interval the provider sets comes on top in real life;
* **grant check at the controller**: agent births in process
  (``controller.agents.issue_agent``: no HTTP, no TLS), alternately on the
  node's word and with a grant (the same policy, node and scopes' cost), so
  the difference of the medians is what verifying and counting a grant
  adds.

    .venv/bin/python bench/bench_principals.py [--logins 30] [--births 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from common import command_line, free_port, wait_listening
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from controller import agents, auth, grants, logins, policies
from controller.authority import init_data_dir
from controller.context import Context
from controller.tokens import create_token
from idmesh.client import AdminCredential, client_ssl_context
from meshcore.grants import sign_grant
from meshcore.identity import build_csr, load_certificate
from meshcore.wire.api import (
    AgentIssueRequest,
    GrantRegister,
    LoginApprove,
    LoginStart,
    PolicyApply,
    TokenCreateRequest,
)
from tests.unit.test_controller_concerns import enroll

BIN = Path(sys.executable).parent
SEED = (Path(__file__).resolve().parents[1] / "examples" / "policy.yaml").read_text()


def ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered) * 1e3, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 2)}


def on_disk(path: Path, pem: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


class Server:
    """A real controller on loopback and one enrolled device."""

    def __init__(self, work: Path, extra: Callable[[Path], None] | None = None) -> None:
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        self.data = work / "ctl"
        subprocess.run([str(BIN / "mesh-controller"), "init", "--domain", "acme.mesh", "--data", str(self.data),
                        "--url", self.url], check=True, capture_output=True)
        if extra:
            extra(self.data)
        self.proc = subprocess.Popen([str(BIN / "mesh-controller"), "serve", "--data", str(self.data), "--listen",
                                      f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(port)
        env = {**os.environ, "IDMESH_ADMIN": str(self.data / "admin.conf")}
        token = subprocess.run([str(BIN / "meshctl"), "token", "create", "--owner", "nikita@acme.com"], env=env,
                               check=True, capture_output=True, text=True).stdout.strip()
        state = work / "laptop"
        subprocess.run([str(BIN / "meshd"), "enroll", token, "--name", "laptop", "--state", str(state)], check=True,
                       capture_output=True)
        self.device = httpx.Client(base_url=self.url, trust_env=False, timeout=30, verify=client_ssl_context(
            (state / "ca.crt").read_text(), cert_file=state / "node.crt", key_file=state / "node.key"))
        admin = AdminCredential.load(self.data / "admin.conf")
        self.admin = httpx.Client(base_url=self.url, trust_env=False, timeout=30,
                                  verify=client_ssl_context(admin.ca, admin.certificate, admin.key))

    def start(self) -> dict[str, object]:
        body = LoginStart(csr=build_csr(ed25519.Ed25519PrivateKey.generate())).model_dump()
        return dict(self.device.post("/v1/login", json=body).json())

    def close(self) -> None:
        self.device.close()
        self.admin.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def approval_logins(work: Path, n: int) -> dict[str, float]:
    server = Server(work)
    took = []
    try:
        with ThreadPoolExecutor(1) as pool:
            for _ in range(n):
                login = server.start()
                waiting = pool.submit(server.device.post, f"/v1/login/{login['id']}")
                time.sleep(0.05)  # the poll is waiting at the controller before the approval comes
                t0 = time.perf_counter()
                server.admin.post("/v1/login/approve", json=LoginApprove(
                    code=str(login["user_code"]), principal="nikita@acme.com").model_dump()).raise_for_status()
                done = waiting.result(10).json()
                on_disk(work / "principal.crt", done["certificate"])
                took.append(time.perf_counter() - t0)
    finally:
        server.close()
    return ms(took)


def provider_logins(work: Path, n: int) -> dict[str, float] | str:
    from tests.oidc import missing_prerequisites, start_oidc_provider

    missing = missing_prerequisites()
    if missing:
        return "skipped: " + "; ".join(missing)
    with start_oidc_provider(work / "oidc") as provider:
        secret = work / "secret"
        secret.write_text(provider.client_secret)

        def configure(data: Path) -> None:
            subprocess.run([str(BIN / "mesh-controller"), "oidc", "set", "--data", str(data), "--issuer",
                            provider.issuer, "--client-id", provider.client_id, "--client-secret-file", str(secret),
                            "--ca-file", str(provider.ca_file)], check=True, capture_output=True)

        server = Server(work / "rp", configure)
        took = []
        try:
            for _ in range(n):
                login = server.start()
                provider.approve(str(login["verification_uri_complete"]))
                t0 = time.perf_counter()
                done = server.device.post(f"/v1/login/{login['id']}").json()
                if done.get("status") != "done":
                    raise SystemExit(f"login not done: {done}")
                on_disk(work / "principal.crt", done["certificate"])
                took.append(time.perf_counter() - t0)
        finally:
            server.close()
    return ms(took)


def grant_check(work: Path, births: int) -> dict[str, object]:
    now = datetime.now(UTC)
    init_data_dir(work / "data", "acme.mesh", "https://127.0.0.1:8443", now)
    ctx = Context.open(work / "data")
    policies.apply_policy(ctx, "bench", PolicyApply(text=SEED), now)
    token = create_token(ctx, "bench", TokenCreateRequest(tags=["agents"], reusable=True), now).token
    node = enroll(ctx, token, "agents-1", now)
    laptop = enroll(ctx, token, "laptop", now)
    key = ed25519.Ed25519PrivateKey.generate()
    started = asyncio.run(logins.start_login(ctx, laptop, LoginStart(csr=build_csr(key)), now))
    admin_cert = load_certificate(json.loads((work / "data" / "admin.conf").read_text())["certificate"])
    approver = auth.authenticate(ctx, admin_cert.public_bytes(serialization.Encoding.DER), now)
    logins.approve_login(ctx, approver, LoginApprove(code=started.user_code, principal="nikita@acme.com"), "bench", now)
    with ctx.store.transaction() as tx:
        pem = tx.login(started.id).certificate  # type: ignore[union-attr]
    assert pem is not None
    cert = load_certificate(pem)
    principal = auth.authenticate(ctx, cert.public_bytes(serialization.Encoding.DER), now)
    line = sign_grant(key, cert, "nikita@acme.com", "acme.mesh", "agents-1", ["db:write"], timedelta(hours=1), now)
    grants.register_grant(ctx, principal, GrantRegister(grant=line), now)
    csrs = [build_csr(ed25519.Ed25519PrivateKey.generate()) for _ in range(2 * births)]
    plain: list[float] = []
    granted: list[float] = []
    v4, v6 = ctx.settings.prefixes.block(0).agent_address(5)
    for i in range(2 * births):
        with_grant = i % 2 == 1
        req = AgentIssueRequest(csr=csrs[i], name="bench", principal="nikita@acme.com",
                                scopes=["db:write" if with_grant else "db:read"], ttl_seconds=600,
                                ipv4=str(v4), ipv6=str(v6), grant=line if with_grant else None)
        t0 = time.perf_counter()
        issued = agents.issue_agent(ctx, node, req, now)
        (granted if with_grant else plain).append(time.perf_counter() - t0)
        agents.end_agent(ctx, node, issued.agent.id, now)  # frees the address for the next birth
    ctx.store.close()
    a, b = ms(plain), ms(granted)
    return {"without_grant": a, "with_grant": b, "grant_adds_p50_ms": round(b["p50_ms"] - a["p50_ms"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logins", type=int, default=30)
    parser.add_argument("--births", type=int, default=400)
    args = parser.parse_args()
    print(f"$ {command_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="idmesh-bench-principals-") as tmp:
        work = Path(tmp)
        (work / "a").mkdir()
        (work / "o").mkdir()
        (work / "g").mkdir()
        figures = {
            "login_approval_to_certificate_on_disk": approval_logins(work / "a", args.logins),
            "login_provider_approved_to_certificate_on_disk": provider_logins(work / "o", args.logins),
            "agent_birth_at_the_controller": grant_check(work / "g", args.births),
            "cores": os.cpu_count(),
        }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
