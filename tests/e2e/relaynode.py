"""A :class:`meshd.nat.relay.Relay` in a lab host, driven over stdin/stdout by the e2e tests.

Run inside a host namespace (``python -m tests.e2e.relaynode``), since the
relay's sockets belong to the namespace of the process that opens them. One
JSON request per line, one answer per line (as :mod:`tests.e2e.wgnode`)::

    {"op": "start", "server": [ip, port], "username": ..., "password": ..., "wireguard_port": N}
                                    -> {"relayed": [ip, port]}
    {"op": "open", "peer": KEY, "relayed": [ip, port]}    -> {"endpoint": "127.0.0.1:P"}
    {"op": "refresh", "username": ..., "password": ...}   -> {"relayed": [ip, port]}
    {"op": "state"}   -> {"relayed", "allocations", "counters": {KEY: {...}}, "lost"}
    {"op": "stop"}    -> the relay stopped (allocations deleted); a new "start" may follow
    {"op": "close"}   -> stops and exits

An error answers ``{"ok": false, "error": "<Class>: <one line>"}``; the
process goes on (a refused credential must break nothing else).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshcore.errors import IdmeshError
from meshd.nat.relay import Relay
from tests.e2e.wgnode import JsonLineChild

if TYPE_CHECKING:
    from tests.e2e.netns import Host


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    relay: Relay | None = None
    try:
        while line := await reader.readline():
            request = json.loads(line)
            op = request["op"]
            answer: dict[str, Any] = {"ok": True}
            try:
                if op == "start":
                    relay = Relay(tuple(request["server"]), request["username"], request["password"],
                                  int(request["wireguard_port"]), **request.get("options", {}))
                    try:
                        answer["relayed"] = await relay.start()
                    except IdmeshError:
                        relay = None
                        raise
                elif op == "close":
                    break
                elif relay is None:
                    raise RuntimeError(f"{op}: the relay is not started")
                elif op == "open":
                    answer["endpoint"] = await relay.open(request["peer"], tuple(request["relayed"]))
                elif op == "close_peer":
                    await relay.close_peer(request["peer"])
                elif op == "refresh":
                    answer["relayed"] = await relay.refresh_credentials(request["username"], request["password"])
                elif op == "state":
                    answer.update(relayed=relay.relayed, allocations=relay.allocations(), lost=relay.lost_allocations,
                                  counters={k: vars(v) for k, v in relay.counters().items()})
                elif op == "stop":
                    await relay.stop()
                    relay = None
                else:
                    raise RuntimeError(f"unknown op {op!r}")
            except (IdmeshError, RuntimeError) as exc:
                logging.getLogger("relaynode").warning("%s: %s", op, exc)
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        if relay is not None:
            await relay.stop()
    print(json.dumps({"ok": True}), flush=True)


# -- the test side ------------------------------------------------------------------------------------
class RelayNode(JsonLineChild):
    """Client for one ``relaynode.py`` running in ``host``; its log (stderr) goes to ``log``."""

    def __init__(self, host: Host, log: Path) -> None:
        super().__init__(host, log, "tests.e2e.relaynode")

    def start(self, server: tuple[str, int], username: str, password: str, wireguard_port: int,
              **options: Any) -> tuple[str, int]:
        answer = self.call("start", server=list(server), username=username, password=password,
                           wireguard_port=wireguard_port, options=options)
        return answer["relayed"][0], answer["relayed"][1]

    def try_start(self, server: tuple[str, int], username: str, password: str, wireguard_port: int,
                  **options: Any) -> dict[str, Any]:
        """The raw answer, for a test that expects a refusal."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": "start", "server": list(server), "username": username,
                                          "password": password, "wireguard_port": wireguard_port,
                                          "options": options}) + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return answer

    def open(self, peer: str, relayed: tuple[str, int]) -> str:
        endpoint: str = self.call("open", peer=peer, relayed=list(relayed))["endpoint"]
        return endpoint

    def refresh(self, username: str, password: str) -> tuple[str, int]:
        answer = self.call("refresh", timeout=60, username=username, password=password)
        return answer["relayed"][0], answer["relayed"][1]

    def state(self) -> dict[str, Any]:
        return self.call("state")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    asyncio.run(serve())
