"""A tiny stand-in for the node daemon's data plane, driven over stdin/stdout by the e2e tests.

Run inside a host namespace (``python -m tests.e2e.wgnode IFNAME``), it owns one
:class:`~meshd.wg.WireGuardGo` device and applies :mod:`meshd.kernel.netconf` to
its interface, exactly as meshd will; the test sends JSON lines and reads
one JSON answer per line:

    {"op": "apply", "device": {...DeviceConfig...}, "link": {...LinkConfig...}}
    {"op": "state"}   -> device state, wireguard-go pid, restart count, link state
    {"op": "close"}   -> closes the device (interface and process gone) and exits

End of input (the test process died) closes the device too. The second
half of the module is the test-side client, :class:`WgNode`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshd.kernel.netconf import IPRouteNetConf, LinkConfig
from meshd.wg import DeviceConfig, PeerConfig, WireGuardGo

if TYPE_CHECKING:
    from tests.e2e.netns import Host

_REPO = Path(__file__).resolve().parents[2]


def _device(data: dict[str, Any]) -> DeviceConfig:
    return DeviceConfig(data["private_key"], data["listen_port"], tuple(PeerConfig(**p) for p in data["peers"]))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple | list | frozenset | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def serve(ifname: str) -> None:
    netconf = IPRouteNetConf()
    link: LinkConfig | None = None

    def reapply_link() -> None:
        if link is not None:
            netconf.apply(link)

    device = WireGuardGo(ifname, on_restart=reapply_link)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                answer: dict[str, Any] = {"ok": True}
                if request["op"] == "apply":
                    device.apply(_device(request["device"]))
                    link = LinkConfig(ifname, tuple(request["link"]["addresses"]), tuple(request["link"]["routes"]))
                    answer["link_ops"] = [str(op) for op in netconf.apply(link)]
                elif request["op"] == "state":
                    answer.update(state=_jsonable(device.state()), pid=device.pid, restarts=device.restarts,
                                  link=_jsonable(netconf.state(ifname)))
                elif request["op"] == "close":
                    device.close()
                    print(json.dumps(answer), flush=True)
                    return
            except Exception as exc:  # noqa: BLE001 - any failure is an answer; the test decides
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        device.close()


# -- the test side ------------------------------------------------------------------------------------
class JsonLineChild:
    """A helper program running inside a host, driven by one JSON request per line.

    The request ``{"op": ..., **params}`` gets one answer line ``{"ok": true, ...}``
    or ``{"ok": false, "error": ...}``; a missing or failed answer fails the test
    with the child's log.
    """

    def __init__(self, host: Host, log: Path, module: str, *args: str) -> None:
        self.host = host
        self.log = log
        self.module = module
        env = {**os.environ, "PYTHONPATH": str(_REPO)}
        with open(log, "a") as err:
            self.proc = host.popen([sys.executable, "-m", module, *args], cwd=_REPO,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)

    def call(self, op: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **params}) + "\n")
        self.proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"{self.host.name}: no answer to {op} in {timeout:g} s; log:\n{self.logs()}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"{self.host.name}: {self.module} exited ({self.proc.poll()}); "
                                 f"log:\n{self.logs()}")
        answer: dict[str, Any] = json.loads(line)
        if not answer["ok"]:
            raise AssertionError(f"{self.host.name}: {op} failed: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.call("close")
            self.proc.wait(10)

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class WgNode(JsonLineChild):
    """Client for one ``wgnode.py`` running in ``host``; its stderr (logs) goes to ``log``."""

    def __init__(self, host: Host, log: Path, ifname: str | None = None) -> None:
        self.ifname = ifname or host.wg_ifname
        super().__init__(host, log, "tests.e2e.wgnode", self.ifname)

    def apply(self, device: DeviceConfig, addresses: list[str], routes: list[str]) -> dict[str, Any]:
        return self.call("apply", device=_jsonable(device), link={"addresses": addresses, "routes": routes})

    def state(self) -> dict[str, Any]:
        return self.call("state")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # orderly: close the device, like meshd
    serve(sys.argv[1])
