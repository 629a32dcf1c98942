"""A controller from the future: this version's controller, answering as a newer one would.

Every JSON object of every answer and of every stream line gets a field
this version does not know, and after every stream line comes a message of
a type it does not know. Run it like ``mesh-controller serve``::

    python -m tests.compat.future_controller --data DIR --listen HOST:PORT

Free-form mappings (a netmap's ``nodes`` by name, an audit entry's
``detail``) get no new key themselves, as a newer controller would not add
a node or an audit detail of its own: their values still do.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from controller.server import serve
from idmesh.logs import setup_logging

FIELD = "added_in_protocol_99"
MESSAGE = json.dumps({"type": "hologram", "hologram": {FIELD: True, "frames": [1, 2, 3]}}).encode() + b"\n"
MAPPINGS = frozenset({"nodes", "detail"})


def newer(value: Any, mapping: bool = False) -> Any:
    if isinstance(value, dict):
        out = {k: newer(v, mapping=k in MAPPINGS) for k, v in value.items()}
        if not mapping:
            out[FIELD] = {"since": 99}
        return out
    if isinstance(value, list):
        return [newer(v) for v in value]
    return value


class FromTheFuture:
    """ASGI middleware rewriting JSON answers and NDJSON streams as described above."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = ""
        start: dict[str, Any] = {}
        body = b""

        async def rewriting(message: dict[str, Any]) -> None:
            nonlocal kind, start, body
            if message["type"] == "http.response.start":
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                kind = "ndjson" if b"ndjson" in ctype else "json" if b"json" in ctype else ""
                if kind == "json":  # its length changes: sent once the whole body is known
                    start = message
                    return
                if kind == "ndjson":
                    message = {**message, "headers": [h for h in message["headers"] if h[0] != b"content-length"]}
                await send(message)
                return
            if kind == "json":
                body += message.get("body", b"")
                if message.get("more_body"):
                    return
                out = json.dumps(newer(json.loads(body))).encode() if body else body
                headers = [h for h in start["headers"] if h[0] != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(out)).encode())]})
                await send({"type": "http.response.body", "body": out})
                return
            if kind == "ndjson":
                body += message.get("body", b"")
                *lines, body = body.split(b"\n")
                out = b"".join(json.dumps(newer(json.loads(line))).encode() + b"\n" + MESSAGE
                               for line in lines if line.strip())
                await send({**message, "body": out})
                return
            await send(message)

        await self.app(scope, receive, rewriting)


def main() -> None:
    p = argparse.ArgumentParser(prog="future-controller")
    p.add_argument("serve", nargs="?")
    p.add_argument("--data", required=True)
    p.add_argument("--listen", required=True)
    args = p.parse_args()
    setup_logging(False)
    from pathlib import Path

    serve(Path(args.data), args.listen, middleware=[FromTheFuture])


if __name__ == "__main__":
    main()
