"""The inventory: which hosts, how to reach them, what each becomes in the mesh.

::

    defaults:                      # any host setting; a host's own value wins
      user: root
      key_file: ~/.ssh/id_ed25519
      tags: [web]
    hosts:
      web-1:                       # the node name (override with node_name)
        address: 10.0.0.5
      laptop-7:
        address: laptop-7.lan
        owner: nikita@acme.com
        password_env: LAPTOP7_PASSWORD

Every problem is reported as ``file:line:col: path: message`` (the policy
loader's source map is reused), all of them at once; nothing is deployed
from an inventory with a problem.

Settings (all optional in ``defaults``; ``address`` required per host):

``address``, ``port`` (22), ``user`` (root; another user needs passwordless
sudo, ``sudo`` defaults to true for it), ``password`` or ``password_env`` or
``key_file`` (+ ``passphrase_env``), ``known_hosts`` (a file, default
~/.ssh/known_hosts; ``ignore`` turns host key checking off), ``tags`` or
``owner`` (exactly one), ``node_name``, ``interface`` (idmesh0),
``service`` (``systemd``: install and start meshd.service; ``process``:
start ``meshd run`` detached with setsid, a pidfile and a log file, for hosts
without systemd such as containers or the test suite's namespaces),
``install_dir`` (/opt/idmesh, a virtual environment), ``state``
(/var/lib/meshd), ``socket`` (/run/meshd/meshd.sock), ``pidfile`` and
``log`` (process mode; default ``<state>/meshd.pid`` and ``<state>/meshd.log``),
``python`` (python3 on the host), ``connect_timeout`` (seconds, 10).
Relative local paths (``key_file``, ``known_hosts``) are relative to the
inventory file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from meshcore.errors import InvalidInput, NotFound, PolicyError
from meshcore.names import ifname_problem
from meshcore.problems import Problem
from meshcore.yamlsource import parse_yaml, validation_problems

__all__ = ["HostSpec", "Inventory", "ServiceMode", "load_inventory", "parse_inventory"]

ServiceMode = Literal["systemd", "process"]

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_PRINCIPAL = re.compile(r"^[^\s@]+@[^\s@]+\Z")
_ENV = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _node_name(value: str) -> str:
    if not _LABEL.match(value):
        raise ValueError(f"{value!r} is not a node name: use a DNS label (a-z, 0-9, '-', at most 63 characters)")
    return value


def _tag(value: str) -> str:
    if not _LABEL.match(value.removeprefix("tag:")):
        raise ValueError(f"{value!r} is not a tag: use a DNS label (a-z, 0-9, '-'), optionally written tag:NAME")
    return value.removeprefix("tag:")


def _principal(value: str) -> str:
    if not _PRINCIPAL.match(value):
        raise ValueError(f"{value!r} is not a principal: use name@domain, e.g. nikita@acme.com")
    return value


NodeName = Annotated[str, AfterValidator(_node_name)]
Tag = Annotated[str, AfterValidator(_tag)]
Principal = Annotated[str, AfterValidator(_principal)]


class HostEntry(BaseModel):
    """One host's settings as written (or ``defaults``); ``None`` means "not set here"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = Field(default=None, min_length=1)
    password: str | None = None
    password_env: str | None = Field(default=None, pattern=_ENV)
    key_file: str | None = Field(default=None, min_length=1)
    passphrase_env: str | None = Field(default=None, pattern=_ENV)
    known_hosts: str | None = Field(default=None, min_length=1)
    sudo: bool | None = None
    tags: tuple[Tag, ...] | None = None
    owner: Principal | None = None
    node_name: NodeName | None = None
    interface: str | None = None
    service: ServiceMode | None = None
    install_dir: str | None = None
    state: str | None = None
    socket: str | None = None
    pidfile: str | None = None
    log: str | None = None
    python: str | None = Field(default=None, min_length=1)
    connect_timeout: float | None = Field(default=None, gt=0, le=600)


class InventoryFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: HostEntry = HostEntry()
    hosts: dict[NodeName, HostEntry] = Field(min_length=1)


@dataclass(frozen=True)
class HostSpec:
    """One host with every setting resolved: what the runner works from."""

    name: str
    """The inventory key, used in reports."""
    node_name: str
    address: str
    port: int
    user: str
    password: str | None
    key_file: Path | None
    passphrase: str | None
    known_hosts: Path | None
    """None: asyncssh's default (~/.ssh/known_hosts)."""
    check_host_key: bool
    sudo: bool
    tags: tuple[str, ...]
    owner: str | None
    interface: str
    service: ServiceMode
    install_dir: str
    state: str
    socket: str
    pidfile: str
    log: str
    python: str
    connect_timeout: float

    @property
    def target(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


@dataclass(frozen=True)
class Inventory:
    path: str
    hosts: tuple[HostSpec, ...]

    def select(self, names: list[str] | None) -> tuple[HostSpec, ...]:
        if not names:
            return self.hosts
        unknown = sorted(set(names) - {h.name for h in self.hosts})
        if unknown:
            raise InvalidInput(f"{self.path}: no host named {', '.join(unknown)} "
                               f"(hosts: {', '.join(h.name for h in self.hosts)})")
        return tuple(h for h in self.hosts if h.name in names)


_DEFAULTS: dict[str, Any] = {
    "port": 22, "user": "root", "interface": "idmesh0", "service": "systemd", "install_dir": "/opt/idmesh",
    "state": "/var/lib/meshd", "socket": "/run/meshd/meshd.sock", "python": "python3", "connect_timeout": 10.0,
}


def load_inventory(path: Path, environ: Mapping[str, str] | None = None) -> Inventory:
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise NotFound(f"no inventory at {path}") from exc
    except OSError as exc:
        raise InvalidInput(f"cannot read the inventory {path}: {exc.strerror or exc}") from exc
    return parse_inventory(text, str(path), base=path.parent, environ=environ)


def parse_inventory(text: str, filename: str = "hosts.yaml", *, base: Path = Path("."),
                    environ: Mapping[str, str] | None = None) -> Inventory:
    """Parse and check the whole file; raise :class:`InvalidInput` listing every problem with its location."""
    environ = os.environ if environ is None else environ
    try:
        data, source = parse_yaml(text, filename)
    except PolicyError as exc:  # the YAML reader is shared with policies; its lines already say file:line:col
        raise InvalidInput("\n".join(exc.problems)) from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{filename}:1:1: an inventory is a mapping: hosts: (and optionally defaults:)")
    try:
        raw = InventoryFile.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput("\n".join(source.lines(validation_problems(exc, InventoryFile)))) from None
    problems: list[Problem] = []
    hosts = [_resolve(name, raw.defaults, entry, base, environ, problems) for name, entry in raw.hosts.items()]
    _check_unique(hosts, problems)
    if problems:
        raise InvalidInput("\n".join(source.lines(problems)))
    return Inventory(filename, tuple(h for h in hosts if h is not None))


def _resolve(name: str, defaults: HostEntry, entry: HostEntry, base: Path, environ: Mapping[str, str],
             problems: list[Problem]) -> HostSpec | None:
    at = ("hosts", name)
    given = {k: v for k, v in entry.model_dump().items() if v is not None}
    inherited = {k: v for k, v in defaults.model_dump().items() if v is not None}
    merged: dict[str, Any] = {**_DEFAULTS, **inherited, **given}

    def where(key: str) -> tuple[str | int, ...]:
        if key in given:
            return at + (key,)
        if key in inherited:
            return ("defaults", key)
        return at

    before = len(problems)
    if "address" not in merged:
        problems.append(Problem(at, "missing required key 'address'"))

    secrets = [k for k in ("password", "password_env", "key_file") if k in given]
    if len(secrets) > 1:
        problems.append(Problem(at, f"give one of password, password_env, key_file (not {' and '.join(secrets)})"))
    elif secrets:  # the host's own choice replaces whatever the defaults said
        for other in {"password", "password_env", "key_file"} - set(secrets):
            merged.pop(other, None)
    elif len([k for k in ("password", "password_env", "key_file") if k in inherited]) > 1:
        problems.append(Problem(("defaults",), "give one of password, password_env, key_file"))
    password = merged.get("password")
    if "password_env" in merged:
        password = environ.get(merged["password_env"])
        if password is None:
            problems.append(Problem(where("password_env"), f"environment variable {merged['password_env']} is not set"))
    passphrase = None
    if "passphrase_env" in merged:
        passphrase = environ.get(merged["passphrase_env"])
        if passphrase is None:
            problems.append(Problem(where("passphrase_env"),
                                    f"environment variable {merged['passphrase_env']} is not set"))

    if "tags" in given or "owner" in given:  # the host's own identity replaces the defaults' one
        for key in {"tags", "owner"} - set(given):
            merged.pop(key, None)
    tags = tuple(merged.get("tags", ()))
    owner = merged.get("owner")
    if tags and owner:
        problems.append(Problem(at, "a node is either tagged or owned by a person: give tags or owner, not both"))
    elif not tags and not owner:
        problems.append(Problem(at, "say what the node is: tags: [..] or owner: someone@example.com"))

    if (problem := ifname_problem(merged["interface"])) is not None:
        problems.append(Problem(where("interface"), problem))
    for key in ("install_dir", "state", "socket", "pidfile", "log"):
        if key in merged and not PurePosixPath(merged[key]).is_absolute():
            problems.append(Problem(where(key), f"{key} must be an absolute path on the host, got {merged[key]!r}"))

    key_file = _local(merged.get("key_file"), base)
    if key_file is not None and not key_file.is_file():
        problems.append(Problem(where("key_file"), f"no key file at {key_file}"))
    check_host_key = merged.get("known_hosts") != "ignore"
    known_hosts = _local(merged.get("known_hosts"), base) if check_host_key else None
    if known_hosts is not None and not known_hosts.is_file():
        problems.append(Problem(where("known_hosts"), f"no known_hosts file at {known_hosts}"))
    if len(problems) > before:
        return None

    user = merged["user"]
    state = merged["state"]
    return HostSpec(
        name=name, node_name=merged.get("node_name", name), address=merged["address"], port=merged["port"],
        user=user, password=password, key_file=key_file, passphrase=passphrase, known_hosts=known_hosts,
        check_host_key=check_host_key, sudo=merged.get("sudo", user != "root"), tags=tags, owner=owner,
        interface=merged["interface"], service=merged["service"], install_dir=merged["install_dir"], state=state,
        socket=merged["socket"], pidfile=merged.get("pidfile", f"{state.rstrip('/')}/meshd.pid"),
        log=merged.get("log", f"{state.rstrip('/')}/meshd.log"), python=merged["python"],
        connect_timeout=float(merged["connect_timeout"]),
    )


def _local(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _check_unique(hosts: list[HostSpec | None], problems: list[Problem]) -> None:
    seen_nodes: dict[str, str] = {}
    seen_places: dict[tuple[str, int, str], str] = {}
    for host in hosts:
        if host is None:
            continue
        at = ("hosts", host.name)
        other = seen_nodes.setdefault(host.node_name, host.name)
        if other != host.name:
            problems.append(Problem(at, f"node name {host.node_name!r} is also the node name of host {other!r}"))
        place = (host.address, host.port, host.state)
        other = seen_places.setdefault(place, host.name)
        if other != host.name:
            problems.append(Problem(at, f"same address, port and state directory as host {other!r}: "
                                    "both would be the same node"))
