"""HTTPS client of the controller API, for ``meshctl`` and ``meshd``.

The server is trusted only through the mesh CA given (never the system
store), and it must name the host of the URL. A client certificate can come
from files (a node's ``node.crt``/``node.key``) or from memory (the admin
credential), loaded through a memfd so the key never touches the disk.
Transport and HTTP errors become :mod:`meshcore.errors` exceptions here.
With several controller replicas (SPEC §8) a request that could not even
connect to one goes to the next (:class:`ControllerClient`).
Certificates (:mod:`meshcore.identity`, ``cryptography``) are loaded only by
what checks one, so ``meshctl agent run`` talking to meshd does not pay for them.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from idmesh.local import error_of_answer
from meshcore.errors import IdmeshError, InvalidInput, NotFound, PermissionDenied, Unavailable, Unreachable
from meshcore.failover import controller_urls, tried_in_order

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
    """``admin.conf``: the controller URL, its CA (pinned), a client cert and key.

    With several controller replicas (SPEC §8) it also holds ``"urls"``,
    every replica in the order to try, ``"url"`` the first of them: a
    meshctl that predates the list still reads ``"url"``.
    """

    url: str
    domain: str
    ca: str
    certificate: str
    key: str
    urls: tuple[str, ...] = ()
    """Every controller URL, ``url`` first (given without it: just ``(url,)``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "urls", controller_urls((self.url, *self.urls)))

    @classmethod
    def load(cls, path: Path) -> AdminCredential:
        from meshcore.identity import fingerprint, load_certificate

        try:
            doc = json.loads(path.read_text())
            listed = doc.get("urls", [])
            if not isinstance(listed, list) or not all(isinstance(u, str) for u in listed):
                raise InvalidInput(f"{path}: \"urls\" is not a list of controller URLs")
            cred = cls(doc["url"], doc["domain"], doc["ca"], doc["certificate"], doc["key"], tuple(listed))
            pinned = doc["ca_fingerprint"]
        except FileNotFoundError as exc:
            raise NotFound(f"no admin credential at {path} (set --admin or IDMESH_ADMIN)") from exc
        except PermissionError as exc:
            raise PermissionDenied(f"cannot read the admin credential {path}: permission denied") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"{path} is not an idmesh admin credential") from exc
        if fingerprint(load_certificate(cred.ca)) != pinned:
            raise InvalidInput(f"{path}: the CA certificate does not match its pinned fingerprint")
        return cred

    def client(self) -> ControllerClient:
        return ControllerClient(self.urls, client_ssl_context(self.ca, self.certificate, self.key))


def fetch_ca(url: str | Sequence[str], expected_fingerprint: str) -> str:
    """Bootstrap trust: fetch the CA unauthenticated, accept it only if it
    matches the fingerprint the token pinned (as kubeadm's discovery hash).

    ``url``: one controller, or every replica in the order to try.
    """
    from meshcore.identity import fingerprint, load_certificate

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ControllerClient(url, ctx) as c:
        pem = c.request("GET", "/v1/ca", raw=True)
        answered = c.url
    try:
        actual = fingerprint(load_certificate(pem))
    except IdmeshError as exc:
        raise Unavailable(f"{answered} did not answer with a CA certificate: is it an idmesh controller?") from exc
    if actual != expected_fingerprint:
        raise PermissionDenied(
            f"the controller at {answered} presents CA {actual[:16]}…, not the {expected_fingerprint[:16]}… "
            "this token pins: the token belongs to another mesh, or someone is in the middle"
        )
    return str(pem)


class ControllerClient:
    """The controller's API at ``url``: one URL, or every replica's in the order to try (SPEC §8).

    A request goes to the replica that answered last (at first, the first
    listed) and moves on to the next only when no connection could be made
    to it: the request was never sent. One that got an answer, any status,
    or that may have reached the controller (an answer that timed out) is
    not sent again elsewhere, where a POST would be done twice.
    """

    def __init__(self, url: str | Sequence[str], ctx: ssl.SSLContext, timeout: httpx.Timeout = TIMEOUT) -> None:
        self.urls = controller_urls([url] if isinstance(url, str) else url)
        if not self.urls:
            raise InvalidInput("no controller URL to connect to")
        self.url = self.urls[0]
        """The replica that answered last, asked first."""
        self._ctx, self._timeout = ctx, timeout
        self._clients: dict[str, httpx.Client] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for http in self._clients.values():
            http.close()
        self._clients.clear()

    def _client_for(self, url: str) -> httpx.Client:
        if url not in self._clients:
            self._clients[url] = httpx.Client(base_url=url, verify=self._ctx, timeout=self._timeout, trust_env=False)
        return self._clients[url]

    @property
    def _http(self) -> httpx.Client:
        """The HTTP client of the replica asked first (tests send what :meth:`request` would not)."""
        return self._client_for(self.url)

    def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        refused: list[IdmeshError] = []
        for url in tried_in_order(self.urls, self.url):
            try:
                resp = self._client_for(url).request(method, path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # not connected: nothing was sent
                refused.append(_error(url, exc))
                continue
            except httpx.HTTPError as exc:
                raise _error(url, exc) from exc
            self.url = url
            break
        else:
            raise _none_reachable(refused)
        if resp.status_code >= 400:
            raise answer_error(resp, "controller")
        return resp.text if raw else resp.json()


def _error(url: str, exc: httpx.HTTPError) -> IdmeshError:
    """What a transport error of the request to ``url`` means, as the one line a user reads."""
    if isinstance(exc, httpx.ConnectError):
        cause = exc.__cause__ or exc
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            error: IdmeshError = PermissionDenied(
                f"the controller at {url} is not trusted: {getattr(cause, 'verify_message', exc)}")
        else:
            error = Unreachable(f"cannot reach the controller at {url}: {_reason(exc)}")
    elif isinstance(exc, httpx.ConnectTimeout):
        error = Unreachable(f"the controller at {url} did not answer in time")
    elif isinstance(exc, httpx.TimeoutException):
        error = Unavailable(f"the controller at {url} did not answer in time")
    else:
        error = Unavailable(f"talking to the controller at {url} failed: {_reason(exc)}")
    error.__cause__ = exc
    return error


def _none_reachable(refused: list[IdmeshError]) -> IdmeshError:
    """One replica: its own error, as it always was; several: each one's, in one line."""
    if len(refused) == 1:
        return refused[0]
    kind = PermissionDenied if all(isinstance(e, PermissionDenied) for e in refused) else Unreachable
    error = kind(f"no controller replica can be reached: {'; '.join(str(e) for e in refused)}")
    error.__cause__ = refused[-1]
    return error


def _reason(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)
