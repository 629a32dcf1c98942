"""A whole mesh on a :class:`~tests.e2e.netns.Network`: the controller on h1,
meshd on the other hosts, all started with the real commands.

Each process is started through ``host.popen`` so the network stops it at
cleanup; logs go to the test's tmp directory and are printed when a wait
fails, so a red test says what the daemons saw.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from tests.e2e.netns import Host, Network

BIN = Path(sys.executable).parent


def wait_until(condition: Any, timeout: float, what: str, on_fail: Any = None, interval: float = 0.05) -> Any:
    """Poll ``condition`` until truthy; on time-out fail naming ``what`` and showing the daemons' logs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except Exception:  # noqa: BLE001 — a daemon not up yet answers with an error; keep polling
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{on_fail() if on_fail else ''}")
        time.sleep(interval)


def cmd(name: str) -> str:
    return str(BIN / name)


ALLOW_E2E = """\
acls:
  - from: {tag: e2e}
    to: ["tag:e2e"]
    protocol: [tcp, udp, icmp]
"""


@dataclass
class Node:
    host: Host
    name: str
    state: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[Any] | None = None

    def status(self) -> dict[str, Any]:
        out = self.host.run([cmd("meshctl"), "status", "--json", "--socket", str(self.socket)])
        return dict(json.loads(out.stdout))

    @property
    def addresses(self) -> list[str]:
        return list(json.loads((self.state / "node.json").read_text())["addresses"])

    def peer_names(self) -> set[str]:
        return {p["name"] for p in self.status()["peers"]}


@dataclass
class Mesh:
    net: Network
    tmp: Path
    controller_host: Host
    url: str = ""
    controller: subprocess.Popen[Any] | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    serve: list[str] = field(default_factory=lambda: [cmd("mesh-controller"), "serve"])
    """How the controller is started (a test may start another version's: :mod:`tests.compat`)."""
    db: str | None = None
    """The controller's PostgreSQL database (None: SQLite in its data directory)."""

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "IDMESH_ADMIN": str(self.tmp / "ctl" / "admin.conf")}

    def init(self, policy: str | None = ALLOW_E2E) -> None:
        """Create the mesh; ``policy`` (default: tag:e2e nodes may reach each other) is applied at once."""
        self.url = f"https://{self.controller_host.underlay4}:8443"
        self.controller_host.run([cmd("mesh-controller"), "init", "--domain", "acme.mesh", "--data",
                                  str(self.tmp / "ctl"), "--url", self.url, *(("--db", self.db) if self.db else ())])
        self.start_controller()
        if policy is not None:
            self.apply_policy(policy)

    def apply_policy(self, text: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        path = self.tmp / "policy.yaml"
        path.write_text(text)
        return self.admin("policy", "apply", str(path), check=check)

    def start_controller(self) -> None:
        with (self.tmp / "controller.log").open("a") as log:
            self.controller = self.controller_host.popen(
                [*self.serve, "--data", str(self.tmp / "ctl"), "--listen", "0.0.0.0:8443"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.admin("nodes", "list", check=False).returncode == 0, 20, "controller up",
                   on_fail=self.logs)

    def kill_controller(self) -> None:
        assert self.controller is not None
        self.controller.send_signal(signal.SIGKILL)
        self.controller.wait(10)

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.controller_host.run([cmd("meshctl"), *args], env=self.env, check=check)

    def join(self, port: int) -> Replica:
        """A second controller on the controller's host, joined to the mesh's database (not started)."""
        return Replica(self, port)

    def enroll(self, host: Host, name: str | None = None, *token_flags: str, force: bool = False) -> Node:
        name = name or host.name
        token = self.admin("token", "create", *(token_flags or ("--tag", "e2e"))).stdout.strip()
        state = self.tmp / "nodes" / name
        host.run([cmd("meshd"), "enroll", token, "--name", name, "--state", str(state),
                  *(["--force"] if force else [])])
        node = self.nodes.get(name) or Node(host, name, state, self.tmp / f"{name}.sock", self.tmp / f"{name}.log")
        self.nodes[name] = node
        return node

    def start(self, node: Node, *extra: str) -> None:
        with node.log.open("a") as log:
            node.proc = node.host.popen(
                [cmd("meshd"), "run", "--state", str(node.state), "--interface", node.host.wg_ifname,
                 "--socket", str(node.socket), *extra], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: node.socket.exists(), 20, f"{node.name}'s local API", on_fail=self.logs)

    def stop(self, node: Node, sig: int = signal.SIGTERM) -> int:
        assert node.proc is not None
        node.proc.send_signal(sig)
        try:
            code = node.proc.wait(20)
        except subprocess.TimeoutExpired:
            node.proc.kill()  # so the namespaces can still be cleaned up; the test fails with what meshd said
            node.proc.wait()
            node.proc = None
            tail = "\n".join(node.log.read_text().splitlines()[-40:])
            raise AssertionError(f"meshd {node.name} did not stop within 20 s of signal {sig}:\n{tail}") from None
        node.proc = None
        return code

    def converged(self, names: set[str] | None = None) -> bool:
        """Every running node lists every other running node as a peer with a handshake."""
        running = {n for n, node in self.nodes.items() if node.proc is not None}
        names = names or running
        for name in names:
            peers = {p["name"]: p for p in self.nodes[name].status()["peers"]}
            if set(peers) != (running | names) - {name}:
                return False
            if any(peers[p]["latest_handshake"] is None for p in peers if p in running):
                return False
        return True

    def wait_converged(self, timeout: float = 30) -> None:
        wait_until(self.converged, timeout, "mesh converged", on_fail=self.logs)

    def logs(self) -> str:
        out = []
        for path in sorted(self.tmp.glob("*.log")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(out)


class Replica:
    """Another controller, joined to the mesh's PostgreSQL database (:meth:`Mesh.join`)."""

    def __init__(self, mesh: Mesh, port: int) -> None:
        self.mesh, self.port = mesh, port
        self.data = mesh.tmp / f"ctl-{port}"
        self.url = f"https://{mesh.controller_host.underlay4}:{port}"
        key = mesh.tmp / "copied-ca.key"
        shutil.copy(mesh.tmp / "ctl" / "ca.key", key)
        assert mesh.db is not None
        mesh.controller_host.run([cmd("mesh-controller"), "join", "--data", str(self.data), "--db", mesh.db,
                                  "--url", self.url, "--ca-key", str(key)])
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, *extra: str) -> None:
        """Serve as the mesh's first controller does (its ``serve`` options), and ``extra`` (a STUN port
        of its own: the first one's is taken)."""
        with (self.mesh.tmp / f"controller-{self.port}.log").open("a") as log:
            self.proc = self.mesh.controller_host.popen(
                [*self.mesh.serve, "--data", str(self.data), "--listen", f"0.0.0.0:{self.port}", *(extra or
                 ("--no-stun",))], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.admin("nodes", "list", check=False).returncode == 0, 20, "replica 2 up",
                   on_fail=self.mesh.logs)

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.mesh.controller_host.run([cmd("meshctl"), *args], check=check,
                                             env={**self.mesh.env, "IDMESH_ADMIN": str(self.data / "admin.conf")})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def ping(host: Host, address: str, count: int = 1) -> bool:
    six = ["-6"] if ":" in address else []
    return host.run(["ping", *six, "-c", str(count), "-W", "2", address], check=False, timeout=15).returncode == 0


TCP_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); print('ready', flush=True)\n"
    "while True:\n"
    "    c,a=s.accept(); c.sendall(('hello '+a[0]+'\\n').encode()); c.close()\n"
)

TCP_CLIENT = (
    "import socket,sys\n"
    "src=(sys.argv[4], 0) if len(sys.argv) > 4 else None\n"
    "c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]), source_address=src)\n"
    "print(c.recv(200).decode().strip())\n"
)


def tcp_server(host: Host, address: str, port: int) -> subprocess.Popen[Any]:
    proc = host.popen([sys.executable, "-c", TCP_SERVER, address, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def tcp_hello(host: Host, address: str, port: int, timeout: float = 3.0, source: str | None = None) -> str | None:
    """Connect and read the server's greeting; None when the connection is refused or dropped."""
    argv = [sys.executable, "-c", TCP_CLIENT, address, str(port), str(timeout), *([source] if source else [])]
    done = host.run(argv, check=False, timeout=timeout + 10)
    return done.stdout.strip() if done.returncode == 0 else None


def wait_for(what: str, condition: Any, timeout: float, mesh: Mesh) -> float:
    """Wait and return how long it took (for the notes, never asserted as speed)."""
    t0 = time.monotonic()
    wait_until(condition, timeout, what, on_fail=mesh.logs)
    return time.monotonic() - t0


def firewall_holds(node: Node, address: str) -> bool:
    """Whether the node's policy table still lets ``address`` in (what 'honoring' means on the wire)."""
    return address in node.host.run(["nft", "list", "table", "inet", "idmesh"], check=False, timeout=10).stdout


def revoke_and_time(mesh: Mesh, agent_id: str, address: str, observer: Node) -> float:
    """Revoke an agent; return milliseconds from the controller's commit (its audit row)
    until ``observer``'s firewall no longer holds the agent's address."""
    import threading

    gone: list[float] = []

    def watch() -> None:
        while firewall_holds(observer, address):
            time.sleep(0.001)
        gone.append(time.time())

    watcher = threading.Thread(target=watch)
    watcher.start()
    mesh.admin("agent", "revoke", agent_id)
    watcher.join(30)
    revoked, _ = audited(mesh, "agent.revoked", f"%/{agent_id}")
    return (gone[0] - revoked) * 1000


def audited(mesh: Mesh, action: str, target: str = "%") -> tuple[float, str]:
    """The newest audit row of ``action`` (target LIKE ``target``): its time (Unix seconds) and target."""
    import sqlite3
    from datetime import datetime

    query = "SELECT at, target FROM audit WHERE action = ? AND target LIKE ? ORDER BY id DESC LIMIT 1"
    if mesh.db is not None:
        import psycopg

        with psycopg.connect(mesh.db) as conn:
            row = conn.execute(query.replace("?", "%s"), (action, target)).fetchone()
        assert row is not None, f"no audit row {action} {target}"
        at, found = row
    else:
        with sqlite3.connect(f"file:{mesh.tmp / 'ctl' / 'controller.db'}?mode=ro", uri=True) as store:
            at, found = store.execute(query, (action, target)).fetchone()
    return datetime.strptime(at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp(), str(found)
