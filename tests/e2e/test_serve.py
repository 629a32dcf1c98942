"""Identity at the application layer end to end (issue 15): ``meshctl serve`` in front of a real MCP server.

The upstream (tests/e2e/mcp_server.py) is built with the ``mcp`` SDK and
logs every request it gets with its ``Idmesh-*`` headers, checking
``Idmesh-Assertion`` with the mesh CA as a real service would; the client
(tests/e2e/mcp_client.py) is the SDK's. Node ``db`` serves the MCP server on
port 8080 and the same upstream as plain HTTP on 8081; ``laptop`` is
Nikita's device, where she acts directly or starts agents.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.mesh import Mesh, Node, cmd, tcp_server, wait_until
from tests.e2e.netns import Network

POLICY = """\
delegations:
  - principal: nikita@acme.com
    nodes: [owner:nikita@acme.com]
    scopes: ["db:*", "web:*"]
    max_ttl: 1h
services:
  db-mcp: {nodes: [tag:db], ports: [8080]}
  web: {nodes: [tag:db], ports: [8081, 8082]}
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: [db-mcp]
    mcp_tools: [query]
  - from: {principal: nikita@acme.com, via: agent, scope: "db:write"}
    to: [db-mcp]
  - from: {principal: nikita@acme.com, via: direct}
    to: [db-mcp, web]
  - from: {principal: nikita@acme.com, via: agent, scope: "web:read"}
    to: [web, "tag:db:8083"]
    http: [{methods: [GET], paths: ["/hello", "/stream"]}]
tests:
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: db-mcp:8080
    tool: drop_table
    expect: deny
  - from: {principal: nikita@acme.com, via: agent, scope: "web:read"}
    to: web:8081
    method: POST
    path: /hello
    expect: deny
"""
HERE = Path(__file__).parent
SERVER, CLIENT = str(HERE / "mcp_server.py"), str(HERE / "mcp_client.py")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Node, Node, Path]]:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    with Network(3) as net:
        tmp = tmp_path_factory.mktemp("serve")
        mesh = Mesh(net, tmp, net["h1"])
        mesh.init(policy=POLICY)
        db = mesh.enroll(net["h2"], "db", "--tag", "db")
        laptop = mesh.enroll(net["h3"], "laptop", "--owner", "nikita@acme.com")
        for node in (db, laptop):
            mesh.start(node)
        mesh.wait_converged()
        requests = tmp / "upstream.jsonl"
        upstream = db.host.popen([sys.executable, SERVER, "--port", "9000", "--log", str(requests),
                                  "--ca", str(db.state / "ca.crt"), "--audience", "db-mcp"],
                                 stdout=subprocess.PIPE, text=True)
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        for port, name in ((8080, "db-mcp"), (8081, "web"), (8082, "down")):
            to = "http://127.0.0.1:9" if name == "down" else "http://127.0.0.1:9000"
            db.host.run([cmd("meshctl"), "serve", "--socket", str(db.socket), "--port", str(port), "--to", to,
                         "--name", name, *(["--mcp"] if name == "db-mcp" else [])])
        yield mesh, db, laptop, requests


def serve_url(db: Node, port: int, path: str = "/mcp") -> str:
    return f"http://{db.addresses[0]}:{port}{path}"


def mcp_call(node: Node, url: str, tool: str, *args: str, scope: str | None = None) -> dict[str, Any]:
    """The MCP client's one line, run as an agent of Nikita's with ``scope``, or by Nikita directly (None)."""
    argv = [sys.executable, CLIENT, url, tool, *args]
    if scope is not None:
        argv = [cmd("meshctl"), "agent", "run", "--socket", str(node.socket), "-q", "--principal", "nikita@acme.com",
                "--scope", scope, "--ttl", "5m", "--", *argv]
    out = node.host.run(argv, timeout=60)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def seen(requests: Path, **match: Any) -> list[dict[str, Any]]:
    """The upstream's log lines with these values."""
    lines = [json.loads(line) for line in requests.read_text().splitlines()] if requests.exists() else []
    return [r for r in lines if all(r.get(k) == v for k, v in match.items())]


def raw(node: Node, address: str, port: int, data: bytes, wait: float = 5.0) -> str:
    """Send ``data`` from ``node`` over one TCP connection; what came back (its first line), or 'closed'."""
    program = ("import socket, sys\n"
               "try:\n    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
               "except OSError as e:\n    print('refused'); sys.exit()\n"
               "s.sendall(sys.stdin.buffer.read())\n"
               "try:\n    got = s.recv(65536)\nexcept TimeoutError:\n    got = b'(timeout)'\n"
               "print(got.decode('latin-1').split('\\r\\n')[0] or 'closed')\n")
    out = node.host.run([sys.executable, "-c", program, address, str(port), str(wait)], input=data.decode("latin-1"),
                        timeout=wait + 30)
    return out.stdout.strip()


def flows(mesh: Mesh, node: str = "db", **match: Any) -> list[dict[str, Any]]:
    out = mesh.admin("flows", "--node", node, "--json")
    return [f for f in json.loads(out.stdout) if all(f.get(k) == v for k, v in match.items())]


def test_an_agent_with_db_read_calls_query_and_is_refused_drop_table_with_the_oauth_challenge(
        lab: tuple[Mesh, Node, Node, Path]) -> None:
    mesh, db, laptop, requests = lab
    assert mcp_call(laptop, serve_url(db, 8080), "query", "--arg", "sql=select 1", scope="db:read") == {
        "ok": True, "result": "rows for: select 1"}
    refused = mcp_call(laptop, serve_url(db, 8080), "drop_table", "--arg", "name=users", scope="db:read")
    assert refused["ok"] is False and refused["status"] == 403, refused
    challenge = refused["www_authenticate"]
    assert challenge.startswith('Bearer error="insufficient_scope"'), challenge
    assert 'scope="db:write"' in challenge
    assert f'resource_metadata="http://{db.addresses[0]}:8080/.well-known/oauth-protected-resource"' in challenge
    assert seen(requests, tool="drop_table") == [], "a refused call must never reach the upstream"
    [call] = seen(requests, tool="query")
    assert call["Idmesh-Principal"] == "nikita@acme.com" and call["Idmesh-Scopes"] == "db:read"
    assert call["Idmesh-Agent"].startswith("a") and call["Idmesh-Node"] == "laptop"
    assert call["Idmesh-Authorized-By"] == "node laptop (delegation)"
    assert call["assertion_valid"] is True, call.get("assertion_error")
    claims = call["assertion_claims"]
    assert claims["iss"] == "spiffe://acme.mesh/node/db" and claims["aud"] == "db-mcp"
    assert claims["sub"] == f"spiffe://acme.mesh/agent/{call['Idmesh-Agent']}"
    assert claims["principal"] == "nikita@acme.com" and claims["scopes"] == ["db:read"]
    assert claims["exp"] - claims["iat"] == 60
    # the challenge's metadata (RFC 9728), from the policy
    fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
    meta = laptop.host.run([sys.executable, "-c", fetch,
                            serve_url(db, 8080, "/.well-known/oauth-protected-resource")]).stdout
    assert json.loads(meta) == {"resource": f"http://{db.addresses[0]}:8080", "resource_name": "db-mcp",
                                "scopes_supported": ["db:read", "db:write"], "bearer_methods_supported": []}
    wait_until(lambda: flows(mesh, verdict="deny", kind="request", port=8080), 10, "the refusal in the flow log")
    [denied] = flows(mesh, verdict="deny", kind="request", port=8080)
    assert denied["request"] == "POST /mcp tools/call drop_table" and denied["scopes"] == ["db:read"]


def test_nikita_directly_calls_both_tools_and_is_reported_as_shadow_mcp(lab: tuple[Mesh, Node, Node, Path]) -> None:
    mesh, db, laptop, requests = lab
    assert mcp_call(laptop, serve_url(db, 8080), "drop_table", "--arg", "name=t1")["ok"] is True
    [call] = seen(requests, tool="drop_table")
    assert call["Idmesh-Principal"] == "nikita@acme.com" and call["Idmesh-Agent"] is None
    assert call["Idmesh-Node"] == "laptop" and call["assertion_claims"]["sub"] == "spiffe://acme.mesh/node/laptop"
    wait_until(lambda: flows(mesh, kind="shadow-mcp", source_node="laptop"), 10, "shadow MCP in the flow log")
    shadow = flows(mesh, kind="shadow-mcp", source_node="laptop")[-1]
    assert shadow["verdict"] == "allow" and shadow["agent"] is None and shadow["principal"] == "nikita@acme.com"
    listed = mesh.admin("flows", "--node", "db").stdout
    assert "shadow-mcp" in listed


def test_a_plain_process_connecting_to_an_mcp_port_is_reported_by_its_own_node_with_its_local_user(
        lab: tuple[Mesh, Node, Node, Path]) -> None:
    mesh, db, laptop, _ = lab
    probe = "import socket, sys; socket.create_connection((sys.argv[1], 8080), timeout=3).close()"

    def reported() -> list[dict[str, Any]]:
        laptop.host.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", probe, db.addresses[0]])
        return flows(mesh, "laptop", kind="shadow-mcp", local_user="nobody")

    # laptop learns from the netmap that db serves MCP on 8080 (meshctl serve --mcp), then watches for it
    [record, *_] = wait_until(reported, 15, "laptop reporting its user's connection to db's MCP port")
    assert record["destination"] == db.addresses[0] and record["port"] == 8080
    assert record["source_node"] == "laptop" and "MCP port of db" in record["rule"]
    started = datetime.now(UTC)
    assert mcp_call(laptop, serve_url(db, 8080), "query", "--arg", "sql=as an agent", scope="db:read")["ok"]
    time.sleep(2)  # the flow log ships every second
    late = [f for f in flows(mesh, "laptop", kind="shadow-mcp", local_user="root")
            if datetime.fromisoformat(f["at"]) >= started]
    assert late == [], "an agent's connection (the client runs as root, in the agent) is no shadow MCP"
    listed = json.loads(db.host.run([cmd("meshctl"), "serve", "list", "--json", "--socket", str(db.socket)]).stdout)
    assert [s["port"] for s in listed if s["mcp"]] == [8080]


def test_forged_identity_headers_are_removed_before_the_upstream_sees_them(
        lab: tuple[Mesh, Node, Node, Path]) -> None:
    _, db, laptop, requests = lab
    forged = ("--header", "Idmesh-Principal=mallory@evil.com", "--header", "Idmesh-Agent=a0000000000000000",
              "--header", "Idmesh-Assertion=x.y.z", "--header", "Idmesh-Scopes=db:write")
    assert mcp_call(laptop, serve_url(db, 8080), "query", "--arg", "sql=forged", *forged, scope="db:read")["ok"]
    call = seen(requests, tool="query")[-1]
    assert call["Idmesh-Principal"] == "nikita@acme.com" and call["Idmesh-Scopes"] == "db:read"
    assert "mallory" not in json.dumps(seen(requests)) and call["assertion_valid"] is True


def test_a_read_agent_may_get_but_not_post_and_streaming_answers_pass_as_they_come(
        lab: tuple[Mesh, Node, Node, Path]) -> None:
    _, db, laptop, _ = lab
    program = ("import http.client, sys, time, json\n"
               "host, port = sys.argv[1], 8081\n"
               "out = {}\n"
               "for method in ('GET', 'POST'):\n"
               "    c = http.client.HTTPConnection(host, port, timeout=10)\n"
               "    c.request(method, '/hello', body=b'x' if method == 'POST' else None)\n"
               "    r = c.getresponse()\n"
               "    out[method] = [r.status, r.read().decode()]\n"
               "c = http.client.HTTPConnection(host, port, timeout=10)\n"
               "c.request('GET', '/stream')\n"
               "r = c.getresponse()\n"
               "start, times = time.monotonic(), []\n"
               "while line := r.readline():\n"
               "    times.append(round(time.monotonic() - start, 2))\n"
               "out['stream'] = times\n"
               "print(json.dumps(out))\n")
    out = laptop.host.run([cmd("meshctl"), "agent", "run", "--socket", str(laptop.socket), "-q", "--principal",
                           "nikita@acme.com", "--scope", "web:read", "--", sys.executable, "-c", program,
                           db.addresses[0]], timeout=60)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["GET"] == [200, "hello GET 0\n"]
    assert got["POST"][0] == 403 and "POST /hello refused" in got["POST"][1], got["POST"]
    assert len(got["stream"]) == 5 and got["stream"][-1] - got["stream"][0] >= 0.6, got["stream"]


def test_a_narrowed_rule_admits_nothing_on_a_port_meshd_does_not_serve(lab: tuple[Mesh, Node, Node, Path]) -> None:
    _, db, laptop, _ = lab
    server = tcp_server(db.host, "0.0.0.0", 8083)
    try:
        program = ("import socket, sys\n"
                   "try:\n    socket.create_connection((sys.argv[1], 8083), timeout=3).close(); print('connected')\n"
                   "except OSError as e:\n    print('refused', e)\n")
        out = laptop.host.run([cmd("meshctl"), "agent", "run", "--socket", str(laptop.socket), "-q", "--principal",
                               "nikita@acme.com", "--scope", "web:read", "--", sys.executable, "-c", program,
                               db.addresses[0]], timeout=60)
        assert out.stdout.strip().startswith("refused"), out.stdout
    finally:
        server.kill()
        server.wait()


def test_bad_input_gets_one_line_and_changes_nothing(lab: tuple[Mesh, Node, Node, Path]) -> None:
    _, db, laptop, requests = lab
    address = db.addresses[0]
    assert raw(laptop, address, 8081, b"NOT HTTP AT ALL\r\n\r\n").startswith("HTTP/1.1 400")
    huge_head = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    # h11 refuses a head still arriving beyond 16 KiB (400), the proxy one that came whole in one read (431)
    assert raw(laptop, address, 8081, huge_head).split()[1] in ("400", "431")
    big_body = b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n" + b"b" * 5_000_000
    assert raw(laptop, address, 8081, big_body).startswith("HTTP/1.1 413")
    not_json = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{oops"
    assert raw(laptop, address, 8080, not_json).startswith("HTTP/1.1 400")
    walk = b"GET /hello/../admin HTTP/1.1\r\nHost: x\r\n\r\n"
    assert raw(laptop, address, 8081, walk).startswith("HTTP/1.1 400")
    down = raw(laptop, address, 8082, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert down.startswith("HTTP/1.1 502"), down
    # slowloris: half a request head, then silence; meshd closes it after its head timeout (10 s)
    started = time.monotonic()
    assert raw(laptop, address, 8081, b"GET /hello HTTP/1.1\r\nHost:", wait=30) == "closed"
    assert 9 <= time.monotonic() - started < 25
    # a batch mixing an allowed and a refused tool is refused whole
    batch = json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "query",
                                                                                        "arguments": {"sql": "b"}}},
                        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "drop_table",
                                                                                        "arguments": {"name": "b"}}}])
    program = ("import http.client, sys\n"
               "c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=10)\n"
               "c.request('POST', '/mcp', body=sys.argv[2], headers={'Content-Type': 'application/json', "
               "'Accept': 'application/json, text/event-stream'})\n"
               "print(c.getresponse().status)\n")
    before = len(seen(requests))
    out = laptop.host.run([cmd("meshctl"), "agent", "run", "--socket", str(laptop.socket), "-q", "--principal",
                           "nikita@acme.com", "--scope", "db:read", "--", sys.executable, "-c", program, address,
                           batch], timeout=60)
    assert out.stdout.strip() == "403"
    assert len(seen(requests)) == before, "no part of a refused batch may reach the upstream"
    # and nothing else was affected
    assert mcp_call(laptop, serve_url(db, 8080), "query", "--arg", "sql=after", scope="db:read")["ok"] is True


def test_agents_only_refuses_mcp_from_a_source_that_is_not_an_agent(lab: tuple[Mesh, Node, Node, Path]) -> None:
    mesh, db, laptop, _ = lab
    mesh.apply_policy(POLICY + "mcp: agents-only\n")
    try:
        def refused() -> dict[str, Any] | None:
            got = mcp_call(laptop, serve_url(db, 8080), "query", "--arg", "sql=direct")
            return got if got.get("status") == 403 else None

        got = wait_until(refused, 10, "MCP from Nikita's device refused under agents-only")
        assert "not an agent" in got["body"]
        assert mcp_call(laptop, serve_url(db, 8080), "query", "--arg", "sql=agent", scope="db:read")["ok"] is True
        wait_until(lambda: flows(mesh, kind="shadow-mcp", verdict="deny"), 10, "the refusal in the flow log")
    finally:
        mesh.apply_policy(POLICY)


def test_served_ports_outlive_a_restart_and_remove_stops_one(lab: tuple[Mesh, Node, Node, Path]) -> None:
    mesh, db, laptop, _ = lab
    mesh.stop(db)
    mesh.start(db)
    mesh.wait_converged()
    listed = json.loads(db.host.run([cmd("meshctl"), "serve", "list", "--json", "--socket", str(db.socket)]).stdout)
    assert [(s["port"], s["name"], s["error"]) for s in listed] == [(8080, "db-mcp", None), (8081, "web", None),
                                                                     (8082, "down", None)]
    assert wait_until(lambda: mcp_call(laptop, serve_url(db, 8080), "query", "--arg", "sql=again",
                                       scope="db:read")["ok"], 15, "serving again after the restart")
    db.host.run([cmd("meshctl"), "serve", "remove", "--port", "8082", "--socket", str(db.socket)])
    assert raw(laptop, db.addresses[0], 8082, b"GET / HTTP/1.1\r\n\r\n", wait=3) == "refused"
    taken = db.host.run([cmd("meshctl"), "serve", "--port", "8080", "--to", "ftp://x", "--socket", str(db.socket)],
                        check=False)
    assert taken.returncode != 0 and "expected an http:// URL" in taken.stderr
    assert "Traceback" not in taken.stderr
