"""Principals prove who they are, end to end (SPEC §6): a person logs in through a real OpenID provider, signs a
grant, and an agent born from it writes to db where the node's word alone is refused.

The mesh is the seed policy (examples/policy.yaml: Nikita's delegation ``requires_grant: ["db:write"]``; a
grant-authorized db:write agent may reach db-admin). The provider is panva's oidc-provider, run inside the
controller's namespace on its underlay address; the person approving at it plays from there too. Nikita is a
local user of the agents host without an account (uid 4242, via setpriv), in the group of meshd's socket:
nothing she does needs root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.mesh import Mesh, Node, cmd, tcp_server, wait_until
from tests.e2e.netns import Network
from tests.oidc import OidcProvider, default_settings, start_oidc_provider

ROOT = Path(__file__).resolve().parents[2]
SEED = (ROOT / "examples" / "policy.yaml").read_text()
NIKITA, STRANGER, MAPPED = 4242, 4343, 4444
HELLO = ("import os,socket,sys\n"
         "c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
         "print(c.recv(100).decode().strip(), os.environ['IDMESH_AGENT_ADDRESS'], open(os.environ['IDMESH_AGENT_KEY']).read()[:5])\n")


@dataclass
class Lab:
    mesh: Mesh
    agents: Node
    db: Node
    provider: OidcProvider
    home: Path
    """Nikita's IDMESH_USER_STATE (hers: uid 4242)."""

    def as_user(self, uid: int, *argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "IDMESH_SOCKET": str(self.agents.socket), "IDMESH_USER_STATE": str(self.home)}
        return self.agents.host.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                     cmd("meshctl"), *argv], env=env, check=check, timeout=timeout)

    def login(self, uid: int = NIKITA, person: str = "nikita@acme.com") -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "IDMESH_SOCKET": str(self.agents.socket), "IDMESH_USER_STATE": str(self.home)}
        proc = self.agents.host.popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                       cmd("meshctl"), "login", "--json"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        url = ""
        for line in proc.stderr:
            if line.startswith("To log in, open "):
                url = line.removeprefix("To log in, open ").strip()
                break
        assert url.startswith(self.provider.issuer), url
        played = self.mesh.controller_host.run(
            [sys.executable, "-m", "tests.oidc.person", "approve", url, "--issuer", self.provider.issuer,
             "--ca", str(self.provider.ca_file), "--login", person], env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False)
        assert played.returncode == 0, played.stderr
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    from tests.e2e.conftest import require_e2e
    from tests.oidc import missing_prerequisites
    from tests.prerequisites import require

    require_e2e()
    require("the OpenID provider for the principal tests", missing_prerequisites())
    home = Path(tempfile.mkdtemp(prefix="idmesh-nikita-"))
    os.chown(home, NIKITA, NIKITA)
    tmp = Path(tempfile.mkdtemp(prefix="idmesh-principals-"))  # not pytest's: its base is root's alone (0700)
    tmp.chmod(0o711)  # others may reach the meshd socket inside, not list the directory
    try:
        with Network(3) as net:
            h1 = net["h1"]
            with start_oidc_provider(tmp / "oidc", default_settings(), host=h1.underlay4, port=9443,
                                     prefix=["ip", "netns", "exec", h1.netns]) as provider:
                mesh = Mesh(net, tmp, h1)
                mesh.init(policy=SEED)
                secret = tmp / "oidc-secret"
                secret.write_text(provider.client_secret)
                secret.chmod(0o600)
                h1.run([cmd("mesh-controller"), "oidc", "set", "--data", str(tmp / "ctl"), "--issuer", provider.issuer,
                        "--client-id", provider.client_id, "--client-secret-file", str(secret),
                        "--ca-file", str(provider.ca_file)])
                agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
                db = mesh.enroll(net["h3"], "db", "--tag", "db")
                mesh.start(agents, "--principal-map", f"{MAPPED}=nikita@acme.com")
                mesh.start(db)
                mesh.wait_converged()
                os.chown(agents.socket, 0, NIKITA)  # her group may use meshd's socket (as a deployment would)
                for port in (5432, 5433):
                    tcp_server(db.host, "::", port)
                yield Lab(mesh, agents, db, provider, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_person_logs_in_through_the_openid_provider_from_a_shared_node(lab: Lab) -> None:
    done = lab.login()
    assert done.returncode == 0, done.stderr
    me = json.loads(done.stdout)
    assert me["principal"] == "nikita@acme.com" and me["device"] == "agents" and not me["expired"]
    key = lab.home / "principal.key"
    assert key.stat().st_uid == NIKITA and key.stat().st_mode & 0o777 == 0o600
    verified = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(lab.home / "ca.crt"),
                               str(lab.home / "principal.crt")], capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stderr
    assert "nikita@acme.com on agents" in lab.as_user(NIKITA, "whoami", check=True).stdout


def test_her_grant_lets_her_agent_write_where_the_nodes_word_is_refused(lab: Lab) -> None:
    if not (lab.home / "login.json").exists():
        assert lab.login().returncode == 0
    refused = lab.agents.host.run([cmd("meshctl"), "agent", "run", "--socket", str(lab.agents.socket), "-q",
                                   "--principal", "nikita@acme.com", "--scope", "db:write", "--", "true"], check=False)
    assert refused.returncode == 5 and "needs a grant from nikita@acme.com" in refused.stderr  # root, no grant
    grant = lab.as_user(NIKITA, "grant", "create", "--node", "agents", "--scope", "db:write", "--ttl", "10m",
                        "--uses", "2", check=True).stdout.strip()
    seen = lab.as_user(NIKITA, "agent", "run", "--grant", grant, "--scope", "db:write", "--ttl", "5m", "-q", "--",
                       "/usr/bin/python3", "-c", HELLO, lab.db.addresses[0], "5433")  # hers to run (not /root's venv)
    assert seen.returncode == 0, seen.stderr
    greeting, peer, own, key_head = seen.stdout.split()
    assert greeting == "hello" and peer.removeprefix("::ffff:") == own  # db-admin saw the agent's own address
    assert key_head == "-----"  # the agent's key file is hers, readable by her agent
    rows = json.loads(lab.mesh.admin("audit", "--action", "agent.issued", "--json").stdout)
    assert rows[-1]["detail"]["authorized_by"].startswith("nikita@acme.com (grant g")


def test_an_agent_born_from_a_grant_says_so_to_the_receiving_node(lab: Lab) -> None:
    if not (lab.home / "login.json").exists():
        assert lab.login().returncode == 0
    grant = lab.as_user(NIKITA, "grant", "create", "--node", "tag:agents", "--scope", "db:write", check=True).stdout
    proc = lab.agents.host.popen(["setpriv", f"--reuid={NIKITA}", f"--regid={NIKITA}", "--clear-groups",
                                  cmd("meshctl"), "agent", "run", "--grant", grant.strip(), "--scope", "db:write",
                                  "--name", "writer", "-q", "--", "sleep", "60"],
                                 env={"PATH": "/usr/bin:/bin", "IDMESH_SOCKET": str(lab.agents.socket)})

    def whois_writer() -> dict[str, str] | None:
        listed = json.loads(lab.agents.host.run([cmd("meshctl"), "agent", "list", "--json", "--socket",
                                                 str(lab.agents.socket)]).stdout)
        writer = next((a for a in listed if a["name"] == "writer"), None)
        if writer is None:
            return None
        done = lab.db.host.run([cmd("meshctl"), "whois", writer["addresses"][0], "--socket", str(lab.db.socket),
                                "--json"], check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    seen = wait_until(whois_writer, 20, "db to honor the grant-born agent", lab.mesh.logs)
    assert seen["authorized_by"].startswith("nikita@acme.com (grant g")
    assert "authorized by nikita@acme.com (grant" in lab.db.host.run(
        [cmd("meshctl"), "whois", seen["addresses"][0], "--socket", str(lab.db.socket)]).stdout
    proc.terminate()
    proc.wait(20)


def test_a_local_user_may_speak_for_a_principal_only_if_mapped_or_granted(lab: Lab) -> None:
    os.chown(lab.agents.socket, 0, STRANGER)
    try:
        refused = lab.as_user(STRANGER, "agent", "run", "--principal", "nikita@acme.com", "--scope", "db:read",
                              "--", "true")
        assert refused.returncode == 5
        assert ("uid 4343 may not start agents for nikita@acme.com without a grant (it is mapped to no principal"
                in refused.stderr)
        os.chown(lab.agents.socket, 0, MAPPED)
        allowed = lab.as_user(MAPPED, "agent", "run", "--principal", "nikita@acme.com", "--scope", "db:read", "-q",
                              "--", "true")
        assert allowed.returncode == 0, allowed.stderr
        elsewhere = lab.as_user(MAPPED, "agent", "run", "--principal", "li@acme.com", "--scope", "db:read", "--",
                                "true")
        assert elsewhere.returncode == 5 and "it is mapped to nikita@acme.com" in elsewhere.stderr
        chown = lab.as_user(MAPPED, "agent", "run", "--principal", "nikita@acme.com", "--scope", "db:read",
                            "--user", "root", "--", "true")
        assert chown.returncode == 5 and "only root may give an agent's key files to another user" in chown.stderr
    finally:
        os.chown(lab.agents.socket, 0, NIKITA)


def test_logging_out_stops_new_births_from_her_grants(lab: Lab) -> None:
    if not (lab.home / "login.json").exists():
        assert lab.login().returncode == 0
    grant = lab.as_user(NIKITA, "grant", "create", "--node", "agents", "--scope", "db:write", check=True).stdout.strip()
    out = lab.as_user(NIKITA, "logout", check=True).stdout
    assert "logged out nikita@acme.com" in out
    refused = lab.as_user(NIKITA, "agent", "run", "--grant", grant, "--scope", "db:write", "--", "true")
    assert refused.returncode == 5 and "revoked" in refused.stderr
    assert lab.as_user(NIKITA, "whoami").returncode == 3
