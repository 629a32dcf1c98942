"""A person's own state on a device: the principal certificate ``meshctl login`` got, and how to use it.

It lives in ``IDMESH_USER_STATE`` (default ``~/.config/idmesh``), a
directory of the user's own (0700)::

    principal.key   the Ed25519 key, made here by meshctl login (0600)
    principal.crt   the principal certificate: spiffe://<domain>/user/<domain>/<local>
    ca.crt          the mesh CA, as the node trusts it
    login.json      principal, controller URL(s), trust domain, device, expiry

With it meshctl speaks to the controller directly (mTLS with the principal
certificate) to register and revoke grants and to log out; nothing here
goes through meshd, and nothing a principal does needs root.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idmesh.paths import DEFAULT_USER_STATE
from meshcore.errors import InvalidInput, NotFound, PermissionDenied

if TYPE_CHECKING:
    from idmesh.client import ControllerClient

__all__ = ["Principal", "user_state"]


def user_state() -> Path:
    return Path(os.path.expanduser(os.environ.get("IDMESH_USER_STATE") or DEFAULT_USER_STATE))


def _write(path: Path, data: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Principal:
    """A logged-in person, as ``login.json`` and the files beside it say."""

    directory: Path
    principal: str
    controller: str
    domain: str
    device: str
    not_after: datetime
    controllers: tuple[str, ...] = ()
    """Every controller replica's URL, in the order to try (SPEC §8); empty (an older login): ``controller``."""

    @property
    def key_file(self) -> Path:
        return self.directory / "principal.key"

    @property
    def cert_file(self) -> Path:
        return self.directory / "principal.crt"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @classmethod
    def save(cls, directory: Path, key_pem: str, cert_pem: str, ca_pem: str, **fields: Any) -> Principal:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            me = cls(directory, **fields)
            _write(me.key_file, key_pem, 0o600)
            _write(me.cert_file, cert_pem, 0o644)
            _write(me.ca_file, ca_pem, 0o644)
            _write(directory / "login.json", json.dumps({**fields, "not_after": me.not_after.isoformat()}, indent=2)
                   + "\n", 0o644)
        except OSError as exc:
            raise PermissionDenied(f"cannot write the login to {directory}: {exc.strerror or exc}") from exc
        return me

    @classmethod
    def load(cls, directory: Path | None = None, *, valid: bool = True) -> Principal:
        """The login in ``directory`` (default :func:`user_state`); ``valid``: refuse an expired one."""
        directory = directory or user_state()
        try:
            doc = json.loads((directory / "login.json").read_text())
            listed = doc.get("controllers", [])
            if not isinstance(listed, list) or not all(isinstance(url, str) for url in listed):
                raise ValueError("controllers is not a list of URLs")
            me = cls(directory, doc["principal"], doc["controller"], doc["domain"], doc["device"],
                     datetime.fromisoformat(doc["not_after"]), tuple(listed))
        except FileNotFoundError as exc:
            raise NotFound(f"not logged in (no {directory / 'login.json'}): run meshctl login") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"{directory / 'login.json'} is damaged: run meshctl login again") from exc
        if valid and datetime.now(UTC) >= me.not_after:
            raise PermissionDenied(f"the login of {me.principal} expired at {me.not_after.isoformat(timespec='seconds')}:"
                                   " run meshctl login")
        return me

    def client(self) -> ControllerClient:
        """The controller's API with this principal certificate (mTLS)."""
        from idmesh.client import ControllerClient, client_ssl_context

        ctx = client_ssl_context(self.ca_file.read_text(), cert_file=self.cert_file, key_file=self.key_file)
        return ControllerClient(self.controllers or self.controller, ctx)

    def forget(self) -> None:
        for path in (self.key_file, self.cert_file, self.ca_file, self.directory / "login.json"):
            path.unlink(missing_ok=True)
