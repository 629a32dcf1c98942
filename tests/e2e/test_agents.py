"""Per-agent identity end to end (SPEC §1, §3, §5): an agent's packets carry
its own address, the receiving node decides from the certificate it checked,
and revocation, expiry and the agent's exit end the identity everywhere."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.mesh import Mesh, Node, cmd, tcp_hello, tcp_server, wait_until
from tests.e2e.netns import Network

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:read", "db:write", "web:*"]
    max_ttl: 1h
services:
  db: {nodes: [tag:db], ports: [5432]}
  db-admin: {nodes: [tag:db], ports: [5433]}
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: [db]
"""
HELLO = ("import socket,sys\n"
         "try:\n"
         "    print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).recv(100).decode().strip())\n"
         "except OSError as e: print('failed', e); sys.exit(3)\n")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Node, Node]]:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    with Network(3) as net:
        mesh = Mesh(net, tmp_path_factory.mktemp("agents"), net["h1"])
        mesh.init(policy=POLICY)
        agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
        db = mesh.enroll(net["h3"], "db", "--tag", "db")
        for node in (agents, db):
            mesh.start(node)
        mesh.wait_converged()
        for port in (5432, 5433):
            tcp_server(db.host, "::", port)
        yield mesh, agents, db


def run_agent(node: Node, *command: str, scopes: tuple[str, ...] = ("db:read",), ttl: str = "10m",
              principal: str = "nikita@acme.com", name: str = "t", check: bool = False,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [cmd("meshctl"), "agent", "run", "--socket", str(node.socket), "--principal", principal, "--ttl", ttl,
            "--name", name, "-q"]
    for scope in scopes:
        argv += ["--scope", scope]
    return node.host.run([*argv, "--", *command], check=check, timeout=timeout)


def whois(node: Node, address: str) -> dict[str, object] | None:
    done = node.host.run([cmd("meshctl"), "whois", address, "--json", "--socket", str(node.socket)], check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def local_agents(node: Node) -> list[dict[str, object]]:
    return list(json.loads(node.host.run([cmd("meshctl"), "agent", "list", "--json", "--socket",
                                          str(node.socket)]).stdout))


def named_agent(mesh: Mesh, node: Node, name: str) -> dict[str, Any]:
    """The node's agent called ``name`` (an earlier test's agent may still be on its way out)."""
    return dict(wait_until(lambda: [a for a in local_agents(node) if a["name"] == name], 20, f"agent {name}",
                           mesh.logs)[0])


def sleeping_agent(mesh: Mesh, node: Node, name: str, *flags: str,
                   seconds: int = 120) -> tuple[subprocess.Popen[Any], dict[str, Any]]:
    """A db:read agent of nikita's named ``name`` that sleeps, once its node lists it: its process and itself."""
    proc = node.host.popen([cmd("meshctl"), "agent", "run", "--socket", str(node.socket), "-q", "--principal",
                            "nikita@acme.com", "--scope", "db:read", *flags, "--name", name, "--",
                            "sleep", str(seconds)])
    return proc, named_agent(mesh, node, name)


def test_an_agent_reaches_db_with_its_own_address_and_only_where_its_scope_allows(
        lab: tuple[Mesh, Node, Node]) -> None:
    _mesh, agents, db = lab
    seen = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[0], "5432", check=True).stdout.strip()
    seen = seen.replace("::ffff:", "")  # the server listens dual-stack
    assert seen.startswith("hello 100.64.") and seen != f"hello {agents.addresses[0]}"  # not the node's address
    six = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[1], "5432", check=True).stdout.strip()
    assert six.startswith("hello fd") and six != f"hello {agents.addresses[1]}"
    denied = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[0], "5433")  # db-admin: no rule
    assert denied.returncode == 3
    assert tcp_hello(agents.host, db.addresses[0], 5432, timeout=2) is None  # the node itself: no rule
    writer = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[0], "5432", scopes=("db:write",))
    assert writer.returncode == 3  # the scope decides, on the receiving node


def test_the_receiving_node_knows_who_is_connecting(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, db = lab
    probe = ("import os,json,sys; print(json.dumps({k: v for k, v in os.environ.items() "
             "if k.startswith('IDMESH_')})); sys.stdout.flush(); import time; time.sleep(3)")
    proc = agents.host.popen([cmd("meshctl"), "agent", "run", "--socket", str(agents.socket), "-q", "--principal",
                              "nikita@acme.com", "--scope", "db:read", "--scope", "web:read", "--name", "whoami",
                              "--", sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    env = json.loads(proc.stdout.readline())
    assert {"IDMESH_AGENT_ID", "IDMESH_AGENT_CERT", "IDMESH_AGENT_KEY", "IDMESH_AGENT_ADDRESS", "IDMESH_CA"} <= set(env)
    assert Path(env["IDMESH_AGENT_KEY"]).stat().st_mode & 0o077 == 0
    info = wait_until(lambda: whois(db, env["IDMESH_AGENT_ADDRESS"]), 5, "db to honor the agent", mesh.logs)
    assert info["kind"] == "agent" and info["agent"] == env["IDMESH_AGENT_ID"] and info["node"] == "agents"
    assert info["principal"] == "nikita@acme.com" and info["scopes"] == ["db:read", "web:read"]
    assert proc.wait(30) == 0
    # the command exited: its identity is retired everywhere
    wait_until(lambda: whois(db, env["IDMESH_AGENT_ADDRESS"]) is None, 5, "db to forget the agent", mesh.logs)
    assert all(a["id"] != env["IDMESH_AGENT_ID"] for a in local_agents(agents))


def test_exit_codes_and_signals_are_the_commands_own(lab: tuple[Mesh, Node, Node]) -> None:
    _mesh, agents, _db = lab
    assert run_agent(agents, sys.executable, "-c", "import sys; sys.exit(42)").returncode == 42
    proc = agents.host.popen([cmd("meshctl"), "agent", "run", "--socket", str(agents.socket), "-q", "--principal",
                              "nikita@acme.com", "--scope", "db:read", "--", sys.executable, "-c",
                              ("import signal,sys,time\n"
                              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(17))\n"
                              "print('up', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    subprocess.run(["kill", "-TERM", str(_child_of(proc.pid))], check=True)
    assert proc.wait(20) == 17


def _child_of(pid: int) -> int:
    """``ip netns exec`` runs the command as its child (or execs it): find the process that is ours."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


def test_a_missing_delegation_is_a_clear_refusal(lab: tuple[Mesh, Node, Node]) -> None:
    _mesh, agents, _db = lab
    refused = run_agent(agents, "true", principal="li@acme.com")
    assert refused.returncode == 5
    assert refused.stderr.strip() == "meshctl: error: no delegation lets any node mint agents for li@acme.com"
    too_long = run_agent(agents, "true", ttl="2h")
    assert too_long.returncode == 5 and "exceeds the delegation's max_ttl 1h" in too_long.stderr
    assert local_agents(agents) == []


def test_sub_agents_are_attenuated_and_die_with_their_parent(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, db = lab
    # greedy first: once the child is listed, greedy's refusal is already in the pipes (revoking the
    # parent kills this shell, so nothing after the revocation may be needed)
    sub = (f"{cmd('meshctl')} agent run -q --principal nikita@acme.com --scope db:write --name greedy -- true; "
           f"echo greedy=$?; {cmd('meshctl')} agent run -q --principal nikita@acme.com --scope web:read "
           f"--name child -- sleep 60 & wait")
    proc = agents.host.popen([cmd("meshctl"), "agent", "run", "--socket", str(agents.socket), "-q", "--principal",
                              "nikita@acme.com", "--scope", "db:read", "--scope", "web:*", "--name", "parent",
                              "--ttl", "10m", "--", "sh", "-c", sub], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={"IDMESH_SOCKET": str(agents.socket), "PATH": "/usr/bin:/bin"})
    listed = wait_until(lambda: len(local_agents(agents)) == 2 and local_agents(agents), 20, "parent and child",
                        mesh.logs)
    parent = next(a for a in listed if a["name"] == "parent")
    child = next(a for a in listed if a["name"] == "child")
    assert child["parent"] == parent["id"] and child["scopes"] == ["web:read"]
    assert child["expires"] <= parent["expires"]
    mesh.admin("agent", "revoke", parent["id"])
    out, err = proc.communicate(timeout=30)
    assert "greedy=5" in out and "exceed its parent's" in err
    wait_until(lambda: local_agents(agents) == [], 10, "both agents gone", mesh.logs)
    assert whois(db, child["addresses"][0]) is None


def test_revocation_reaches_every_node_and_kills_the_agent(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, db = lab
    proc, agent = sleeping_agent(mesh, agents, "victim")
    wait_until(lambda: whois(db, agent["addresses"][0]), 5, "db honors it", mesh.logs)
    t0 = time.monotonic()
    mesh.admin("agent", "revoke", agent["id"])
    wait_until(lambda: whois(db, agent["addresses"][0]) is None, 5, "db stops honoring it", mesh.logs)
    print(f"db stopped honoring a revoked agent {time.monotonic() - t0:.2f} s after meshctl agent revoke started")
    assert proc.wait(10) == -signal.SIGKILL or proc.returncode != 0


def test_a_process_outside_the_agent_cannot_send_with_its_address(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, db = lab
    proc, agent = sleeping_agent(mesh, agents, "owner", seconds=60)
    spoof = ("import socket,sys\n"
             "s=socket.socket(); s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: root may bind any address\n"
             "s.bind((sys.argv[1], 0)); s.settimeout(2)\n"
             "try: s.connect((sys.argv[2], 5432)); print('connected')\n"
             "except OSError as e: print('blocked', e)\n")
    out = agents.host.run([sys.executable, "-c", spoof, agent["addresses"][0], db.addresses[0]]).stdout
    assert out.startswith("blocked"), out
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


def test_expiry_is_enforced_by_each_node_with_the_controller_down(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, db = lab
    proc, agent = sleeping_agent(mesh, agents, "brief", "--ttl", "8s")
    wait_until(lambda: whois(db, agent["addresses"][0]), 5, "db honors it", mesh.logs)
    mesh.kill_controller()
    try:
        wait_until(lambda: whois(db, agent["addresses"][0]) is None, 20, "db drops it on its own clock", mesh.logs)
        assert proc.wait(20) != 0  # its node killed it at expiry
    finally:
        mesh.start_controller()
        # later tests need every node back on its stream (reconnection backs off up to 30 s)
        wait_until(lambda: all(n.status()["controller"]["connected"] for n in (agents, db)), 60,
                   "nodes reconnected", mesh.logs)


def test_a_denied_agent_connection_appears_in_the_flow_log(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, db = lab
    wait_until(lambda: all(n.status()["controller"]["connected"] for n in (agents, db)), 60,
               "nodes connected (an agent born while db is cut off cannot be verified there)", mesh.logs)
    denied = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[0], "5432", scopes=("db:write",),
                       name="writer")
    assert denied.returncode == 3

    def logged() -> list[dict[str, object]]:
        flows = json.loads(mesh.admin("flows", "--denied", "--principal", "nikita@acme.com", "--json").stdout)
        return [f for f in flows if f["scopes"] == ["db:write"] and f["port"] == 5432]

    flow = wait_until(logged, 15, "the denied connection in the flow log",
                      lambda: mesh.admin("flows", "--json").stdout + mesh.logs())[0]
    assert flow["verdict"] == "deny" and flow["rule"].startswith("default deny")
    assert flow["node"] == "db" and flow["source_node"] == "agents" and flow["agent"]
    assert flow["destination"] == db.addresses[0] and flow["protocol"] == "tcp"
    allowed = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[0], "5432", name="reader")
    assert allowed.returncode == 0
    sampled = wait_until(lambda: [f for f in json.loads(mesh.admin("flows", "--principal", "nikita@acme.com",
                                                                    "--json").stdout)
                                  if f["verdict"] == "allow" and f["scopes"] == ["db:read"]], 15,
                         "a sampled accepted connection",
                         lambda: "\n".join(line for line in mesh.admin("flows").stdout.splitlines()))
    assert sampled[-1]["rule"] == "acls[0]" and sampled[-1]["principal"] == "nikita@acme.com"


def test_a_node_that_crashed_retires_what_its_last_run_left(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, db = lab
    proc, agent = sleeping_agent(mesh, agents, "orphan")
    wait_until(lambda: whois(db, agent["addresses"][0]), 5, "db honors it", mesh.logs)
    mesh.stop(agents, signal.SIGKILL)  # meshd dies: nothing of its own cleanup runs
    mesh.start(agents)
    try:
        assert proc.wait(20) != 0  # the new run took over the cgroups: the orphan's processes are gone
        wait_until(lambda: whois(db, agent["addresses"][0]) is None, 20, "db to stop honoring the orphan", mesh.logs)
        live = json.loads(mesh.admin("agent", "list", "--mesh", "--json").stdout)
        assert agent["id"] not in [a["id"] for a in live]
        wait_until(lambda: "retired 1 agent(s) a previous run of this node left" in agents.log.read_text(), 10,
                   "the node to log what it retired", mesh.logs)  # (logged once the controller has answered)
        again = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[0], "5432", name="again", check=True)
        assert again.stdout.startswith("hello ")  # births work again, addresses included
    finally:
        wait_until(lambda: agents.status()["controller"]["connected"], 60, "agents reconnected", mesh.logs)


def test_a_firewall_table_deleted_behind_meshds_back_is_put_back(
        lab: tuple[Mesh, Node, Node]) -> None:
    """Another admin's ``nft delete table inet idmesh`` opens the node to everyone: meshd puts it back (how fast:
    bench/bench_agents.py)."""
    mesh, agents, db = lab
    assert tcp_hello(agents.host, db.addresses[0], 5432, timeout=1) is None  # the node itself: no rule lets it in
    db.host.run(["nft", "delete", "table", "inet", "idmesh"])
    wait_until(lambda: db.host.run(["nft", "list", "table", "inet", "idmesh"], check=False).returncode == 0, 10,
               "meshd to install its table again", mesh.logs)
    assert tcp_hello(agents.host, db.addresses[0], 5432, timeout=1) is None  # default deny again
    seen = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[0], "5432", check=True).stdout
    assert seen.startswith("hello ")  # and the policy's allows with it
    assert "table inet idmesh was deleted outside meshd" in db.log.read_text()


def test_a_revocation_sent_while_the_agents_node_was_not_listening_still_ends_the_agent(
        lab: tuple[Mesh, Node, Node]) -> None:
    """The revocation never reaches the node (its stream is cut and blocked); when the stream is back, the whole
    agent list it starts with does not hold the agent, and the node ends it. Before, the agent ran on."""
    mesh, agents, _db = lab
    proc, agent = sleeping_agent(mesh, agents, "missed")
    ctl = mesh.controller_host.underlay4
    block = (f"table inet cut {{\n chain out {{ type filter hook output priority 0; ip daddr {ctl} tcp dport 8443 "
             f"reject with tcp reset; }}\n chain in {{ type filter hook input priority 0; ip saddr {ctl} tcp sport "
             f"8443 drop; }}\n}}\n")
    agents.host.run(["nft", "-f", "-"], input=block)
    try:
        agents.host.run(["ss", "-K", "dst", ctl, "dport", "=", "8443"])  # the stream ends; reconnects are refused
        wait_until(lambda: not agents.status()["controller"]["connected"], 10, "the node to notice", mesh.logs)
        mesh.admin("agent", "revoke", agent["id"])
        time.sleep(1)
        assert proc.poll() is None  # it heard nothing
    finally:
        agents.host.run(["nft", "delete", "table", "inet", "cut"])
    assert proc.wait(40) != 0  # back online: the node ended it (its processes die first, then it says so)
    wait_until(lambda: "ended at the controller while this node was not listening" in agents.log.read_text(), 10,
               "the node to log why", mesh.logs)


def agent_elements(node: Node) -> list[str]:
    """The elements of the node's ``inet idmesh_agents`` sets and maps (an agent adds some, its end removes them)."""
    table = json.loads(node.host.run(["nft", "-j", "list", "table", "inet", "idmesh_agents"]).stdout)["nftables"]
    return sorted(json.dumps(e) for obj in table for kind in ("set", "map") if kind in obj
                  for e in obj[kind].get("elem", []))


STORM = """\
import os, sys, threading
from idmesh.local import LocalClient
socket = sys.argv[1]
body = {"principal": "nikita@acme.com", "scopes": ["db:read"], "ttl_seconds": 600, "name": "storm"}
def caller():
    while True:
        pid = os.fork()
        if pid == 0:
            try:
                LocalClient(socket).request("POST", "/v1/agents", body)
                os._exit(0)
            except Exception:
                os._exit(1)
        os.waitpid(pid, 0)
for _ in range(8):
    threading.Thread(target=caller, daemon=True).start()
threading.Event().wait()
"""


def test_meshd_killed_in_a_storm_of_births_leaves_nothing_once_it_runs_again(lab: tuple[Mesh, Node, Node]) -> None:
    """SIGKILL while eight callers are being born and dying: some birth is caught at some step. After the restart
    no agent cgroup, nftables element, agent directory or live agent at the controller is left, and births work."""
    mesh, agents, db = lab
    wait_until(lambda: local_agents(agents) == [], 20, "earlier tests' agents gone", mesh.logs)
    baseline = agent_elements(agents)
    storm = agents.host.popen([sys.executable, "-c", STORM, str(agents.socket)], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: "born at" in agents.log.read_text().rsplit("stopped;", 1)[-1], 20, "births under way",
                   mesh.logs)
        time.sleep(1.5)
        mesh.stop(agents, signal.SIGKILL)
    finally:
        storm.kill()
        storm.wait()
    mesh.start(agents)
    try:
        wait_until(lambda: json.loads(mesh.admin("agent", "list", "--mesh", "--json").stdout) == [], 30,
                   "the controller to hold no agent of the node", mesh.logs)
        directory = agents.socket.parent / f"agents-{agents.host.wg_ifname}"
        assert list(directory.iterdir()) == []
        parents = [Path(root) / f"idmesh-{agents.host.wg_ifname}" for root in ("/sys/fs/cgroup",
                                                                               "/sys/fs/cgroup/unified")]
        assert not [p for parent in parents if parent.is_dir() for p in parent.glob("agent-*")]
        assert agent_elements(agents) == baseline
        again = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[0], "5432", name="after", check=True)
        assert again.stdout.startswith("hello ")
    finally:
        wait_until(lambda: agents.status()["controller"]["connected"], 60, "agents reconnected", mesh.logs)


def test_meshd_killed_while_policies_are_applied_enforces_the_last_one_once_it_runs_again(
        lab: tuple[Mesh, Node, Node]) -> None:
    mesh, agents, db = lab

    def apply_many() -> None:
        for i in range(20):
            mesh.apply_policy(f"# churn {i}\n" + POLICY)

    applying = threading.Thread(target=apply_many)
    applying.start()
    try:
        time.sleep(1.0)
        mesh.stop(db, signal.SIGKILL)  # somewhere in a policy's apply, or between two
    finally:
        applying.join(120)
    mesh.start(db)
    try:
        latest = json.loads(mesh.admin("policy", "show", "--json").stdout)["version"]
        wait_until(lambda: db.status()["policy"]["version"] == latest, 30, "db on the last policy", mesh.logs)
        assert tcp_hello(agents.host, db.addresses[0], 5432, timeout=1) is None  # default deny
        seen = run_agent(agents, sys.executable, "-c", HELLO, db.addresses[0], "5432", name="after", check=True)
        assert seen.stdout.startswith("hello ")  # and the policy's allow
    finally:
        wait_until(lambda: db.status()["controller"]["connected"], 60, "db reconnected", mesh.logs)
