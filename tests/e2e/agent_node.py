"""A stand-in for meshd's agent supervisor, driven over stdin/stdout by the e2e tests.

Run inside a host namespace (``python -m tests.e2e.agent_node``), it owns one
:class:`~meshd.agents.net.AgentNet` — in its own mount namespace, as given by
``ip netns exec``, where ``start()`` mounts cgroup2 — and answers one JSON
line per request line:

    {"op": "start", "node": ..., "ifname": ..., "pool4": ..., "pool6": ...}
    {"op": "add", "agent_id": ..., "ipv4": ..., "ipv6": ...}  -> {"slot": {...}}
    {"op": "move", "pid": ..., "agent_id": ...}
    {"op": "spawn", "agent_id": ..., "argv": [...], "wait": true} -> {"pid": ...}  (answered once it is inside)
    {"op": "populated", "agent_id": ...}                       -> {"populated": bool}
    {"op": "remove", "agent_id": ...}
    {"op": "spoofed"}                                          -> {"spoofed": packets}
    {"op": "flows", "mark": ...}                               -> {"flows": conntrack entries with that mark}
    {"op": "close"}                                            -> closes the AgentNet and exits

End of input closes it too. The second half is the test side: :class:`AgentNode`
and :func:`host_cgroup2` (where the machine's cgroup2 is, seen from the tests).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshcore.errors import IdmeshError
from meshd.agents.net import AgentNet
from tests.e2e.wgnode import JsonLineChild

if TYPE_CHECKING:
    from tests.e2e.netns import Host

_REPO = Path(__file__).resolve().parents[2]


def _flows(mark: int, mask: int) -> int:
    from pyroute2 import Conntrack  # type: ignore[import-untyped]

    count = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        with Conntrack(nfgen_family=family) as ct:
            count += sum(1 for _ in ct.dump_entries(mark=mark, mark_mask=mask))
    return count


def serve() -> None:
    net: AgentNet | None = None
    children: list[subprocess.Popen[bytes]] = []
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request.pop("op")
            answer: dict[str, Any] = {"ok": True}
            try:
                if op == "start":
                    net = AgentNet(request["node"], request["ifname"], request["pool4"], request["pool6"])
                    net.start()
                elif net is None:
                    raise RuntimeError(f"{op} before start")
                elif op == "add":
                    slot = net.add(request["agent_id"], request["ipv4"], request["ipv6"])
                    answer["slot"] = {k: str(v) if isinstance(v, Path) else v
                                      for k, v in dataclasses.asdict(slot).items()}
                elif op == "move":
                    net.move(request["pid"], request["agent_id"])
                elif op == "spawn":
                    slot = net.slots[request["agent_id"]]
                    proc = subprocess.Popen(slot.command(request["argv"]), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    children.append(proc)
                    answer["pid"] = proc.pid
                    deadline = time.monotonic() + (5 if request.get("wait", True) else 0)  # answer once it is in
                    while str(proc.pid) not in (slot.cgroup / "cgroup.procs").read_text().split():
                        if proc.poll() is not None or time.monotonic() > deadline:
                            break
                        time.sleep(0.002)
                elif op == "populated":
                    answer["populated"] = net.populated(request["agent_id"])
                elif op == "remove":
                    net.remove(request["agent_id"])
                elif op == "spoofed":
                    answer["spoofed"] = net.spoofed()
                elif op == "flows":
                    answer["flows"] = _flows(request["mark"], net.table.field.mask)
                elif op == "close":
                    net.close()
                    print(json.dumps(answer), flush=True)
                    return
                else:
                    raise RuntimeError(f"unknown op {op}")
            except (IdmeshError, RuntimeError, KeyError, OSError) as exc:
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            for child in children:
                child.poll()  # reap the ones that exited
            print(json.dumps(answer), flush=True)
    finally:
        if net is not None:
            net.close()


# -- the test side ------------------------------------------------------------------------------------
class AgentNode(JsonLineChild):
    """Client for one ``agent_node.py`` running in ``host``; its stderr (logs) goes to ``log``."""

    def __init__(self, host: Host, log: Path) -> None:
        super().__init__(host, log, "tests.e2e.agent_node")


def host_cgroup2() -> Path:
    """The cgroup2 mount of the tests' own mount namespace (/sys/fs/cgroup, or .../unified on a hybrid host)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype == "cgroup2":
            return Path(fields[4])
    raise AssertionError("no cgroup2 mount on this machine: agents need cgroup2")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # orderly: close, like meshd
    serve()
