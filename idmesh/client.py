"""HTTPS client of the controller API, for ``meshctl`` and ``meshd``.

The server is trusted only through the mesh CA given (never the system
store), and it must name the host of the URL. A client certificate can come
from files (a node's ``node.crt``/``node.key``) or from memory (the admin
credential), loaded through a memfd so the key never touches the disk.
Transport and HTTP errors become :mod:`meshcore.errors` exceptions here.
Certificates (:mod:`meshcore.identity`, ``cryptography``) are loaded only by
what checks one, so ``meshctl agent run`` talking to meshd does not pay for them.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from idmesh.local import error_of_answer
from meshcore.errors import IdmeshError, InvalidInput, NotFound, PermissionDenied, Unavailable

__all__ = ["AdminCredential", "ControllerClient", "answer_error", "client_ssl_context", "fetch_ca"]

TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def answer_error(resp: httpx.Response, who: str) -> IdmeshError:
    """The error an answer of status >= 400 stands for (see :func:`idmesh.local.error_of_answer`)."""
    return error_of_answer(resp.status_code, resp.content, who)


def client_ssl_context(ca_pem: str, cert_pem: str | None = None, key_pem: str | None = None,
                       cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    elif cert_pem is not None and key_pem is not None:
        fd = os.memfd_create("idmesh-credential", os.MFD_CLOEXEC)
        try:
            os.write(fd, (cert_pem + key_pem).encode())
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    return ctx


@dataclass(frozen=True)
class AdminCredential:
    """``admin.conf``: the controller URL, its CA (pinned), a client cert and key."""

    url: str
    domain: str
    ca: str
    certificate: str
    key: str

    @classmethod
    def load(cls, path: Path) -> AdminCredential:
        from meshcore.identity import fingerprint, load_certificate

        try:
            doc = json.loads(path.read_text())
            cred = cls(doc["url"], doc["domain"], doc["ca"], doc["certificate"], doc["key"])
            pinned = doc["ca_fingerprint"]
        except FileNotFoundError as exc:
            raise NotFound(f"no admin credential at {path} (set --admin or IDMESH_ADMIN)") from exc
        except PermissionError as exc:
            raise PermissionDenied(f"cannot read the admin credential {path}: permission denied") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{path} is not an idmesh admin credential") from exc
        if fingerprint(load_certificate(cred.ca)) != pinned:
            raise InvalidInput(f"{path}: the CA certificate does not match its pinned fingerprint")
        return cred

    def client(self) -> ControllerClient:
        return ControllerClient(self.url, client_ssl_context(self.ca, self.certificate, self.key))


def fetch_ca(url: str, expected_fingerprint: str) -> str:
    """Bootstrap trust: fetch the CA unauthenticated, accept it only if it
    matches the fingerprint the token pinned (as kubeadm's discovery hash)."""
    from meshcore.identity import fingerprint, load_certificate

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ControllerClient(url, ctx) as c:
        pem = c.request("GET", "/v1/ca", raw=True)
    try:
        actual = fingerprint(load_certificate(pem))
    except IdmeshError as exc:
        raise Unavailable(f"{url} did not answer with a CA certificate: is it an idmesh controller?") from exc
    if actual != expected_fingerprint:
        raise PermissionDenied(
            f"the controller at {url} presents CA {actual[:16]}…, not the {expected_fingerprint[:16]}… "
            "this token pins: the token belongs to another mesh, or someone is in the middle"
        )
    return str(pem)


class ControllerClient:
    def __init__(self, url: str, ctx: ssl.SSLContext, timeout: httpx.Timeout = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, verify=ctx, timeout=timeout, trust_env=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        with self._translate():
            resp = self._http.request(method, path, json=body)
        if resp.status_code >= 400:
            raise answer_error(resp, "controller")
        return resp.text if raw else resp.json()

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise PermissionDenied(
                    f"the controller at {self.url} is not trusted: {getattr(cause, 'verify_message', exc)}"
                ) from exc
            raise Unavailable(f"cannot reach the controller at {self.url}: {_reason(exc)}") from exc
        except httpx.TimeoutException as exc:
            raise Unavailable(f"the controller at {self.url} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise Unavailable(f"talking to the controller at {self.url} failed: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)
