"""Where a command's answers come from: the controller, as its administrator
(the admin credential, ``--admin`` on the top-level parser), or this node's
meshd over its Unix socket (``--socket``). The clients are imported when a
command connects, not when the parser is built; meshd's is the standard
library's (:mod:`idmesh.local`), so the commands that only ask meshd never
load httpx."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlencode

from idmesh.cli import path_option
from idmesh.paths import DEFAULT_SOCKET

if TYPE_CHECKING:
    from pydantic import BaseModel

    from idmesh.client import ControllerClient
    from idmesh.local import LocalClient

__all__ = ["controller", "get_all", "meshd", "socket_option"]

Model = TypeVar("Model", bound="BaseModel")


def socket_option(p: argparse.ArgumentParser, *, described: bool = True) -> None:
    """``--socket``, meshd's local API (env ``IDMESH_SOCKET``). ``agent list`` and ``whois`` have always
    listed it without a description (``described=False``)."""
    path_option(p, "--socket", "IDMESH_SOCKET", DEFAULT_SOCKET,
                help="meshd's local API socket (env IDMESH_SOCKET; default %(default)s)" if described else None)


def controller(args: argparse.Namespace) -> ControllerClient:
    """The controller's API with the admin credential ``args.admin``; a context manager that closes it."""
    from idmesh.client import AdminCredential

    return AdminCredential.load(args.admin).client()


def get_all(api: ControllerClient, path: str, model: type[Model], **query: str | None) -> list[Model]:
    """``GET path`` with the ``query`` parameters that are not None or empty: a list, each item validated
    as ``model`` (one of :mod:`meshcore.wire`'s)."""
    params = {k: v for k, v in query.items() if v}
    return [model.model_validate(item) for item in api.request("GET", f"{path}?{urlencode(params)}" if params else path)]


def meshd(args: argparse.Namespace) -> LocalClient:
    """This node's meshd at ``args.socket``."""
    from idmesh.local import LocalClient

    return LocalClient(args.socket)
