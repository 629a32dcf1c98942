"""Starting and driving the test OpenID provider (``provider.mjs``, panva's oidc-provider on Node.js).

:func:`start_oidc_provider` makes a throwaway CA and server certificate, writes the provider's settings
(clients, people, device-flow timing) to a JSON file, starts ``node provider.mjs`` on 127.0.0.1, waits for
its ``ready <issuer>`` line and yields an :class:`OidcProvider`; on exit it kills the process by PID.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.oidc.person import ApprovalError, Decision, Outcome, play
from tests.oidc.tls import make_loopback_pki

__all__ = [
    "DEVICE_CODE_GRANT", "HERE", "PEOPLE", "Account", "Client", "OidcProvider", "ProviderSettings",
    "default_settings", "missing_prerequisites", "start_oidc_provider",
]

HERE = Path(__file__).resolve().parent
PROVIDER_JS = HERE / "provider.mjs"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_ADMIN_ROTATE_PATH = "/-/admin/rotate-keys"
_MIN_NODE_MAJOR = 20


@dataclass(frozen=True)
class Account:
    """A person the provider knows. ``login`` is what they type in the sign-in form; it is also ``sub``."""
    login: str
    email_verified: bool


PEOPLE = (
    Account("nikita@acme.com", email_verified=True),
    Account("li@acme.com", email_verified=True),
    Account("mallory@acme.com", email_verified=False),
)


@dataclass(frozen=True)
class Client:
    """A registered OAuth client allowed only the device grant. No secret: a public client (auth ``none``).
    ``device_code_ttl`` / ``interval`` override the provider-wide device-flow timing for this client."""
    client_id: str
    client_secret: str | None = None
    device_code_ttl: int | None = None
    interval: int | None = None

    @property
    def auth(self) -> httpx.Auth:
        """How the client authenticates at the token and device authorization endpoints: HTTP Basic
        (client_secret_basic) for a confidential client; nothing for a public one (it sends client_id)."""
        if self.client_secret is None:
            return httpx.Auth()
        return httpx.BasicAuth(self.client_id, self.client_secret)

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "client_id": self.client_id,
            "grant_types": [DEVICE_CODE_GRANT],
            "response_types": [],
            "redirect_uris": [],
        }
        if self.client_secret is None:
            out["token_endpoint_auth_method"] = "none"
        else:
            out["client_secret"] = self.client_secret
            out["token_endpoint_auth_method"] = "client_secret_basic"
        return out


@dataclass(frozen=True)
class ProviderSettings:
    """What the provider is started with. ``interval`` is sent in every device authorization response;
    with ``slow_down`` a poll sooner than the interval after the previous one (same device code, still
    pending) gets ``slow_down`` and raises that code's interval by ``slow_down_increment`` (RFC 8628 §3.5)."""
    clients: tuple[Client, ...]
    accounts: tuple[Account, ...] = PEOPLE
    device_code_ttl: int = 600
    interval: int = 1
    slow_down: bool = True
    slow_down_increment: int = 5

    def client(self, client_id: str) -> Client:
        for c in self.clients:
            if c.client_id == client_id:
                return c
        raise KeyError(client_id)

    def harness_json(self, admin_token: str) -> dict[str, Any]:
        per_client = {c.client_id: {k: v for k, v in (("ttl", c.device_code_ttl), ("interval", c.interval))
                                    if v is not None}
                      for c in self.clients}
        return {
            "clients": [c.metadata() for c in self.clients],
            "accounts": {a.login: {"email": a.login, "email_verified": a.email_verified} for a in self.accounts},
            "deviceFlow": {"ttl": self.device_code_ttl, "interval": self.interval, "slowDown": self.slow_down,
                           "slowDownIncrement": self.slow_down_increment,
                           "perClient": {k: v for k, v in per_client.items() if v}},
            "adminToken": admin_token,
        }


def default_settings() -> ProviderSettings:
    """The session provider's: ``idmesh`` (confidential, client_secret_basic), ``idmesh-cli`` (public) and
    ``idmesh-brief`` (confidential, device codes live 2 s: for ``expired_token``)."""
    return ProviderSettings(clients=(
        Client("idmesh", client_secret=secrets.token_urlsafe(24)),
        Client("idmesh-cli"),
        Client("idmesh-brief", client_secret=secrets.token_urlsafe(24), device_code_ttl=2),
    ))


def _node_major(node: str) -> int | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"v(\d+)\.", out.strip())
    return int(match.group(1)) if match else None


def missing_prerequisites() -> list[str]:
    """What the provider needs from the machine and does not find (empty: all there)."""
    missing = []
    node = shutil.which("node")
    if node is None:
        missing.append("node (Node.js) is not on PATH")
    elif (major := _node_major(node)) is None or major < _MIN_NODE_MAJOR:
        missing.append(f"node is too old or broken (need Node.js {_MIN_NODE_MAJOR}+, found major {major})")
    if shutil.which("npm") is None:
        missing.append("npm is not on PATH")
    if not (HERE / "node_modules" / "oidc-provider" / "package.json").is_file():
        missing.append("tests/oidc/node_modules has no oidc-provider: run `npm ci --prefix tests/oidc` (make deps)")
    return missing


@dataclass
class OidcProvider:
    """A running oidc-provider. Everything a relying party needs (issuer, CA file, clients) and what the
    test needs to play the person (:meth:`approve`, :meth:`deny`) and the operator (:meth:`rotate_keys`)."""
    issuer: str
    ca_file: Path
    settings: ProviderSettings
    pid: int
    log_file: Path
    startup_seconds: float
    _admin_token: str = field(repr=False)
    _ssl: ssl.SSLContext = field(repr=False)

    @property
    def confidential(self) -> Client:
        return self.settings.client("idmesh")

    @property
    def public(self) -> Client:
        return self.settings.client("idmesh-cli")

    @property
    def brief(self) -> Client:
        return self.settings.client("idmesh-brief")

    @property
    def client_id(self) -> str:
        return self.confidential.client_id

    @property
    def client_secret(self) -> str:
        assert self.confidential.client_secret is not None
        return self.confidential.client_secret

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context trusting only this session's CA."""
        return self._ssl

    def http(self, **kwargs: Any) -> httpx.Client:
        """An httpx client trusting the provider's CA (the caller closes it)."""
        return httpx.Client(verify=self._ssl, timeout=15.0, **kwargs)

    def approve(self, verification: str, login: str = "nikita@acme.com", consent: bool = True) -> None:
        """As the person ``login``: open ``verification`` (a ``verification_uri_complete``, or a bare
        ``user_code``), confirm it, sign in and consent. With ``consent=False`` the person signs in and
        then cancels at the consent page: the device gets ``access_denied``. Raises
        :class:`~tests.oidc.person.ApprovalError` if the pages do not end as asked, ``ValueError`` for a
        ``login`` that is not one of ``settings.accounts`` (oidc-provider's development form takes any
        login, and an account its ``findAccount`` does not know ends in ``server_error`` for the device)."""
        known = [a.login for a in self.settings.accounts]
        if login not in known:
            raise ValueError(f"{login!r} is not a person this provider knows ({', '.join(known)})")
        decision = Decision.APPROVE if consent else Decision.CANCEL_AT_CONSENT
        expected = Outcome.APPROVED if consent else Outcome.DENIED
        outcome = play(verification, issuer=self.issuer, ca=self._ssl, login=login, decision=decision)
        if outcome is not expected:
            raise ApprovalError(f"{login} {decision.value} {verification!r}: ended {outcome.value}")

    def deny(self, verification: str) -> None:
        """The person refuses at once: "[ Abort ]" on the device confirmation page (no sign-in). The
        device's next poll gets ``access_denied``."""
        outcome = play(verification, issuer=self.issuer, ca=self._ssl, login="", decision=Decision.ABORT_AT_CONFIRM)
        if outcome is not Outcome.DENIED:
            raise ApprovalError(f"abort {verification!r}: ended {outcome.value}")

    def rotate_keys(self, *, retire_old: bool = False) -> str:
        """Make the provider sign with a fresh RSA key from now on and return its ``kid``. The JWKS lists
        the new key first; old keys stay published unless ``retire_old``. Sessions, device codes and
        grants survive (same process, same storage)."""
        with self.http() as client:
            response = client.post(f"{self.issuer}{_ADMIN_ROTATE_PATH}", json={"retire": retire_old},
                                   headers={"authorization": f"Bearer {self._admin_token}"})
        response.raise_for_status()
        kid = response.json()["kid"]
        assert isinstance(kid, str)
        return kid

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def _wait_ready(proc: subprocess.Popen[bytes], log_file: Path, timeout: float) -> str:
    """The issuer from the provider's ``ready <issuer>`` line; fails with its log if it exits or is silent."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"oidc provider not ready in {timeout:.0f} s; log:\n{log_file.read_text()}")
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    proc.wait(5)
                    raise AssertionError(f"oidc provider exited ({proc.returncode}) before ready; log:\n"
                                         f"{log_file.read_text()}")
                buffer += chunk
    line = buffer.split(b"\n", 1)[0].decode()
    if not line.startswith("ready https://"):
        raise AssertionError(f"oidc provider said {line!r} instead of 'ready <issuer>'")
    return line.removeprefix("ready ").strip()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


@contextmanager
def start_oidc_provider(workdir: Path, settings: ProviderSettings | None = None, *, port: int = 0,
                        ready_timeout: float = 30.0, host: str = "127.0.0.1",
                        prefix: Sequence[str] = ()) -> Iterator[OidcProvider]:
    """Run oidc-provider on ``host`` (``port`` 0: any free port) for the ``with`` block. ``workdir`` gets
    the PKI, the settings file and ``provider.log`` (the Node process's stderr). ``prefix`` runs it through
    another command, e.g. ``ip netns exec NS`` for a provider inside a test's network namespace (its
    certificate is then for ``host``; a person must then play from inside that namespace too)."""
    settings = settings or default_settings()
    workdir.mkdir(parents=True, exist_ok=True)
    pki = make_loopback_pki(workdir / "tls", host=host)
    admin_token = secrets.token_urlsafe(24)
    config = workdir / "harness.json"
    config.touch(mode=0o600)
    config.write_text(json.dumps(settings.harness_json(admin_token), indent=2))
    log_file = workdir / "provider.log"
    node = shutil.which("node") or "node"
    started = time.monotonic()
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [*prefix, node, str(PROVIDER_JS), "--config", str(config), "--cert", str(pki.cert_file),
             "--key", str(pki.key_file), "--port", str(port), "--host", host, "--exit-on-stdin-close"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=HERE,
        )
    try:
        issuer = _wait_ready(proc, log_file, ready_timeout)
        provider = OidcProvider(
            issuer=issuer, ca_file=pki.ca_file, settings=settings, pid=proc.pid, log_file=log_file,
            startup_seconds=time.monotonic() - started, _admin_token=admin_token,
            _ssl=ssl.create_default_context(cafile=str(pki.ca_file)),
        )
        yield provider
    finally:
        _stop(proc)
