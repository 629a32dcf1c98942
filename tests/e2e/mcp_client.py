"""A real MCP client (the ``mcp`` SDK, streamable HTTP) that an agent runs through the identity-aware proxy in e2e tests.

``python tests/e2e/mcp_client.py URL TOOL [--arg key=value ...] [--header K=V ...]``

Connects to URL (``http://100.64.0.1:8080/mcp``), does the initialize handshake, calls TOOL with the (string) args
and prints one JSON line:

* ``{"ok": true, "result": "<text content>"}``
* ``{"ok": false, "status": 403, "www_authenticate": "<value>" | null, "body": "<first 300 chars>"}`` when a POST
  was answered with an HTTP error (the SDK hides the response, so an httpx2 response hook keeps the first one)
* ``{"ok": false, "error": "<message>"}`` for a JSON-RPC error or a tool error without an HTTP error

and exits 0; anything else is a traceback and exit 1. ``--header`` adds request headers (forged ``Idmesh-*``
ones, say). Proxies and CA bundles from the environment are ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent


def pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def mcp_error(e: BaseException) -> MCPError | None:
    if isinstance(e, BaseExceptionGroup):
        return next((found for inner in e.exceptions if (found := mcp_error(inner)) is not None), None)
    return e if isinstance(e, MCPError) else None


async def call(url: str, tool: str, arguments: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    failed: list[httpx2.Response] = []

    async def keep_error(response: httpx2.Response) -> None:
        if response.request.method == "POST" and response.status_code >= 400 and not failed:
            await response.aread()
            failed.append(response)

    http = httpx2.AsyncClient(headers=headers, trust_env=False, timeout=httpx2.Timeout(30.0),
                              event_hooks={"response": [keep_error]})
    try:
        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            result = await client.call_tool(tool, arguments)
    except Exception as e:  # the SDK raises its MCPError inside (nested) ExceptionGroups
        if failed:
            response = failed[0]
            return {"ok": False, "status": response.status_code,
                    "www_authenticate": response.headers.get("www-authenticate"), "body": response.text[:300]}
        if (error := mcp_error(e)) is None:
            raise
        return {"ok": False, "error": str(error)}
    text = "".join(block.text for block in result.content if isinstance(block, TextContent))
    return {"ok": True, "result": text} if not result.is_error else {"ok": False, "error": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("tool")
    parser.add_argument("--arg", type=pair, action="append", default=[], help="a tool argument, key=value")
    parser.add_argument("--header", type=pair, action="append", default=[], help="a request header, K=V")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(call(args.url, args.tool, dict(args.arg), dict(args.header)))), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
