"""What this node serves (``meshctl serve``), kept in the state directory as ``serve.json``.

One entry per port: the upstream it forwards to, the service's name (the
assertion's audience, and RFC 9728's ``resource_name``). Written whole
(temporary file and rename) on every change, so a crash leaves the old list
or the new one; read at start, so serves outlive restarts.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from meshcore.errors import InvalidInput
from meshd.files import write_private

__all__ = ["MAX_SERVES", "ServeEntry", "ServeList", "check_upstream"]

MAX_SERVES = 64
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,62}[a-z0-9])?$")


class ServeEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int = Field(ge=1, le=65535)
    upstream: str
    name: str
    mcp: bool = False
    """The port serves MCP: the mesh's nodes report processes that are not agents connecting to it."""


_LIST: TypeAdapter[list[ServeEntry]] = TypeAdapter(list[ServeEntry])


def check_upstream(url: str) -> str:
    """``http://HOST:PORT`` (or https, an optional base path): where requests go, refused in one line if not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"--to {url!r}: expected an http:// URL like http://127.0.0.1:9000")
    try:
        parts.port  # noqa: B018 — raises on a port out of range
    except ValueError as exc:
        raise InvalidInput(f"--to {url!r}: {exc}") from exc
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidInput(f"--to {url!r}: no query, fragment or credentials in the upstream URL")
    return url.rstrip("/")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(f"--name {name!r}: use lower-case letters, digits, '.' and '-' (a DNS name)")
    return name


class ServeList:
    """The entries by port; :meth:`put` and :meth:`remove` write the file before they return."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[int, ServeEntry] = {}
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        try:
            self.entries = {e.port: e for e in _LIST.validate_json(text)}
        except ValidationError as exc:
            raise InvalidInput(f"{path} is damaged ({exc.error_count()} errors): fix it or remove it") from exc

    def put(self, entry: ServeEntry) -> None:
        if entry.port not in self.entries and len(self.entries) >= MAX_SERVES:
            raise InvalidInput(f"this node serves {MAX_SERVES} ports already: remove one first")
        self.entries[entry.port] = entry
        self._write()

    def remove(self, port: int) -> ServeEntry | None:
        entry = self.entries.pop(port, None)
        if entry is not None:
            self._write()
        return entry

    def _write(self) -> None:
        data = _LIST.dump_json(sorted(self.entries.values(), key=lambda e: e.port), indent=2).decode()
        write_private(self.path, data + "\n", 0o644)
