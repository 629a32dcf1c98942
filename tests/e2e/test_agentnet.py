"""Agents' own source addresses and anti-spoofing, for real: two namespaces, a wireguard-go tunnel, nftables.

h1 owns block 100.64.0.0/26 + fd00:1::/64 (node address .1 / ::1), h2 owns
100.64.0.64/26 + fd00:1:0:1::/64; each peer allows the other's whole block.
In h1, ``agent_node.py`` runs :class:`meshd.agents.net.AgentNet` (its own
mount namespace, as ``ip netns exec`` gives it). Test processes are started
outside any agent and moved into one by pid before they open a socket;
h2's servers print the source address they see. All traffic stays inside
the namespaces this test creates.

The cgroups live in the machine's one cgroup2 hierarchy, so every test also
removes, whatever happens, the ``idmesh-<node>`` tree its nodes made.
"""

from __future__ import annotations

import os
import queue
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshd.wg import DeviceConfig, PeerConfig, generate_private_key, public_key_of
from tests.e2e.agent_node import AgentNode, host_cgroup2
from tests.e2e.netns import Host, Network, wait_until
from tests.e2e.wgnode import WgNode

pytestmark = pytest.mark.e2e

PORT = 51820
H1_V4, H1_V6, H2_V4, H2_V6 = "100.64.0.1", "fd00:1::1", "100.64.0.65", "fd00:1:0:1::1"
A1_V4, A1_V6, A2_V4, A2_V6 = "100.64.0.2", "fd00:1::2", "100.64.0.3", "fd00:1::3"

TCP_SERVER = """
import socket, sys, threading
addr, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen()
print("listening", flush=True)
def echo(conn):
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(line)
while True:
    conn, peer = srv.accept()
    print(peer[0], flush=True)
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

# Waits for "go" (by then the test has moved it into an agent's cgroup, or not), connects, echoes lines.
TCP_CLIENT = """
import socket, sys
sys.stdin.readline()
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected from", conn.getsockname()[0], flush=True)
replies = conn.makefile("r")
for line in sys.stdin:
    conn.sendall(line.encode())
    print(replies.readline(), end="", flush=True)
"""

UDP_LISTENER = """
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 7100))
print("listening", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    print(peer[0].removeprefix("::ffff:"), data.decode(errors="replace"), flush=True)
"""

UDP_SEND = """
import socket, sys
dst, tag = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(tag.encode(), (dst, 7100))
"""

# Root, outside every agent cgroup, claims a source address (bind with IP_TRANSPARENT, or a raw socket).
# Prints how many sends the local stack refused (EPERM: netfilter dropped it on the way out).
SPOOF = r"""
import socket, struct, sys
method, src, dst, tag, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
mark = int(sys.argv[6]) if len(sys.argv) > 6 else 0
payload, sport, dport = tag.encode(), 40000, 7100
refused = 0
fam = socket.AF_INET6 if ":" in src else socket.AF_INET

def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF or 0xFFFF

for _ in range(count):
    if method == "transparent":  # IP_TRANSPARENT / IPV6_TRANSPARENT: bind a non-local source (root)
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET:
            s.setsockopt(socket.SOL_IP, 19, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, 75, 1)
        if mark:
            s.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK: a forged agent mark
        s.bind((src, 0))
        packet, to = payload, (dst, dport)
    else:  # "raw": the whole IP header written by hand
        s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
        a, b = socket.inet_pton(fam, src), socket.inet_pton(fam, dst)
        length = 8 + len(payload)
        if fam == socket.AF_INET:
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, 17, 0, a, b)
            udp = struct.pack("!HHHH", sport, dport, length, 0)
        else:
            ip = struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, a, b)
            pseudo = a + b + struct.pack("!IxxxB", length, 17)
            udp = struct.pack("!HHHH", sport, dport, length, 0)
            udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp + payload))
        packet, to = ip + udp + payload, (dst, 0)
    try:
        s.sendto(packet, to)
    except PermissionError:
        refused += 1
    s.close()
print(refused)
"""


def _read_line(stream: Any, timeout: float = 10.0) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    line: str = stream.readline()
    return line


class Lines:
    """A process's stdout read by a thread, line by line (a selector on a buffered pipe misses batched lines)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)

    def next(self, timeout: float = 10.0) -> str:
        try:
            return self._queue.get(timeout=timeout).strip()
        except queue.Empty:
            return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _remove_cgroup_tree(top: Path) -> None:
    """Independent of the code under test: kill everything under ``top``, remove its directories."""
    if not top.exists():
        return
    (top / "cgroup.kill").write_text("1\n")
    deadline = time.monotonic() + 10
    for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [top]:
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def _reap_stale_cgroups() -> None:
    """``idmesh-idm-<pid>-...`` trees of test runs whose process is gone (killed before cleaning up)."""
    root = host_cgroup2()
    for top in root.glob("idmesh-idm-*"):
        match = re.match(r"^idmesh-idm-(\d+)-", top.name)
        if match and not _alive(int(match.group(1))):
            _remove_cgroup_tree(top)


@dataclass
class Mesh:
    """h1 and h2 joined by WireGuard; h1 runs the agent helper(s)."""

    h1: Host
    h2: Host
    tmp: Path
    helpers: list[AgentNode] = field(default_factory=list)

    @property
    def node(self) -> str:
        return self.h1.netns  # unique on the machine (pid + sequence): so is its cgroup tree

    @property
    def cgroup_tree(self) -> Path:
        return host_cgroup2() / f"idmesh-{self.node}"

    def helper(self, start: bool = True) -> AgentNode:
        agent = AgentNode(self.h1, self.tmp / f"agent_node-{len(self.helpers)}.log")
        self.helpers.append(agent)
        if start:
            agent.call("start", node=self.node, ifname=self.h1.wg_ifname, pool4="100.64.0.0/26",
                       pool6="fd00:1::/64")
        return agent

    def popen(self, host: Host, program: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
        return host.popen([sys.executable, "-c", program, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True)

    def server(self, address: str, port: int) -> Lines:
        srv = Lines(self.popen(self.h2, TCP_SERVER, address, str(port)))
        assert srv.next() == "listening"
        return srv

    def udp_listener(self) -> Lines:
        listener = Lines(self.popen(self.h2, UDP_LISTENER))
        assert listener.next() == "listening"
        return listener


@pytest.fixture
def mesh(network: Callable[..., Network], tmp_path: Path) -> Iterator[Mesh]:
    _reap_stale_cgroups()
    net = network(2)
    h1, h2 = net.hosts
    keys = {h.name: generate_private_key() for h in (h1, h2)}
    blocks = {"h1": ("100.64.0.0/26", "fd00:1::/64"), "h2": ("100.64.0.64/26", "fd00:1:0:1::/64")}
    own = {"h1": [f"{H1_V4}/32", f"{H1_V6}/128"], "h2": [f"{H2_V4}/32", f"{H2_V6}/128"]}
    mesh = Mesh(h1, h2, tmp_path)
    try:
        for me, other in ((h1, h2), (h2, h1)):
            peer = PeerConfig(public_key_of(keys[other.name]), blocks[other.name], f"{other.underlay4}:{PORT}")
            WgNode(me, tmp_path / f"wg-{me.name}.log").apply(DeviceConfig(keys[me.name], PORT, (peer,)),
                                                             own[me.name], ["100.64.0.0/10", "fd00:1::/48"])
        wait_until(lambda: h1.run(["ping", "-n", "-c", "1", "-W", "1", H2_V4], check=False).returncode == 0, 10,
                   "the tunnel h1 -> h2")
        yield mesh
    finally:
        for helper in mesh.helpers:
            try:
                helper.close()
            except (AssertionError, OSError, subprocess.SubprocessError):
                pass  # the network's teardown kills it; its cgroups go just below
        _remove_cgroup_tree(mesh.cgroup_tree)


class Client:
    """A TCP client on h1 that connects when told to: first moved into an agent's cgroup, or not."""

    def __init__(self, mesh: Mesh, address: str, port: int, agent: tuple[AgentNode, str] | None) -> None:
        self.proc = mesh.popen(mesh.h1, TCP_CLIENT, address, str(port), stdin=True)
        if agent is not None:
            helper, agent_id = agent
            helper.call("move", pid=self.proc.pid, agent_id=agent_id)
        self.local = self.send("go").removeprefix("connected from ")

    def send(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return _read_line(self.proc.stdout).strip()

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(10)


def _seen(srv: Lines) -> str:
    return srv.next()


def _spoof(mesh: Mesh, method: str, src: str, dst: str, tag: str, count: int = 3, mark: int = 0) -> int:
    """Send ``count`` spoofed datagrams from h1 (root, no agent); return how many h1 refused to send."""
    args = [method, src, dst, tag, str(count)] + ([str(mark)] if mark else [])
    return int(mesh.h1.run([sys.executable, "-c", SPOOF, *args]).stdout)


def _heard(listener: Lines, until: str, timeout: float = 10.0) -> list[tuple[str, str]]:
    """Datagrams h2 received (source, tag), up to and including the one tagged ``until``."""
    heard = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = listener.next(max(0.1, deadline - time.monotonic())).split()
        if len(line) == 2:
            heard.append((line[0], line[1]))
            if line[1] == until:
                return heard
    raise AssertionError(f"h2 never heard {until!r}; it heard {heard}")


def test_agent_traffic_leaves_with_the_agents_address_and_plain_traffic_as_the_node(mesh: Mesh) -> None:
    srv4, srv6 = mesh.server(H2_V4, 7000), mesh.server(H2_V6, 7001)
    agents = mesh.helper()
    slot = agents.call("add", agent_id="a1", ipv4=A1_V4, ipv6=A1_V6)["slot"]
    assert (slot["mark"], slot["number"], slot["ipv4"]) == (0x00200000, 2, A1_V4)

    for srv, address, port, agent_address, node_address in ((srv4, H2_V4, 7000, A1_V4, H1_V4),
                                                            (srv6, H2_V6, 7001, A1_V6, H1_V6)):
        agent = Client(mesh, address, port, (agents, "a1"))
        assert _seen(srv) == agent_address  # (1) the remote node sees the agent's own address
        assert agent.local == node_address  # ... while the agent itself never had to know it
        plain = Client(mesh, address, port, None)
        assert _seen(srv) == node_address  # (2) a plain process of h1 is the node
        for i in range(3):  # (3) both ways, several round trips each
            assert agent.send(f"agent {i}") == f"agent {i}"
            assert plain.send(f"plain {i}") == f"plain {i}"
        assert agent.finish() == 0 and plain.finish() == 0

    # The agent's connections, their closing handshakes included, never looked like spoofing.
    time.sleep(0.5)
    assert agents.call("spoofed")["spoofed"] == 0
    ruleset = mesh.h1.run(["nft", "list", "table", "inet", "idmesh_agents"]).stdout
    assert "goto agent_2" in ruleset and "100.64.0.2 . 0x00200000" in ruleset


def test_a_root_process_outside_the_cgroup_cannot_send_with_an_agents_address(mesh: Mesh) -> None:
    listener = mesh.udp_listener()
    methods = [("transparent", A1_V4, H2_V4), ("raw", A1_V4, H2_V4), ("transparent", A1_V6, H2_V6),
               ("raw", A1_V6, H2_V6)]

    # Control, before any agent machinery: every method does put the agent's address on the wire to h2.
    for method, src, dst in methods:
        assert _spoof(mesh, method, src, dst, f"before-{method}-{dst}", count=1) == 0
    heard = set()
    for method, src, dst in methods:
        heard.update(_heard(listener, f"before-{method}-{dst}"))
    assert {(A1_V4, f"before-transparent-{H2_V4}"), (A1_V4, f"before-raw-{H2_V4}"),
            (A1_V6, f"before-transparent-{H2_V6}"), (A1_V6, f"before-raw-{H2_V6}")} <= heard

    agents = mesh.helper()
    agents.call("add", agent_id="a1", ipv4=A1_V4, ipv6=A1_V6)
    # Now h1 refuses every one of them (the sender gets EPERM: netfilter dropped it on the way out).
    sent = 0
    for method, src, dst in methods:
        assert _spoof(mesh, method, src, dst, f"spoof-{method}-{dst}") == 3, (method, src)
        sent += 3
    for src, dst in ((A1_V4, H2_V4), (A1_V6, H2_V6)):  # a forged agent mark (SO_MARK) does not help
        assert _spoof(mesh, "transparent", src, dst, f"forged-mark-{dst}", mark=0x00200000) == 3, src
        sent += 3
    for src, dst in (("100.64.0.9", H2_V4), ("fd00:1::9", H2_V6)):  # nor an address no agent holds yet
        assert _spoof(mesh, "transparent", src, dst, f"unowned-{dst}") == 3, src
        sent += 3

    # The agent itself gets through, after all of the above: h2 heard it, and nothing before it.
    for dst, agent_address in ((H2_V4, A1_V4), (H2_V6, A1_V6)):
        agents.call("spawn", agent_id="a1", argv=[sys.executable, "-c", UDP_SEND, dst, f"agent-{dst}"])
        heard_now = _heard(listener, f"agent-{dst}")
        assert heard_now == [(agent_address, f"agent-{dst}")], heard_now
    assert agents.call("spoofed")["spoofed"] == sent  # (4) each one dropped on h1, and counted


def test_agents_come_and_go_without_disturbing_each_other(mesh: Mesh) -> None:
    srv = mesh.server(H2_V4, 7000)
    agents = mesh.helper()
    a1 = agents.call("add", agent_id="a1", ipv4=A1_V4, ipv6=A1_V6)["slot"]
    first = Client(mesh, H2_V4, 7000, (agents, "a1"))
    assert _seen(srv) == A1_V4 and first.send("one") == "one"
    assert agents.call("populated", agent_id="a1")["populated"]

    a2 = agents.call("add", agent_id="a2", ipv4=A2_V4, ipv6=A2_V6)["slot"]
    second = Client(mesh, H2_V4, 7000, (agents, "a2"))
    assert _seen(srv) == A2_V4 and second.send("hello") == "hello"
    sleeper = agents.call("spawn", agent_id="a2", argv=["sleep", "300"])["pid"]
    a2_dir = mesh.cgroup_tree / Path(a2["cgroup"]).name  # the helper sees it in its own mount namespace
    assert a2_dir.name == "agent-3"  # named after its number, like its chain
    assert str(sleeper) in (a2_dir / "cgroup.procs").read_text().split()  # seen from the host's cgroupfs too
    assert first.send("two") == "two"
    assert agents.call("flows", mark=a2["mark"])["flows"] >= 1

    agents.call("remove", agent_id="a2")  # (5) its cgroup goes, its processes die, its flows are forgotten
    assert not a2_dir.exists()
    assert second.proc.wait(5) == -signal.SIGKILL and not _alive(sleeper)
    assert agents.call("flows", mark=a2["mark"])["flows"] == 0
    assert first.send("three") == "three"  # a1's open connection did not notice
    assert agents.call("flows", mark=a1["mark"])["flows"] >= 1

    # An agent whose last process exits on its own is seen as empty (the supervisor's cue to retire it).
    agents.call("add", agent_id="a3", ipv4="100.64.0.4", ipv6="fd00:1::4")
    agents.call("spawn", agent_id="a3", argv=["sleep", "0.2"])
    wait_until(lambda: not agents.call("populated", agent_id="a3")["populated"], 10, "a3 to empty")
    agents.call("remove", agent_id="a3")
    assert first.send("four") == "four"

    # Spawned and removed at once: the wrapper either joins before the kill (and dies) or cannot join
    # (and never runs its command); nothing of it survives, outside the cgroup least of all.
    for attempt in range(5):
        agents.call("add", agent_id="a5", ipv4="100.64.0.5", ipv6="fd00:1::5")  # cgroup agent-5
        racer: int = agents.call("spawn", agent_id="a5", argv=["sleep", "300"], wait=False)["pid"]
        agents.call("remove", agent_id="a5")

        def gone(pid: int = racer) -> bool:
            return not _alive(pid)

        wait_until(gone, 5, f"the racing spawn #{attempt} to be gone")
        assert not (mesh.cgroup_tree / "agent-5").exists()

    agents.call("remove", agent_id="a1")
    assert first.proc.wait(5) == -signal.SIGKILL and not (mesh.cgroup_tree / "agent-2").exists()
    assert agents.call("flows", mark=a1["mark"])["flows"] == 0
    assert agents.call("spoofed")["spoofed"] == 0
    assert "goto agent_" not in mesh.h1.run(["nft", "list", "table", "inet", "idmesh_agents"]).stdout


def test_close_and_a_crashed_run_leave_nothing_behind(mesh: Mesh) -> None:
    crashed = mesh.helper()
    crashed.call("add", agent_id="a1", ipv4=A1_V4, ipv6=A1_V6)
    orphan = crashed.call("spawn", agent_id="a1", argv=["sleep", "300"])["pid"]
    os.kill(crashed.proc.pid, signal.SIGKILL)  # meshd dies; its agent and its table live on
    crashed.proc.wait(5)
    assert _alive(orphan) and (mesh.cgroup_tree / "agent-2").is_dir()
    assert "goto agent_2" in mesh.h1.run(["nft", "list", "table", "inet", "idmesh_agents"]).stdout

    agents = mesh.helper()  # start() takes over: the orphan is killed, its cgroup and entries go
    assert not _alive(orphan) and not (mesh.cgroup_tree / "agent-2").exists()
    assert "goto agent_" not in mesh.h1.run(["nft", "list", "table", "inet", "idmesh_agents"]).stdout
    agents.call("add", agent_id="a1", ipv4=A1_V4, ipv6=A1_V6)
    srv = mesh.server(H2_V4, 7000)
    client = Client(mesh, H2_V4, 7000, (agents, "a1"))
    assert _seen(srv) == A1_V4 and client.send("again") == "again"
    worker = agents.call("spawn", agent_id="a1", argv=["sleep", "300"])["pid"]

    agents.close()  # (6) no table, no cgroup, no process
    assert agents.proc.returncode == 0
    assert client.proc.wait(5) == -signal.SIGKILL and not _alive(worker)
    assert "idmesh_agents" not in mesh.h1.run(["nft", "list", "tables"]).stdout
    assert not mesh.cgroup_tree.exists()


# Echoes, and after the client's FIN waits a moment before closing its own side: by then the client's
# socket has become a TIME_WAIT mini-socket, which answers without the agent's socket (no cgroup).
LINGERING_SERVER = """
import socket, sys, time
addr, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen()
print("listening", flush=True)
conn, peer = srv.accept()
print(peer[0], flush=True)
while data := conn.recv(100):
    conn.sendall(data)
time.sleep(1)
conn.close()
print("closed", flush=True)
time.sleep(30)
"""


def test_the_kernel_finishes_an_exited_agents_connections_with_its_address(mesh: Mesh) -> None:
    agents = mesh.helper()
    agents.call("add", agent_id="a1", ipv4=A1_V4, ipv6=A1_V6)
    for address, agent_address in ((H2_V4, A1_V4), (H2_V6, A1_V6)):
        srv = Lines(mesh.popen(mesh.h2, LINGERING_SERVER, address, "7002"))
        assert srv.next() == "listening"
        client = Client(mesh, address, 7002, (agents, "a1"))
        assert srv.next() == agent_address
        assert client.send("bye") == "bye" and client.finish() == 0  # the agent is gone; its socket lingers
        assert srv.next() == "closed"
        # h2's FIN is acknowledged by h1's TIME_WAIT socket, sent with the agent's address: nothing dropped,
        # and h2 does not sit in LAST-ACK retransmitting its FIN.
        wait_until(lambda: "LAST-ACK" not in mesh.h2.run(["ss", "-tan"]).stdout, 5, "h2's side to close")
        srv.proc.kill()
    assert agents.call("spoofed")["spoofed"] == 0
