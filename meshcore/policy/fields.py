"""The words of a policy file: names, ports, protocols, destinations, prefixes.

Each ``parse_*``/``check_*`` function takes what YAML produced and returns a
typed value or raises :class:`ValueError` whose message completes the line
``file:line:col: path: <message>`` — pydantic carries it to the location of
the value, so these messages name the value and say what would be right.
(ValueError even for a wrong type: it is what pydantic turns into a located
error; a TypeError would escape validation.)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, NamedTuple, get_args

from ..durations import parse_duration
from ..errors import InvalidInput
from ..names import PRINCIPAL_PATTERN, normal_principal
from ..scopes import Scope, parse_scope

__all__ = [
    "ALL_PORTS",
    "AUTHORIZATIONS",
    "PROTOCOLS",
    "Authorized",
    "Destination",
    "NodeSpec",
    "PortRange",
    "Prefix",
    "Protocol",
    "check_agent_name",
    "check_authorized",
    "check_label",
    "check_method",
    "check_path",
    "check_path_glob",
    "check_principal",
    "check_tool_name",
    "merge_ports",
    "parse_destination",
    "parse_duration_value",
    "parse_node_spec",
    "parse_port_range",
    "parse_prefix",
    "parse_protocols",
    "parse_scope_value",
]

Protocol = Literal["tcp", "udp", "icmp"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)

Authorized = Literal["grant", "delegation"]
"""How an agent came to exist: ``grant`` — its principal's own signed grant, verified by the
controller; ``delegation`` — a delegation, on its node's word alone."""
AUTHORIZATIONS: tuple[Authorized, ...] = get_args(Authorized)

# The same shapes the controller accepts (meshcore.wire, meshcore.identity):
# a name in the policy must be one a node, tag or agent can actually carry.
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PRINCIPAL = re.compile(PRINCIPAL_PATTERN)
_AGENT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_PORT = re.compile(r"^[0-9]{1,5}$")


class PortRange(NamedTuple):
    """An inclusive port range; ``*`` is :data:`ALL_PORTS` (0-65535)."""

    lo: int
    hi: int

    @property
    def is_all(self) -> bool:
        return self.lo == 0 and self.hi == 65535

    def __str__(self) -> str:
        if self.is_all:
            return "*"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


ALL_PORTS = PortRange(0, 65535)


def merge_ports(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Sorted, with overlapping and adjacent ranges joined: one canonical form."""
    out: list[PortRange] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1].hi + 1:
            if hi > out[-1].hi:
                out[-1] = PortRange(out[-1].lo, hi)
        else:
            out.append(PortRange(lo, hi))
    return tuple(out)


def _port(text: str, whole: object) -> int:
    if not _PORT.match(text):
        raise ValueError(f"invalid port {whole!r}: use a number, a range like 8000-8100, or '*'")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return port


def parse_port_range(value: object) -> PortRange:
    """``5432``, ``"5432"``, ``"8000-8100"`` or ``"*"``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"invalid port {value!r}: use a number, a range like 8000-8100, or '*'")  # noqa: TRY004
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError(f"port {value} is out of range 1-65535")
        return PortRange(value, value)
    if value == "*":
        return ALL_PORTS
    lo_text, dash, hi_text = value.partition("-")
    lo = _port(lo_text, value)
    hi = _port(hi_text, value) if dash else lo
    if hi < lo:
        raise ValueError(f"invalid port range {value!r}: the first port is above the last")
    return PortRange(lo, hi)


def parse_protocols(value: object) -> tuple[Protocol, ...]:
    """One protocol or a list of them: ``tcp``, ``[tcp, udp]``."""
    items = value if isinstance(value, (list, tuple)) else (value,)
    if not items:
        raise ValueError("must name at least one protocol: tcp, udp or icmp")
    out: list[Protocol] = []
    for item in items:
        if item not in PROTOCOLS:
            raise ValueError(f"unknown protocol {item!r}: expected tcp, udp or icmp")
        if item in out:
            raise ValueError(f"protocol {item!r} is listed twice")
        out.append(item)
    return tuple(out)


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a {what} (a string), got {value!r}")  # noqa: TRY004
    return value


def check_label(kind: str, value: object) -> str:
    """A tag, node, group or service name: a lower-case DNS label."""
    text = _string(value, f"{kind} name")
    if text.startswith(f"{kind}:") and _LABEL.match(text[len(kind) + 1 :]):
        raise ValueError(f"write the {kind} name without the '{kind}:' prefix: {text[len(kind) + 1:]!r}")
    if not _LABEL.match(text):
        raise ValueError(f"invalid {kind} name {text!r}: use lower-case letters, digits and '-' (a DNS label)")
    return text


def check_principal(value: object) -> str:
    text = _string(value, "principal")
    if len(text) > 320 or not _PRINCIPAL.match(text):
        raise ValueError(f"invalid principal {text!r}: expected an address like nikita@acme.com")
    return normal_principal(text)


def check_agent_name(value: object) -> str:
    text = _string(value, "agent name")
    if not _AGENT_NAME.match(text):
        raise ValueError(f"invalid agent name {text!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    return text


_METHOD = re.compile(r"^[A-Z]{1,20}$")
_TOOL = re.compile(r"^[A-Za-z0-9_.*/-]{1,128}$")
_PATH_CHARS = re.compile(r"^/[A-Za-z0-9._~!$&'()+,;=:@%/*-]{0,1023}$")


def check_method(value: object) -> str:
    """An HTTP method as written on the wire: ``GET``, ``POST``, ... (upper case)."""
    text = _string(value, "HTTP method")
    if not _METHOD.match(text):
        raise ValueError(f"invalid HTTP method {text!r}: expected an upper-case method like GET or POST")
    return text


def _path(value: object, glob: bool) -> str:
    text = _string(value, "path glob" if glob else "path")
    if not _PATH_CHARS.match(text) or (not glob and "*" in text):
        example = "/v1/*" if glob else "/v1/items"
        raise ValueError(f"invalid path {text!r}: expected a path like {example} (starting with '/', no query)")
    if "***" in text:
        raise ValueError(f"invalid path {text!r}: use * (within a segment) or ** (across segments)")
    return text


def check_path(value: object) -> str:
    """A request path (a policy test's): starts with ``/``, no query, no glob."""
    return _path(value, glob=False)


def check_path_glob(value: object) -> str:
    """A path glob of an acl's ``http``: ``/v1/*/items``, ``/static/**``."""
    return _path(value, glob=True)


def check_tool_name(value: object) -> str:
    """An MCP tool name, or a glob of them (``read_*``)."""
    text = _string(value, "MCP tool name")
    if not _TOOL.match(text):
        raise ValueError(f"invalid MCP tool name {text!r}: use letters, digits, '_', '-', '.', '/' and * for any")
    return text


def check_authorized(value: object) -> Authorized:
    """``grant`` or ``delegation`` (an agent's ``authorized``)."""
    for known in AUTHORIZATIONS:
        if value == known:
            return known
    raise ValueError(f"expected grant or delegation, got {value!r}")


def parse_scope_value(value: object) -> Scope:
    try:
        return parse_scope(_string(value, "scope"))
    except InvalidInput as exc:
        raise ValueError(str(exc)) from exc


def parse_duration_value(value: object) -> timedelta:
    try:
        return parse_duration(_string(value, "duration like 15m or 1h"))
    except InvalidInput as exc:
        raise ValueError(str(exc)) from exc


Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_prefix(value: object) -> Prefix:
    text = _string(value, "prefix like 10.20.0.0/16")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid prefix {text!r}: {exc}") from exc


@dataclass(frozen=True)
class NodeSpec:
    """``tag:NAME``, ``node:NAME`` or ``owner:PRINCIPAL``: a way to name nodes."""

    kind: Literal["tag", "node", "owner"]
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


def parse_node_spec(value: object, kinds: tuple[str, ...] = ("tag", "node")) -> NodeSpec:
    text = _string(value, " or ".join(f"{k}:NAME" for k in kinds))
    kind, colon, name = text.partition(":")
    if not colon or kind not in kinds:
        raise ValueError(f"invalid node reference {text!r}: expected " + " or ".join(f"{k}:NAME" for k in kinds))
    if kind == "owner":
        return NodeSpec("owner", check_principal(name))
    return NodeSpec(kind, check_label(kind, name))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Destination:
    """One entry of a ``to`` list: a service, a tag or node with a port, or agents with a port.

    ``ports`` is None when no port was written: for a tag, node or agents
    that means every port (as ``:*``); for a service, the service's own
    ports. ``agents`` names the agents a selector matches (``selector``, a
    :class:`~.model.Selector`; ``name`` is its text): connections to their
    own addresses, wherever they run (SPEC.md §9, agents as servers).
    """

    kind: Literal["service", "tag", "node", "agents"]
    name: str
    ports: PortRange | None = None
    selector: Any = None

    def __str__(self) -> str:
        head = self.name if self.kind in ("service", "agents") else f"{self.kind}:{self.name}"
        return head if self.ports is None else f"{head}:{self.ports}"


def parse_destination(value: object) -> Destination:
    """``db``, ``db:5432``, ``tag:NAME[:PORT]`` or ``node:NAME[:PORT]``."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(  # noqa: TRY004
            f"expected a destination (a service, tag:NAME[:PORT] or node:NAME[:PORT]), got {value!r}"
        )
    kind: Literal["service", "tag", "node"] = "service"
    rest = value
    if value.startswith("tag:"):
        kind, rest = "tag", value[4:]
    elif value.startswith("node:"):
        kind, rest = "node", value[5:]
    name, colon, port_text = rest.partition(":")
    if kind == "service":
        if not _LABEL.match(name):
            raise ValueError(
                f"invalid destination {value!r}: expected a service name, tag:NAME[:PORT] or node:NAME[:PORT]"
            )
    else:
        check_label(kind, name)
    if not colon:
        return Destination(kind, name)
    if not port_text:
        raise ValueError(f"invalid destination {value!r}: a port must follow ':'")
    return Destination(kind, name, parse_port_range(port_text))
