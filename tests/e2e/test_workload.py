"""The SPIFFE Workload API end to end (issue 17): py-spiffe inside agents started by ``meshctl agent run``.

Nothing in the agents' program (tests/e2e/spiffe_agent.py) knows idmesh: it
finds the Workload API through SPIFFE_ENDPOINT_SOCKET as every SPIFFE
program does. The controller's X509-SVIDs live 12 s here, so the rotation
can be watched inside one test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest

from tests.e2e.mesh import Mesh, Node, cmd, wait_until
from tests.e2e.netns import Network

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["svc:*"]
    max_ttl: 1h
services:
  svc: {nodes: [tag:agents], ports: [8443]}
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "svc:call"}
    to: [svc]
"""
PROGRAM = str(Path(__file__).with_name("spiffe_agent.py"))
SUB_AGENT = ("import subprocess, sys\n"  # an agent that prints its own SVID's ID, then a sub-agent's
             "meshctl, socket, program = sys.argv[1:]\n"
             "subprocess.run([sys.executable, program, 'ids'], check=True)\n"
             "subprocess.run([meshctl, 'agent', 'run', '--socket', socket, '-q', '--principal', 'nikita@acme.com',\n"
             "                '--scope', 'svc:call', '--name', 'child', '--', sys.executable, program, 'ids'], check=True)\n")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Node, Node]]:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    with Network(3) as net:
        mesh = Mesh(net, tmp_path_factory.mktemp("workload"), net["h1"],
                    serve=[cmd("mesh-controller"), "serve", "--svid-ttl", "12s"])
        mesh.init(policy=POLICY)
        a = mesh.enroll(net["h2"], "a", "--tag", "agents")
        b = mesh.enroll(net["h3"], "b", "--tag", "agents")
        for node in (a, b):
            mesh.start(node)
        mesh.wait_converged()
        yield mesh, a, b


def agent(node: Node, name: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return node.host.popen([cmd("meshctl"), "agent", "run", "--socket", str(node.socket), "-q", "--principal",
                            "nikita@acme.com", "--scope", "svc:call", "--ttl", "10m", "--name", name, "--",
                            sys.executable, *args], stdout=subprocess.PIPE, stdin=stdin, text=True)


def said(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the agent said nothing (exit {proc.poll()})"
    return dict(json.loads(line))


def workload_socket(node: Node) -> Path:
    return node.socket.with_name(f"{node.socket.stem}-workload.sock")


def test_two_agents_on_two_nodes_talk_mtls_from_py_spiffe_sources_while_their_svids_rotate(
        lab: tuple[Mesh, Node, Node]) -> None:
    mesh, a, b = lab
    server = agent(b, "server", PROGRAM, "server", "8443")
    try:
        server_id = said(server)["ready"]
        assert server_id.startswith("spiffe://acme.mesh/agent/")
        client = agent(a, "client", PROGRAM, "client", f"{b.addresses[0]}:8443", "16")
        out = said(client)
        assert client.wait(30) == 0
    finally:
        server.kill()
        server.wait()
    assert out["server"] == server_id  # each side saw the other's SPIFFE ID
    assert out["greeting"] == f"hello {out['id']} from {server_id}"
    assert out["jwt_id"] == out["id"]
    assert out["echoes"] >= 25  # the connection kept working while the SVID rotated under it
    assert len(out["svids"]) >= 2, out["svids"]  # renewed at half of a 12 s life: at least once in 16 s
    assert out["again"].startswith(f"hello {out['id']} from")  # a new connection with the rotated SVIDs
    jwks = json.loads(mesh.net["h1"].run(["curl", "-sk", "https://127.0.0.1:8443/.well-known/jwks.json"]).stdout)
    key = pyjwt.PyJWKSet.from_dict(jwks).keys[0]
    claims = pyjwt.decode(out["jwt"], key.key, algorithms=["ES256"], audience="db")  # an independent library
    assert claims["sub"] == out["id"] and claims["principal"] == "nikita@acme.com" and claims["scopes"] == ["svc:call"]
    assert claims["exp"] - claims["iat"] <= 300
    with pytest.raises(pyjwt.InvalidAudienceError):
        pyjwt.decode(out["jwt"], key.key, algorithms=["ES256"], audience="someone-else")


def test_an_agent_gets_its_own_svid_and_never_another_agents_and_a_sub_agent_its_own(lab: tuple[Mesh, Node, Node]) -> None:
    _mesh, a, _b = lab
    first = agent(a, "first", PROGRAM, "ids")
    mine = said(first)["id"]
    assert first.wait(20) == 0
    second = agent(a, "second", PROGRAM, "ids", mine)
    out = said(second)
    assert second.wait(20) == 0
    assert out["id"] != mine and out["id"].startswith("spiffe://acme.mesh/agent/")
    assert "PERMISSION_DENIED" in out["other"] or "no identity issued" in out["other"], out
    child = agent(a, "parent", "-c", SUB_AGENT, cmd("meshctl"), str(a.socket), PROGRAM)
    parent_id, child_id = said(child)["id"], said(child)["id"]
    assert child.wait(30) == 0
    assert parent_id != child_id and child_id.startswith("spiffe://acme.mesh/agent/")  # its own cgroup, its own SVID


def test_a_process_outside_every_agent_is_refused_and_so_is_a_call_without_the_security_header(
        lab: tuple[Mesh, Node, Node]) -> None:
    _mesh, a, _b = lab
    probe = ("import grpc, sys\n"
             "from spiffe._proto import workload_pb2 as pb, workload_pb2_grpc as g\n"
             "stub = g.SpiffeWorkloadAPIStub(grpc.insecure_channel(sys.argv[1]))\n"
             "for md in ([('workload.spiffe.io', 'true')], []):\n"
             "    try:\n"
             "        next(stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=md, timeout=5))\n"
             "        print('issued')\n"
             "    except grpc.RpcError as e:\n"
             "        print(e.code().name, e.details())\n")
    done = a.host.run([sys.executable, "-c", probe, f"unix://{workload_socket(a)}"])
    lines = done.stdout.splitlines()
    assert lines[0].startswith("PERMISSION_DENIED no identity issued"), lines
    assert lines[1] == "INVALID_ARGUMENT security header missing from request", lines
    assert stat_mode(workload_socket(a)) == 0o666  # anyone may ask: the kernel says who asked


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_revoked_agents_stream_ends_and_it_gets_no_svid_after(lab: tuple[Mesh, Node, Node]) -> None:
    mesh, a, _b = lab
    # "sleep" keeps the agent's cgroup populated after the program leaves it (root can: see the README)
    proc = a.host.popen([cmd("meshctl"), "agent", "run", "--socket", str(a.socket), "-q", "--principal",
                         "nikita@acme.com", "--scope", "svc:call", "--name", "revoked", "--", "sh", "-c",
                         f"sleep 300 & exec {sys.executable} {PROGRAM} escape"],
                        stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        first = said(proc)
        assert first["escaped"]
        agent_id = first["id"].rsplit("/", 1)[1]
        mesh.admin("agent", "revoke", agent_id)
        wait_until(lambda: agent_id not in a.host.run([cmd("meshctl"), "agent", "list", "--json", "--socket",
                                                       str(a.socket)]).stdout, 10, "the agent to end", mesh.logs)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = said(proc)
    finally:
        proc.kill()
        proc.wait()
    assert any("PERMISSION_DENIED" in e or "ended" in e for e in out["stream"]), out
    assert "PERMISSION_DENIED" in out["fetch_after"] or "no identity" in out["fetch_after"], out


def test_jwt_svids_are_validated_for_their_audience_by_the_workload_api(lab: tuple[Mesh, Node, Node]) -> None:
    _mesh, a, _b = lab
    probe = ("from spiffe import WorkloadApiClient\n"
             "with WorkloadApiClient() as api:\n"
             "    token = api.fetch_jwt_svid(audience={'db'}).token\n"
             "    print(api.validate_jwt_svid(token, 'db').spiffe_id)\n"
             "    try:\n"
             "        api.validate_jwt_svid(token, 'web'); print('accepted')\n"
             "    except Exception as e: print('refused', e)\n"
             "    try:\n"
             "        api.validate_jwt_svid(token[:-4] + 'AAAA', 'db'); print('accepted')\n"
             "    except Exception as e: print('refused', e)\n")
    proc = agent(a, "jwt", "-c", probe)
    assert proc.stdout is not None
    lines = proc.stdout.read().splitlines()
    assert proc.wait(20) == 0
    assert lines[0].startswith("spiffe://acme.mesh/agent/"), lines
    assert lines[1].startswith("refused") and lines[2].startswith("refused"), lines

