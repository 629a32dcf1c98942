"""``meshctl deploy`` end to end: real OpenSSH servers in network namespaces.

h1 runs the controller (and the deploy command, which reaches the others over
the bridge); h2..h4 each run Debian's ``sshd`` with password authentication
for root and a host key made in the test's tmp directory. The password is not
root's real one: each sshd runs in its own mount namespace (the one
``ip netns exec`` makes) with a copy of /etc/shadow bound over the real file,
holding a test hash for root; the machine's /etc/shadow is never touched.

The hosts share this machine's filesystem, so every host gets its own install
directory, state directory, socket and pidfile (inventory settings), and
``service: process`` (namespaces have no systemd). Every meshd that deploy
started is stopped by the PID in its pidfile at the end, passing or failing;
then the network stops everything else it started (the sshds) and checks that
nothing of ours is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.mesh import Mesh, cmd, ping, wait_until
from tests.e2e.netns import Host, Network
from tests.prerequisites import require

REPO = Path(__file__).resolve().parents[2]
SSHD = "/usr/sbin/sshd"
PASSWORD = "e2e-" + secrets.token_hex(8)
POLICY = """\
acls:
  - from: {tag: e2e}
    to: ["tag:e2e"]
    protocol: [tcp, udp, icmp]
"""


def _require(tools: dict[str, str]) -> None:
    missing = [f"{tool} (apt-get install {package})" for tool, package in tools.items()
               if shutil.which(tool) is None and not Path(tool).exists()]
    require("deploy e2e needs", missing)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The idmesh wheel and its dependencies, collected once, outside the namespaces (which have no index)."""
    from deploy.artifacts import Artifacts

    house = tmp_path_factory.mktemp("wheelhouse")
    with Artifacts(source=REPO) as artifacts:
        for wheel in asyncio.run(artifacts.uploads()):
            shutil.copy2(wheel, house / wheel.name)
    return house


def start_sshd(host: Host, where: Path) -> str:
    """sshd on ``host``:22 accepting root with :data:`PASSWORD`; returns its known_hosts line."""
    where.mkdir(parents=True)
    key = where / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(key)], check=True,
                   capture_output=True)
    hashed = subprocess.run(["openssl", "passwd", "-6", "-salt", secrets.token_hex(8), PASSWORD], check=True,
                            capture_output=True, text=True).stdout.strip()
    lines = Path("/etc/shadow").read_text().splitlines()
    shadow = where / "shadow"
    shadow.write_text("\n".join(f"root:{hashed}:{line.split(':', 2)[2]}" if line.startswith("root:") else line
                                for line in lines) + "\n")
    shadow.chmod(0o600)
    config = where / "sshd_config"
    config.write_text(f"""\
ListenAddress {host.underlay4}
Port 22
HostKey {key}
PidFile {where / "sshd.pid"}
PermitRootLogin yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication no
AuthorizedKeysFile none
UsePAM no
StrictModes no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
    log = where / "sshd.log"
    with log.open("w") as out:
        # ip netns exec gave this command a mount namespace of its own: the bind mount stays in it
        host.popen(["sh", "-c", 'mkdir -p /run/sshd && mount --bind "$1" /etc/shadow && exec "$2" -D -e -f "$3"',
                    "sh", str(shadow), SSHD, str(config)], stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: "Server listening" in log.read_text(), 10, f"sshd on {host.name}",
               on_fail=lambda: log.read_text())
    kind, key_b64, *_ = (where / "host_key.pub").read_text().split()
    return f"{host.underlay4} {kind} {key_b64}"


class Deployed:
    """The SSH hosts, the inventory and what deploy started (stopped by PID at the end)."""

    def __init__(self, mesh: Mesh, tmp: Path, wheelhouse: Path, hosts: dict[str, Host]) -> None:
        self.mesh, self.tmp, self.wheelhouse, self.hosts = mesh, tmp, wheelhouse, hosts
        self.inventory = tmp / "hosts.yaml"

    def place(self, name: str) -> dict[str, Path]:
        base = self.tmp / "hosts" / name
        return {"install_dir": base / "opt", "state": base / "state", "socket": base / "meshd.sock",
                "pidfile": base / "state" / "meshd.pid"}

    def write_inventory(self, known_hosts: Path, wrong_password: set[str]) -> None:
        lines = ["defaults:", "  user: root", f"  password: {PASSWORD}", f"  known_hosts: {known_hosts}",
                 "  tags: [e2e]", "  service: process", "  connect_timeout: 10", "hosts:"]
        for name, host in self.hosts.items():
            p = self.place(name)
            lines += [f"  {name}:", f"    address: {host.underlay4}", f"    interface: {host.wg_ifname}",
                      f"    install_dir: {p['install_dir']}", f"    state: {p['state']}", f"    socket: {p['socket']}"]
            if name in wrong_password:
                lines.append("    password: not-the-password")
        self.inventory.write_text("\n".join(lines) + "\n")

    def deploy(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {**self.mesh.env, "PYTHONPATH": str(REPO)}
        argv = [str(Path(sys.executable).parent / "meshctl"), "deploy", "--inventory", str(self.inventory),
                "--wheelhouse", str(self.wheelhouse), *args]
        return self.mesh.controller_host.run(argv, env=env, check=False, timeout=timeout)

    def pid(self, name: str) -> int | None:
        try:
            return int(self.place(name)["pidfile"].read_text().strip())
        except (OSError, ValueError):
            return None

    def meshd_processes(self, name: str) -> list[int]:
        """Live ``meshd run`` processes for this host's state directory (there must be exactly one)."""
        state = str(self.place(name)["state"])
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                status = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if status != "Z" and "run" in argv and state in argv and any(a.endswith("/meshd") for a in argv[:2]):
                found.append(int(entry.name))
        return found

    def stop_all(self) -> None:
        """SIGTERM (meshd removes its interface), then SIGKILL, each meshd by the PID deploy recorded."""
        pids = [p for name in self.hosts for p in {self.pid(name), *self.meshd_processes(name)} if p]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids):
                time.sleep(0.05)

    def status(self, name: str) -> dict[str, Any]:
        out = self.hosts[name].run([cmd("meshctl"), "status", "--json", "--socket", str(self.place(name)["socket"])])
        return dict(json.loads(out.stdout))

    def addresses(self, name: str) -> list[str]:
        return list(json.loads((self.place(name)["state"] / "node.json").read_text())["addresses"])

    def logs(self) -> str:
        out = [self.mesh.logs()]
        for path in sorted(self.tmp.glob("hosts/*/state/meshd.log")) + sorted(self.tmp.glob("ssh/*/sshd.log")):
            out.append(f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-20:]))
        return "\n".join(out)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def deployed(network: Callable[..., Network], tmp_path: Path, wheelhouse: Path) -> Iterator[Deployed]:
    _require({SSHD: "openssh-server", "ssh-keygen": "openssh-client", "openssl": "openssl", "mount": "mount"})
    net = network(4)
    mesh = Mesh(net, tmp_path, net["h1"])
    mesh.init(policy=None)
    mesh.apply_policy(POLICY)
    hosts = {h: net[h] for h in ("h2", "h3", "h4")}
    known = [start_sshd(host, tmp_path / "ssh" / name) for name, host in hosts.items()]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("\n".join(known) + "\n")
    d = Deployed(mesh, tmp_path, wheelhouse, hosts)
    d.write_inventory(known_hosts, wrong_password={"h4"})
    try:
        yield d
    finally:
        d.stop_all()  # before the network goes: by PID, so meshd removes its interface itself


def _by_host(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["host"]: h for h in doc["hosts"]}


def test_deploy_joins_two_hosts_reports_the_third_and_is_idempotent(deployed: Deployed) -> None:
    d = deployed
    first = d.deploy("--json")
    print(first.stdout, first.stderr)  # shown when the test fails
    assert first.returncode == 1, f"one host must fail: {first.stderr}\n{d.logs()}"
    hosts = _by_host(json.loads(first.stdout))

    # h4: the wrong password is reported, with its reason, and changed nothing
    h4 = hosts["h4"]
    assert not h4["ok"] and h4["status"] == "failed" and h4["step"] == "connect"
    assert "authentication failed" in h4["reason"] and "password" in h4["reason"], h4
    assert not d.place("h4")["install_dir"].exists() and not d.place("h4")["state"].exists()

    # h2, h3: installed, enrolled with a token of their own, meshd running
    for name in ("h2", "h3"):
        h = hosts[name]
        assert h["ok"] and h["status"] == "installed", f"{h}\n{d.logs()}"
        assert h["actions"] == ["install", "enroll", "start"]
        assert h["node"]["name"] == name and h["meshd_pid"] == d.pid(name)
        assert d.meshd_processes(name) == [d.pid(name)]
    nodes = {n["name"]: n for n in json.loads(d.mesh.admin("nodes", "list", "--json").stdout)}
    assert set(nodes) == {"h2", "h3"} and all(n["tags"] == ["e2e"] for n in nodes.values())
    tokens = json.loads(d.mesh.admin("token", "list", "--json").stdout)
    assert len(tokens) == 2 and all(not t["reusable"] and t["uses"] == 1 for t in tokens)

    # they are in the mesh: connected, and traffic passes over the overlay both ways, IPv4 and IPv6
    for name in ("h2", "h3"):
        wait_until(lambda name=name: d.status(name)["controller"]["connected"], 30, f"{name} connected",
                   on_fail=d.logs)
    h2_v4, h2_v6 = d.addresses("h2")
    h3_v4, h3_v6 = d.addresses("h3")
    wait_until(lambda: ping(d.hosts["h2"], h3_v4), 30, "h2 -> h3 over the overlay", on_fail=d.logs)
    assert ping(d.hosts["h3"], h2_v4) and ping(d.hosts["h2"], h3_v6) and ping(d.hosts["h3"], h2_v6)

    # a second run changes nothing: no token, no second meshd, same pids; h4 still reported
    pids = {name: d.pid(name) for name in ("h2", "h3")}
    again = d.deploy()
    print(again.stdout, again.stderr)
    assert again.returncode == 1, again.stderr
    text = again.stdout
    for name in ("h2", "h3"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{name}: ok:"))
        assert "unchanged" in line and f"already enrolled as {name}" in line and "up to date" in line, text
    assert any(ln.startswith("h4: FAILED: connect: authentication failed") for ln in text.splitlines()), text
    assert "3 host(s): 2 unchanged, 1 failed; failed: h4" in text
    assert len(json.loads(d.mesh.admin("token", "list", "--json").stdout)) == 2
    for name in ("h2", "h3"):
        assert d.pid(name) == pids[name] and d.meshd_processes(name) == [pids[name]]

    # the healthy hosts alone: exit status 0, all unchanged
    alone = d.deploy("--limit", "h2", "--limit", "h3", "--json")
    assert alone.returncode == 0, alone.stderr
    doc = json.loads(alone.stdout)
    assert doc["ok"] and [h["status"] for h in doc["hosts"]] == ["unchanged", "unchanged"]
    assert all(h["actions"] == [] for h in doc["hosts"])


# -- meshd.service's sandbox, tried for real ------------------------------------------------------------------------
CONFINED_POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:read"]
    max_ttl: 1h
acls:
  - from: {tag: e2e}
    to: ["tag:e2e"]
    protocol: [tcp, udp, icmp]
"""
# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): the kernel's form of MemoryDenyWriteExecute=yes (Linux 6.3+)
DENY_WRITE_EXECUTE = ("import ctypes,os,sys\n"
                      "libc = ctypes.CDLL(None, use_errno=True)\n"
                      "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
                      "    sys.exit('PR_SET_MDWE: ' + os.strerror(ctypes.get_errno()))\n"
                      "os.execv(sys.argv[1], sys.argv[1:])\n")
CAP_NUMBERS = {"chown": 0, "dac_override": 1, "kill": 5, "net_admin": 12, "net_raw": 13}


def unit_capabilities() -> list[str]:
    """meshd.service's CapabilityBoundingSet, as setpriv names them (net_admin, ...)."""
    text = (REPO / "systemd" / "meshd.service").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("CapabilityBoundingSet="))
    return sorted(c.lower().removeprefix("cap_") for c in line.partition("=")[2].split())


def _cap_set(pid: int, field: str) -> set[int]:
    value = next(ln.split()[1] for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                 if ln.startswith(field + ":"))
    return {bit for bit in range(64) if int(value, 16) >> bit & 1}


def test_meshd_works_with_only_the_units_capabilities(network: Callable[..., Network], tmp_path: Path) -> None:
    """meshd as systemd would run it: cgroup2 already mounted, the unit's bounding set and nothing else, no new
    privileges, no writable+executable memory. Tunnels, the firewall, an agent run --user (CAP_CHOWN for its key
    files, CAP_DAC_OVERRIDE to remove them) and a clean stop all work."""
    _require({"setpriv": "util-linux", "mount": "mount"})
    caps = unit_capabilities()
    assert set(caps) <= set(CAP_NUMBERS), f"update CAP_NUMBERS for {caps}"
    net = network(3)
    mesh = Mesh(net, tmp_path, net["h1"])
    mesh.init(policy=CONFINED_POLICY)
    agents = mesh.enroll(net["h2"], "agents", "--tag", "e2e", "--tag", "agents")
    db = mesh.enroll(net["h3"], "db", "--tag", "e2e")
    for node in (agents, db):
        with node.log.open("a") as log:
            node.proc = node.host.popen(
                ["sh", "-c", 'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"', "sh",
                 "setpriv", "--bounding-set", "-all," + ",".join(f"+{c}" for c in caps), "--inh-caps=-all",
                 "--no-new-privs", "--", sys.executable, "-c", DENY_WRITE_EXECUTE, cmd("meshd"), "run",
                 "--state", str(node.state), "--interface", node.host.wg_ifname, "--socket", str(node.socket)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda node=node: node.socket.exists(), 20, f"{node.name}'s local API", on_fail=mesh.logs)
    mesh.wait_converged()
    assert agents.proc is not None
    expected = {CAP_NUMBERS[c] for c in caps}
    assert _cap_set(agents.proc.pid, "CapBnd") == expected and _cap_set(agents.proc.pid, "CapEff") == expected
    assert "Comm:\tmeshd" in Path(f"/proc/{agents.proc.pid}/status").read_text() or \
        "meshd" in Path(f"/proc/{agents.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert ping(agents.host, db.addresses[0]) and ping(db.host, agents.addresses[1])

    def agent_as_nobody() -> tuple[subprocess.Popen[str], int, Path, str]:
        probe = ("import os,sys; print(os.getuid(), os.environ['IDMESH_AGENT_KEY'], os.environ['IDMESH_AGENT_ID'], "
                 "flush=True); sys.stdin.readline()")
        proc = agents.host.popen([cmd("meshctl"), "agent", "run", "--socket", str(agents.socket), "-q", "--user",
                                  "nobody", "--principal", "nikita@acme.com", "--scope", "db:read", "--",
                                  "/usr/bin/python3", "-c", probe],  # nobody cannot reach this test's venv
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        uid, key, agent_id = proc.stdout.readline().split()
        return proc, int(uid), Path(key), agent_id

    # CAP_CHOWN: the agent (nobody) owns its key files; CAP_DAC_OVERRIDE: meshd removes them when it ends
    proc, uid, key, _ = agent_as_nobody()
    assert uid == key.stat().st_uid == key.parent.stat().st_uid != 0
    assert proc.stdin is not None
    proc.stdin.write("done\n")
    proc.stdin.close()
    assert proc.wait(30) == 0
    wait_until(lambda: not key.parent.exists(), 10, "the agent's files removed", on_fail=mesh.logs)

    # no CAP_KILL, yet a revoked agent of another user is killed (cgroup.kill)
    proc, uid, key, agent_id = agent_as_nobody()
    mesh.admin("agent", "revoke", agent_id)
    assert proc.wait(30) == -signal.SIGKILL
    wait_until(lambda: not key.parent.exists(), 10, "the revoked agent's files removed", on_fail=mesh.logs)

    for node in (agents, db):
        assert mesh.stop(node) == 0, mesh.logs()
    assert "Traceback" not in mesh.logs() and "Operation not permitted" not in mesh.logs(), mesh.logs()
