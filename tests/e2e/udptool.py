"""UDP probes for the NAT lab, run inside a lab host (``python -m tests.e2e.udptool ...``).

``echo PORT [PORT ...]``
    A reflector: answers every datagram with the source ``ip:port`` it saw.
    Prints ``listening`` once every port is bound, so a test waits on that
    line instead of sleeping.

``session PORT``
    One UDP socket bound to ``0.0.0.0:PORT`` (0: any), driven by one JSON
    request per line, one answer per line (the protocol of
    :class:`tests.e2e.wgnode.JsonLineChild`):

    ``{"op": "ask", "to": "ip:port"}``   -> ``{"seen": "ip:port" | null}``: what a reflector saw of us
    ``{"op": "send", "to": ..., "data": ...}``
    ``{"op": "recv", "seconds": s}``    -> ``{"got": [[data, "ip:port"], ...]}``: what arrived meanwhile
    ``{"op": "punch", "to": ..., "seconds": s}`` -> ``{"reached": bool, "from": "ip:port" | null}``:
        send to ``to`` every 50 ms until something arrives from it (then a few
        more, so the other side hears us too) or ``s`` seconds pass
    ``{"op": "close"}``

The test-side client is :class:`UdpSession`.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.e2e.wgnode import JsonLineChild

if TYPE_CHECKING:
    from tests.e2e.netns import Host

__all__ = ["UdpSession", "start_echo"]


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _text(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def echo(ports: list[int]) -> None:
    socks = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
        socks.append(sock)
    print("listening", flush=True)
    while True:
        ready, _, _ = select.select(socks, [], [])
        for sock in ready:
            _, source = sock.recvfrom(2048)
            sock.sendto(_text(source).encode(), source)


class _Session:
    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", port))
        self.inbox: list[tuple[str, str]] = []

    def _drain(self, until: float) -> None:
        while True:
            left = until - time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], max(0.0, left))
            if not ready:
                return
            data, source = self.sock.recvfrom(2048)
            self.inbox.append((data.decode(errors="replace"), _text(source)))

    def ask(self, to: str) -> dict[str, Any]:
        target = _address(to)
        for _ in range(20):  # UDP: ask again until the reflector answers (2 s in all)
            self.sock.sendto(b"who am i", target)
            deadline = time.monotonic() + 0.1
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    break
                data, source = self.sock.recvfrom(2048)
                if source == target:
                    return {"seen": data.decode()}
                self.inbox.append((data.decode(errors="replace"), _text(source)))
        return {"seen": None}

    def punch(self, to: str, seconds: float) -> dict[str, Any]:
        target = _address(to)
        deadline = time.monotonic() + seconds
        reached: str | None = None
        extra = 0
        while time.monotonic() < deadline and extra < 5:
            self.sock.sendto(b"punch", target)
            start = len(self.inbox)
            self._drain(time.monotonic() + 0.05)
            if reached is None:
                reached = next((src for _, src in self.inbox[start:] if src == to), None)
            if reached is not None:
                extra += 1
        return {"reached": reached is not None, "from": reached}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "ask":
            return self.ask(request["to"])
        if op == "send":
            self.sock.sendto(str(request.get("data", "hello")).encode(), _address(request["to"]))
            return {}
        if op == "recv":
            self._drain(time.monotonic() + float(request.get("seconds", 0)))
            got, self.inbox = self.inbox, []
            return {"got": got}
        if op == "punch":
            return self.punch(request["to"], float(request["seconds"]))
        raise ValueError(f"unknown op {op!r}")


def session(port: int) -> None:
    state = _Session(port)
    print(json.dumps({"ok": True, "port": state.sock.getsockname()[1]}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "close":
            print(json.dumps({"ok": True}), flush=True)
            return
        try:
            answer = {"ok": True, **state.handle(request)}
        except Exception as exc:  # noqa: BLE001 - any failure is an answer; the test decides
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


# -- the test side ------------------------------------------------------------------------------------
class UdpSession(JsonLineChild):
    """One UDP socket in ``host`` (bound to ``port``, 0 for any), driven from the test."""

    def __init__(self, host: Host, log: Path, port: int = 0) -> None:
        super().__init__(host, log, "tests.e2e.udptool", "session", str(port))
        assert self.proc.stdout is not None
        hello = json.loads(self.proc.stdout.readline() or '{"ok": false}')
        if not hello["ok"]:
            raise AssertionError(f"{host.name}: udptool session did not start; log:\n{self.logs()}")
        self.port = int(hello["port"])

    def ask(self, to: str) -> str | None:
        """The source ``ip:port`` the reflector at ``to`` saw for this socket (None: no answer)."""
        seen: str | None = self.call("ask", to=to)["seen"]
        return seen

    def send(self, to: str, data: str = "hello") -> None:
        self.call("send", to=to, data=data)

    def recv(self, seconds: float) -> list[tuple[str, str]]:
        """Every datagram (data, source) that arrived since the last call, waiting ``seconds`` first."""
        return [(d, s) for d, s in self.call("recv", timeout=seconds + 30, seconds=seconds)["got"]]

    def punch(self, to: str, seconds: float = 3.0) -> dict[str, Any]:
        return self.call("punch", timeout=seconds + 30, to=to, seconds=seconds)


def start_echo(host: Host, log: Path, *ports: int) -> None:
    """A reflector on ``host`` (see :func:`echo`), ready when this returns; the network stops it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with open(log, "a") as err:
        proc = host.popen([sys.executable, "-m", "tests.e2e.udptool", "echo", *map(str, ports)],
                          stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    if not ready or proc.stdout.readline().strip() != "listening":
        raise AssertionError(f"{host.name}: the UDP reflector did not start; log:\n{log.read_text()}")


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo([int(p) for p in sys.argv[2:]])
    elif sys.argv[1] == "session":
        session(int(sys.argv[2]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} echo PORT... | session PORT")
