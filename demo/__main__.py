"""``make demo``: a whole idmesh mesh on this machine, identities shown working.

Five network namespaces on a bridge (documentation addresses only): the
controller, a laptop owned by nikita@acme.com, a ``db`` server, an
``agents`` server and an exit node, each running the real ``meshd`` with
real wireguard-go and nftables. The demo applies the seed policy of
SPEC.md §4, starts agents, prints an access matrix measured with real TCP
connections (identity x service, with the rule that decided), and revokes
an agent while it is connecting, timing how long the mesh takes to stop
honoring it. Nikita logs in (an administrator approves her code) and signs
a grant; only an agent born from it may write. Then identity-based routes: exit-eu offers to be an exit node
to an "internet" namespace (203.0.113.0/24), and the policy's ``routes``
sends the sre group's agents — only them — through it. An agent then
fetches its X509- and JWT-SVIDs with py-spiffe from the node's SPIFFE
Workload API, and a process that is no agent is refused. An MCP server (the
``mcp`` SDK) goes behind ``meshctl serve`` on db: an agent with db:read may
call its query tool and is refused drop_table with the OAuth challenge, the
grant's agent may, the server sees who called (and verifies the node's
assertion), and Nikita calling from her laptop without an agent shows up in
the flow log as shadow MCP. Last, a relayed peer: two
homes hang off the bridge behind symmetric NAT routers (nftables ``masquerade
random``, :func:`tests.e2e.natlab.add_home`; LANs in 192.0.2.0/24), with
nikita's ``laptop-hotel`` in one and ``db-branch`` in the other. Each goes
direct to the nodes on the bridge, but the two cannot reach each other
directly, so after 5 s they go through coturn, which runs next to the
controller (``--relay``, ``--relay-secret-file``); the act shows
``meshctl status`` with PATH ``relay`` and the policy deciding over it. The
two join right after act 2 (in the background), so their paths settle while
acts 3-10 run. The controller's store is PostgreSQL 15 (a cluster made in
the demo's directory, durable); at the end a second controller joins the
database, the first is killed with ``-9``, and every node moves to the
second on its own. Everything is removed on exit, on failure and on Ctrl-C (the
nodes are stopped at once while coturn still answers, then the network's
close stops the rest by PID and deletes the namespaces, then the cluster);
``--keep`` leaves the mesh up and prints how to explore and tear it down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.coturn import Coturn
from tests.e2e.mesh import Mesh, Node, cmd, revoke_and_time, tcp_server, wait_until
from tests.e2e.natlab import Home, add_home
from tests.e2e.netns import Host, HostCommandError, Network
from tests.pg import Cluster, stop_cluster

HERE = Path(__file__).resolve().parent
POLICY = (HERE.parent / "examples" / "policy.yaml").read_text()
CAST = [("h2", "laptop", ("--owner", "nikita@acme.com")), ("h3", "db", ("--tag", "db")),
        ("h4", "agents", ("--tag", "agents")), ("h5", "exit-eu", ("--tag", "exit"))]
# Two homes behind symmetric NATs (a router's wan on the demo's bridge, its LAN behind it) and the node in each.
HOMES = [("r1", "198.51.100.101/24", "192.0.2.0/25", "laptop-hotel", ("--owner", "nikita@acme.com")),
         ("r2", "198.51.100.102/24", "192.0.2.128/25", "db-branch", ("--tag", "db"))]
TURN_PORT = 3480  # the controller's STUN has 3478 and 3479
Row = tuple[str, Node, tuple[str, list[str], str | None] | None, str]  # see seed_rows
PROBE = ("import socket,sys\n"
         "try:\n"
         "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).recv(100); print('allowed')\n"
         "except OSError: print('denied')\n")
HAMMER = ("import socket,sys,time\n"  # connect again and again; print the moment it stops working
          "while True:\n"
          "    try:\n"
          "        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).recv(100)\n"
          "        print('ok', time.time(), flush=True)\n"
          "    except OSError:\n"
          "        print('refused', time.time(), flush=True); break\n"
          "    time.sleep(0.02)\n")


def say(text: str) -> None:
    bold = sys.stdout.isatty()
    print(f"\n\033[1m== {text}\033[0m" if bold else f"\n== {text}", flush=True)


def show(result: subprocess.CompletedProcess[str], prefix: str = "  ") -> None:
    out = (result.stdout + result.stderr).rstrip()
    if out:
        print(prefix + out.replace("\n", "\n" + prefix), flush=True)


SPIFFE = ("import base64, json\n"  # a SPIFFE program: py-spiffe finds the Workload API in SPIFFE_ENDPOINT_SOCKET
          "from spiffe import JwtSource, X509Source\n"
          "with X509Source(timeout_in_seconds=10) as source:\n"
          "    svid = source.get_x509_context().default_svid\n"
          "    print(f'X509-SVID {svid.spiffe_id}, valid until {svid.leaf.not_valid_after_utc:%H:%M:%S} UTC')\n"
          "with JwtSource(timeout_in_seconds=10) as source:\n"
          "    token = source.fetch_svid(audience={'billing'}).token\n"
          "claims = json.loads(base64.urlsafe_b64decode(token.split('.')[1] + '=='))\n"
          "print('JWT-SVID for billing:', json.dumps({k: claims[k] for k in ('sub', 'principal', 'scopes', 'exp')}))\n")
OUTSIDER = ("import sys\n"  # the same request from a process that is no agent
            "from spiffe import WorkloadApiClient\n"
            "try:\n"
            "    WorkloadApiClient(sys.argv[1]).fetch_x509_svid(); print('issued?!')\n"
            "except Exception as exc: print('refused:', str(exc).split(': ')[-1])\n")


def spiffe(agents: Node) -> None:
    """An agent gets its SVIDs from the node's SPIFFE Workload API; a process outside every agent gets nothing."""
    for line in agents.host.run(agent_argv(agents, "nikita@acme.com", ["db:read"], "spiffe-demo", sys.executable,
                                           "-c", SPIFFE)).stdout.splitlines():
        print(f"  agent | {line}")
    socket = agents.socket.with_name(f"{agents.socket.stem}-workload.sock")
    print(f"  not an agent | {agents.host.run([sys.executable, '-c', OUTSIDER, f'unix://{socket}']).stdout.strip()}")


MCP_SERVER, MCP_CLIENT = (str(HERE.parent / "tests" / "e2e" / n) for n in ("mcp_server.py", "mcp_client.py"))


def mcp(mesh: Mesh, nodes: dict[str, Node], grant: str, work: Path) -> None:
    """An MCP server (the mcp SDK) behind meshctl serve on db: tools allowed and refused by scope, the identity
    the server sees, and shadow MCP from a device that is no agent."""
    db, agents, laptop = nodes["db"], nodes["agents"], nodes["laptop"]
    seen = work / "mcp-requests.jsonl"
    server = db.host.popen([sys.executable, MCP_SERVER, "--port", "9000", "--log", str(seen), "--ca",
                            str(db.state / "ca.crt"), "--audience", "db-mcp"], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    print("  on db: meshctl serve --port 8080 --to http://127.0.0.1:9000 --name db-mcp")
    show(db.host.run([cmd("meshctl"), "serve", "--socket", str(db.socket), "--port", "8080", "--to",
                      "http://127.0.0.1:9000", "--name", "db-mcp"]), "    ")
    url = f"http://{db.addresses[0]}:8080/mcp"

    def call(label: str, node: Node, tool: str, scopes: list[str] | None, use_grant: bool = False) -> None:
        argv = [sys.executable, MCP_CLIENT, url, tool, "--arg", "sql=select 1" if tool == "query" else "name=t"]
        if scopes is not None:
            argv = agent_argv(node, "nikita@acme.com", scopes, "mcp-demo", *argv, grant=grant if use_grant else None)
        got = json.loads(node.host.run(argv, timeout=60).stdout.strip().splitlines()[-1])
        if got["ok"]:
            print(f"  {label:34} {tool:10} -> {got['result']}")
        else:
            print(f"  {label:34} {tool:10} -> HTTP {got.get('status')}: {got.get('www_authenticate')}")

    call("agent nikita db:read", agents, "query", ["db:read"])
    call("agent nikita db:read", agents, "drop_table", ["db:read"])
    call("agent nikita db:write, her grant", agents, "drop_table", ["db:write"], use_grant=True)
    call("nikita on her laptop (no agent)", laptop, "query", None)
    query = next(json.loads(line) for line in seen.read_text().splitlines() if '"tool": "query"' in line)
    print(f"  the MCP server saw: Idmesh-Principal {query['Idmesh-Principal']}, Idmesh-Agent {query['Idmesh-Agent']}, "
          f"Idmesh-Scopes {query['Idmesh-Scopes']}; Idmesh-Assertion verified with the mesh CA: "
          f"{query['assertion_valid']} (signed by {query['assertion_claims']['iss']})")
    wait_until(lambda: "shadow-mcp" in mesh.admin("flows", "--node", "db").stdout, 10, "shadow MCP in the flow log")
    print("  meshctl flows --node db: the refusal, and MCP from a source that is no agent")
    head, *lines = mesh.admin("flows", "--node", "db").stdout.splitlines()
    picked = [next(ln for ln in lines if "drop_table" in ln and " deny " in ln),
              next(ln for ln in reversed(lines) if "shadow-mcp" in ln)]
    print("    " + "\n    ".join([head, *picked]))


def agent_argv(node: Node, principal: str, scopes: list[str], name: str, *command: str,
               grant: str | None = None) -> list[str]:
    argv = [cmd("meshctl"), "agent", "run", "--socket", str(node.socket), "--principal", principal, "--ttl", "10m",
            "--name", name, "--quiet", *(["--grant", grant] if grant else [])]
    for scope in scopes:
        argv += ["--scope", scope]
    return [*argv, "--", *command]


def login_and_grant(mesh: Mesh, laptop: Node, work: Path) -> str:
    """Nikita logs in on her laptop (an administrator approves the code) and signs a grant for writes."""
    env = {**os.environ, "IDMESH_USER_STATE": str(work / "nikita"), "IDMESH_SOCKET": str(laptop.socket)}
    login = laptop.host.popen([cmd("meshctl"), "login"], env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert login.stderr is not None and login.stdout is not None
    code = ""
    for line in login.stderr:
        print("  | " + line.rstrip())
        if "meshctl login approve" in line:
            code = line.split("approve", 1)[1].split()[0]
            break
    approved = mesh.admin("login", "approve", code, "--principal", "nikita@acme.com")
    print(f"  the administrator: meshctl login approve {code} --principal nikita@acme.com")
    show(approved, "    ")
    login.wait(30)
    print("  | " + login.stdout.read().strip())
    grant = laptop.host.run([cmd("meshctl"), "grant", "create", "--node", "agents", "--scope", "db:write", "--ttl",
                             "1h", "--uses", "4"], env=env).stdout.strip()
    print("  nikita: meshctl grant create --node agents --scope db:write --ttl 1h --uses 4")
    print(f"    {grant[:40]}...{grant[-12:]} ({len(grant)} bytes: a JWS signed by her key, her certificate inside)")
    return grant


def seed_rows(nodes: dict[str, Node], grant: str) -> list[Row]:
    return [  # label, node, agent (principal, scopes, grant) or None for the node itself, explain --from
        ("laptop (nikita@acme.com, direct)", nodes["laptop"], None, "principal=nikita@acme.com,via=direct"),
        ("agent nikita db:read", nodes["agents"], ("nikita@acme.com", ["db:read"], None),
         "principal=nikita@acme.com,via=agent,scope=db:read"),
        ("agent nikita db:write, node's word", nodes["agents"], ("nikita@acme.com", ["db:write"], None),
         "principal=nikita@acme.com,via=agent,scope=db:write"),
        ("agent nikita db:write, her grant", nodes["agents"], ("nikita@acme.com", ["db:write"], grant),
         "principal=nikita@acme.com,via=agent,scope=db:write,authorized=grant"),
        ("node agents (tag:agents, direct)", nodes["agents"], None, "tag=agents"),
        ("node exit-eu (tag:exit, direct)", nodes["exit-eu"], None, "tag=exit"),
    ]


def matrix(mesh: Mesh, rows: list[Row], db: Node) -> None:
    """Each row's identity connects to ``db``'s two services; the verdict measured next to the rule explained.

    A row's two cells are measured at the same time (a denied connection waits out its 1.5 s timeout).
    """
    services = [("db", 5432), ("db-admin", 5433)]
    print(f"  {'identity':36} " + "".join(f"{s + ':' + str(p):34}" for s, p in services))

    def cell(row: Row, service: str, port: int) -> str:
        label, node, agent, source = row
        probe = [sys.executable, "-c", PROBE, db.addresses[0], str(port)]
        argv = agent_argv(node, agent[0], agent[1], f"probe-{port}", *probe, grant=agent[2]) if agent else probe
        done = node.host.run(argv, check=False, timeout=30)
        if done.returncode == 5 and "needs a grant" in done.stderr:
            return "no agent: needs nikita's grant"
        if done.returncode != 0 and not done.stdout.strip():
            print(f"  {label}: {done.stderr.strip()}")
        measured = done.stdout.strip() or "error"
        explained = json.loads(mesh.admin("policy", "explain", "--from", source, "--to", f"{service}:{port}",
                                          "--json").stdout)
        rule = explained["rule"].split(" at ")[0] if explained["verdict"] == "allow" else "default deny"
        expected = "allowed" if explained["verdict"] == "allow" else "denied"
        return f"{measured} ({rule})" + ("" if measured == expected else " MISMATCH with explain")

    with ThreadPoolExecutor(len(services)) as pool:
        for row in rows:
            cells = [c.result() for c in [pool.submit(cell, row, service, port) for service, port in services]]
            print(f"  {row[0]:36} " + "".join(f"{c:34}" for c in cells), flush=True)


def revocation(mesh: Mesh, nodes: dict[str, Node], db: Node) -> None:
    agents = nodes["agents"]
    proc = agents.host.popen(agent_argv(agents, "nikita@acme.com", ["db:read"], "long-runner", sys.executable,
                                        "-u", "-c", HAMMER, db.addresses[0], "5432"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline().split()
    if not first or first[0] != "ok":
        print(f"  the agent could not connect: {first} {proc.stderr.read() if proc.stderr else ''}")
        return
    listed = json.loads(agents.host.run([cmd("meshctl"), "agent", "list", "--json", "--socket",
                                         str(agents.socket)]).stdout)
    agent = next(a for a in listed if a["name"] == "long-runner")
    address = agent["addresses"][0]
    who = db.host.run([cmd("meshctl"), "whois", address, "--socket", str(db.socket)]).stdout
    print(f"  db asks who {address} is (meshctl whois):")
    print("    " + who.strip().replace("\n", "\n    "))
    took = revoke_and_time(mesh, agent["id"], address, db)
    proc.wait(10)
    print(f"  revoked {agent['id']} at the controller; db's firewall dropped {address} "
          f"{took:.0f} ms later; the agent's processes were killed on its node "
          f"(exit status {proc.returncode})")


HELLO = ("import socket,sys\n"
         "try: print(socket.create_connection((sys.argv[1], 8080), timeout=3).recv(100).decode().strip())\n"
         "except OSError as e: print('no way out:', e.strerror or e)\n")


def routes(mesh: Mesh, nodes: dict[str, Node], internet: Host) -> None:
    agents = nodes["agents"]
    tcp_server(internet, "0.0.0.0", 8080)
    show(mesh.admin("routes", "list"))
    show(mesh.admin("policy", "explain", "--from", "principal=nikita@acme.com,via=agent,scope=db:read",
                    "--to", "203.0.113.1"))
    probe = [sys.executable, "-c", HELLO, "203.0.113.1"]
    argv = agent_argv(agents, "nikita@acme.com", ["db:read"], "browser", *probe)
    print("  nikita's agent (group sre) on the agents host -> 203.0.113.1:8080, which answers with who it sees:")
    show(agents.host.run(argv, check=False, timeout=30), "    ")
    print("  a plain process on the same host -> 203.0.113.1:8080:")
    show(agents.host.run(probe, check=False, timeout=30), "    ")


def path_to(node: Node, peer: str) -> str:
    return str(next((p["path"] for p in node.status()["peers"] if p["name"] == peer), "-"))


def join_homes(mesh: Mesh, homes: list[Home]) -> dict[str, Node]:
    """The nodes behind NAT enroll and start now, so that their paths settle while the other acts run."""
    joined = {}
    for home, (_, _, _, name, flags) in zip(homes, HOMES, strict=True):
        joined[name] = mesh.enroll(home.hosts[0], name, *flags)
        mesh.start(joined[name])
    for port in (5432, 5433):
        tcp_server(joined["db-branch"].host, "::", port)
    return joined


def views(*nodes: Node) -> str:
    """Each node's view of the others (path, endpoint, probes), for a failure to show what each end believed."""
    names = {n.name for n in nodes}
    return "".join(f"{n.name}: {json.dumps([p for p in n.status()['peers'] if p['name'] in names])}\n" for n in nodes)


def relayed(mesh: Mesh, homes: list[Home], homed: dict[str, Node], coturn: Coturn) -> None:
    hotel, branch = homed["laptop-hotel"], homed["db-branch"]
    for home, node in zip(homes, (hotel, branch), strict=True):
        print(f"  {node.name} at {home.hosts[0].underlay4}, behind router {home.router.wan} "
              f"(nftables 'masquerade random' + only replies let in)")
    wait_until(lambda: path_to(hotel, branch.name) == "relay" and path_to(branch, hotel.name) == "relay", 40,
               "laptop-hotel and db-branch through the relay", lambda: views(hotel, branch) + mesh.logs())
    seen = [next(p for p in node.status()["peers"] if p["name"] == other.name)  # each end's view of the other
            for node, other in ((hotel, branch), (branch, hotel))]
    nat, probe = (" / ".join(sorted({str(one[key]) for one in seen})) for key in ("nat", "last_probe"))
    print(f"  the controller's STUN saw both NATs give every destination its own port (nat: {nat}); no probe")
    print(f"  between the two was answered (last probe: {probe}), so after 5 s the pair went through coturn at")
    print(f"  {coturn.address}:{coturn.port}; to the nodes on the bridge each goes direct. meshctl status on laptop-hotel:")
    show(hotel.host.run([cmd("meshctl"), "status", "--socket", str(hotel.socket)]), "    ")
    print("  over the relayed tunnel, identity still decides (real TCP connections to db-branch):")
    matrix(mesh, [("nikita on laptop-hotel, direct", hotel, None, "principal=nikita@acme.com,via=direct"),
                  ("agent nikita db:read, laptop-hotel", hotel, ("nikita@acme.com", ["db:read"], None),
                   "principal=nikita@acme.com,via=agent,scope=db:read")], branch)


def failover(mesh: Mesh, db: Node) -> Path:
    """Replica 2 joins (the CA key copied to it, the database shared), serves; replica 1 dies; the nodes stream
    from replica 2 and a change made there still reaches them. Returns the admin.conf that still answers."""
    second = mesh.join(8444)
    second.start("--stun-listen", f"0.0.0.0:{3482}")
    print(f"  replica 2 at {second.url}; db knows both: {' '.join(db.status()['controller']['urls'])}")
    mesh.kill_controller()
    t0 = time.monotonic()
    wait_until(lambda: all(n.status()["controller"]["url"] == second.url and n.status()["controller"]["connected"]
                           for n in mesh.nodes.values()), 30, "every node streaming from replica 2", mesh.logs)
    print(f"  replica 1 killed; all {len(mesh.nodes)} nodes stream from replica 2 after "
          f"{time.monotonic() - t0:.1f} s")
    status = db.host.run([cmd("meshctl"), "status", "--socket", str(db.socket)]).stdout
    print("  db: " + next(line for line in status.splitlines() if line.startswith("controller")))
    return second.data / "admin.conf"


def explore_hints(net: Network, nodes: dict[str, Node], admin_conf: Path) -> str:
    """What to type next, each line as it runs from the host's own shell.

    The mesh lives in namespaces: a command typed in the host's namespace
    would reach for the demo's documentation addresses through the host's
    default route, off the machine. So each line enters the namespace of the
    host it is about (``ip netns exec``), and the admin credential goes with
    the command into the controller's. tests/e2e/test_demo.py runs every line.
    """
    meshctl = cmd("meshctl")
    admin = f"ip netns exec {net['h1'].netns} env IDMESH_ADMIN={admin_conf} {meshctl}"
    work = admin_conf.parent.parent
    return (f"\nthe mesh is up. Explore, e.g.:\n"
            f"  {admin} nodes list\n"
            f"  {admin} audit --limit 5\n"
            f"  ip netns exec {net['h4'].netns} {meshctl} status --socket {nodes['agents'].socket}\n"
            f"  ip netns exec {net['r1h1'].netns} {meshctl} status --socket {work}/laptop-hotel.sock\n"
            f"tear it down with:\n  cd {HERE.parent} && {sys.executable} -m demo.teardown {net.prefix} {work}")


def stop_nodes(mesh: Mesh | None) -> None:
    """SIGTERM every meshd at once, by PID, while the controller and coturn still answer (a node deletes its TURN
    allocation on the way out). The network's close then stops the rest, newest first, coturn last."""
    running = [n.proc for n in (mesh.nodes.values() if mesh else ()) if n.proc is not None and n.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass  # net.close() kills it


def main() -> None:
    ap = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the mesh running to explore")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it creates network namespaces)")
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="idmesh-demo-"))
    net = Network(5)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kept = False
    code = 0
    mesh: Mesh | None = None
    background = ThreadPoolExecutor(1)
    joining: Future[dict[str, Node]] | None = None
    work.chmod(0o711)  # PostgreSQL's user must reach work/pg; every file of the mesh in it keeps its own mode
    database = background.submit(Cluster, durable=True, root=work / "pg")  # made while the network is
    try:
        net.build()
        internet = net.add_segment("internet", "203.0.113.1/24", [(net["h5"], "203.0.113.2/24")])
        homes = [add_home(net, router, wan, lan, "symmetric") for router, wan, lan, _, _ in HOMES]
        coturn = Coturn(net["h1"], work / "turn", port=TURN_PORT)
        coturn.start()
        secret = work / "relay-secret"
        secret.touch(mode=0o600)
        secret.write_text(coturn.secret.decode())
        mesh = Mesh(net, work, net["h1"], serve=[cmd("mesh-controller"), "serve", "--relay",
                                                 f"turn:{coturn.address}:{TURN_PORT}", "--relay-secret-file",
                                                 str(secret)])
        say("1. the controller: CA (Ed25519), registry (PostgreSQL 15), HTTPS API with mTLS")
        mesh.db = database.result().new_database(socket=True)
        mesh.init(policy=None)
        print(f"  controller in namespace {net['h1'].netns} at {mesh.url}; next to it coturn, the TURN relay "
              f"for nodes no direct path reaches, at {coturn.address}:{TURN_PORT}")
        say("2. four hosts join with one-line tokens; keys are made on each host")
        nodes: dict[str, Node] = {}
        for host, name, flags in CAST:
            nodes[name] = mesh.enroll(net[host], name, *flags)
            mesh.start(nodes[name], *(["--advertise-exit-node"] if name == "exit-eu" else []))
        mesh.wait_converged(60)
        show(mesh.admin("nodes", "list"))
        joining = background.submit(join_homes, mesh, homes)  # their paths settle while acts 3-10 run
        print(f"  meanwhile two more join from homes behind symmetric NATs: {', '.join(h[3] for h in HOMES)} (act 11)")
        say("3. the seed policy (examples/policy.yaml): checked, its tests run, applied to every node")
        (work / "policy.yaml").write_text(POLICY)
        show(mesh.admin("policy", "check", str(work / "policy.yaml")))
        show(mesh.admin("policy", "apply", str(work / "policy.yaml")))
        wait_until(lambda: all(n.status()["policy"]["version"] == 1 for n in nodes.values()), 20, "policy v1")
        db = nodes["db"]
        for port in (5432, 5433):
            tcp_server(db.host, "::", port)
        say("4. nikita logs in on her laptop and signs a grant: writes need her own word (requires_grant)")
        grant = login_and_grant(mesh, nodes["laptop"], work)
        say("5. access matrix: real TCP connections to db (verdict measured, rule from 'policy explain')")
        matrix(mesh, seed_rows(nodes, grant), db)
        say("6. revocation, live: an agent keeps connecting to db; we revoke it")
        revocation(mesh, nodes, db)
        say("7. identity-based routes: exit-eu offers an exit; the policy's routes say whose traffic uses it")
        routes(mesh, nodes, internet)
        say("8. SPIFFE: an agent fetches its X509- and JWT-SVIDs from its node's Workload API (py-spiffe)")
        spiffe(nodes["agents"])
        say("9. identity at the application layer: an MCP server behind meshctl serve, tools decided by scope")
        mcp(mesh, nodes, grant, work)
        say("10. this node's view: meshctl status on the agents host")
        show(nodes["agents"].host.run([cmd("meshctl"), "status", "--socket", str(nodes["agents"].socket)]))
        say("11. a relayed peer: laptop-hotel and db-branch are each behind a symmetric NAT")
        relayed(mesh, homes, joining.result(), coturn)
        say("12. a second controller joins the database; the first is killed (-9) and every node moves on its own")
        admin = failover(mesh, nodes["db"])
        print(f"\ndemo finished in {time.monotonic() - t0:.1f} s")
        if args.keep:
            kept = True
            print(explore_hints(net, nodes, admin))
    except KeyboardInterrupt:
        print("\ndemo: interrupted, cleaning up")
        code = 130  # as a shell reports a command stopped by Ctrl-C
    except (AssertionError, HostCommandError, subprocess.SubprocessError, RuntimeError) as exc:
        print(f"\ndemo: a step failed, cleaning up:\n{exc}", file=sys.stderr)
        code = 1
    finally:
        if not kept:
            try:
                try:
                    if joining is not None:
                        wait_futures([joining], 60)  # nothing may start while the network is being removed
                    stop_nodes(mesh)
                finally:
                    net.close()
            finally:
                wait_futures([database], 60)
                stop_cluster(work / "pg")
                shutil.rmtree(work, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
