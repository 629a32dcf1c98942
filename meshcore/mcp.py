"""Reading an HTTP request body as MCP (JSON-RPC 2.0): which methods it calls, which tools (pure).

meshd looks at bodies for two reasons: ``mcp_tools`` in the policy (which
``tools/call`` a request makes) and shadow MCP (a request that speaks MCP
from a source that is not an agent). A body is MCP when it is a JSON-RPC 2.0
message, or a batch of them, whose method is one of MCP's
(:data:`MCP_METHODS`, or a ``notifications/`` one). Responses a client
posts back (to a server's request) carry no method and call nothing.

What is refused (:class:`~meshcore.errors.InvalidInput`, one line): a body
declared JSON that is not JSON, and a JSON-RPC ``tools/call`` whose tool
name is missing or not a string. Anything else is simply "not MCP".
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import InvalidInput

__all__ = ["MCP_METHODS", "McpBody", "is_json", "read_body"]

MCP_METHODS = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read", "resources/templates/list",
    "resources/subscribe", "resources/unsubscribe", "prompts/list", "prompts/get", "completion/complete",
    "logging/setLevel", "sampling/createMessage", "elicitation/create", "roots/list", "tasks/get", "tasks/list",
    "tasks/cancel", "tasks/result",
})


@dataclass(frozen=True)
class McpBody:
    """The JSON-RPC methods of a body that speaks MCP, and the tools its ``tools/call`` s name, in order."""

    methods: tuple[str, ...]
    tools: tuple[str, ...]


def is_json(content_type: str | None) -> bool:
    """``application/json`` or a ``+json`` type, parameters ignored."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def read_body(body: bytes) -> McpBody | None:
    """The MCP in ``body`` (a JSON body), or None when it is JSON but not MCP."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidInput("the request body is declared JSON but is not JSON") from exc
    messages = data if isinstance(data, list) else [data]
    methods: list[str] = []
    tools: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            continue
        method = message.get("method")
        if not isinstance(method, str):
            continue
        methods.append(method)
        if method == "tools/call":
            params = message.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            if not isinstance(name, str) or not name:
                raise InvalidInput("a JSON-RPC tools/call without a tool name (params.name)")
            tools.append(name)
    if not any(m in MCP_METHODS or m.startswith("notifications/") for m in methods):
        return None
    return McpBody(tuple(methods), tuple(tools))
