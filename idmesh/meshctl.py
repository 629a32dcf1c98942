"""``meshctl``: the administrator's and the node user's command line.

Controller-side commands (``token``, ``nodes``) use the admin credential
(``--admin`` / ``IDMESH_ADMIN``, default /var/lib/idmesh/admin.conf).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pwd
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from datetime import datetime, timedelta, timezone

from meshcore.durations import format_duration, parse_duration
from meshcore.errors import InvalidInput, NotFound
from meshcore.policy import Gateway, Policy, explain, explain_address, load_policy, run_tests
from meshcore.wire import (
    RouteInfo,
    AgentRevokeRequest,
    AgentsEnded,
    AuditEntry,
    FlowRecord,
    NodeInfo,
    PolicyApply,
    PolicyInfo,
    TokenCreated,
    TokenCreateRequest,
    TokenInfo,
)

from .cli import duration, env_path, parser, print_json, run
from deploy import cli as deploy_cli

from .client import AdminCredential, ControllerClient, LocalClient
from .paths import DEFAULT_ADMIN, DEFAULT_SOCKET



def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _build_parser() -> argparse.ArgumentParser:
    p = parser(
        "meshctl",
        "Control an idmesh mesh: enrollment tokens, nodes, and (on a node) its status.",
        epilog="examples:\n"
        "  meshctl token create --tag db --ttl 1h\n"
        "  meshctl token create --owner nikita@acme.com --json\n"
        "  meshctl nodes list\n"
        "  meshctl nodes remove laptop-7\n"
        "  meshctl routes list\n\n"
        "Controller commands read the admin credential from --admin or IDMESH_ADMIN.",
    )
    p.add_argument("--admin", type=lambda s: env_path("", s), default=env_path("IDMESH_ADMIN", DEFAULT_ADMIN),
                   help="admin credential written by 'mesh-controller init' (env IDMESH_ADMIN; default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    token = sub.add_parser("token", help="enrollment tokens").add_subparsers(dest="action", required=True,
                                                                               metavar="ACTION")
    create = token.add_parser("create", help="create a one-line enrollment token",
                              description="Create an enrollment token. It carries the controller URL and the CA "
                              "fingerprint, so 'meshd enroll TOKEN' needs nothing else. Single-use unless "
                              "--reusable; the controller keeps only its hash.")
    create.add_argument("--tag", action="append", default=[], dest="tags", metavar="TAG",
                        help="tag the enrolled node (repeatable), e.g. --tag db")
    create.add_argument("--owner", metavar="PRINCIPAL", help="the person who owns the node, e.g. nikita@acme.com")
    create.add_argument("--ttl", type=duration, default="1h", metavar="DURATION",
                        help="how long the token can be used (default 1h)")
    create.add_argument("--reusable", action="store_true", help="allow many enrollments with this token")
    create.add_argument("--json", action="store_true", help="print {token, id, expires, ...} as JSON")
    tlist = token.add_parser("list", help="list tokens (never their secrets)")
    tlist.add_argument("--json", action="store_true")
    tdel = token.add_parser("delete", help="delete a token so it can no longer be used")
    tdel.add_argument("id")

    nodes = sub.add_parser("nodes", help="the mesh's nodes").add_subparsers(dest="action", required=True,
                                                                             metavar="ACTION")
    nlist = nodes.add_parser("list", help="list enrolled nodes")
    nlist.add_argument("--json", action="store_true")
    nrm = nodes.add_parser("remove", help="remove a node and revoke its certificate")
    nrm.add_argument("name")
    nrm.add_argument("--json", action="store_true")

    routes = sub.add_parser("routes", help="routes nodes offer (subnet routers, exit nodes)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    rlist = routes.add_parser(
        "list", help="every advertised route and the policy rules that make it usable",
        description="A node offers routes with 'meshd run --advertise-routes PREFIX' and '--advertise-exit-node'. "
        "An offer carries nobody's traffic until a policy 'routes' rule names the node (or its tag) for a prefix "
        "inside it; ENABLED BY lists those rules. See 'meshctl policy explain --to ADDRESS' for one identity's route.")
    rlist.add_argument("--json", action="store_true")

    pol = sub.add_parser("policy", help="who may reach what: check, apply, show, explain").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    pc = pol.add_parser("check", help="validate a policy file and run its tests; changes nothing",
                        description="Validate FILE (every error names file:line:column) and run its 'tests'. "
                        "Exit 0 when it is valid and every test passes; otherwise list each problem and exit 2. "
                        "Needs no controller.")
    pc.add_argument("file", type=Path)
    pa = pol.add_parser("apply", help="check, then make FILE the mesh's policy (every node within 1 s)",
                        description="Check FILE as 'policy check' does, then store it at the controller as the "
                        "next version (with its hash and who applied it) and push it to every node. A file "
                        "that fails changes nothing.")
    pa.add_argument("file", type=Path)
    pa.add_argument("--json", action="store_true")
    ps = pol.add_parser("show", help="print the policy in force (or an older version)")
    ps.add_argument("--version", type=int, metavar="N")
    ps.add_argument("--json", action="store_true")
    ph = pol.add_parser("history", help="every policy version: when, by whom, its hash")
    ph.add_argument("--json", action="store_true")
    pe = pol.add_parser("explain", help="the decision for one flow and the rule that made it",
                        description="Decide whether SOURCE may reach DEST under the policy in force "
                        "(or --file), and name the rule.",
                        epilog="examples:\n"
                        "  meshctl policy explain --from principal=nikita@acme.com,via=agent,scope=db:read --to db:5432\n"
                        "  meshctl policy explain --from '{group: sre}' --to tag:monitoring:9100\n"
                        "  meshctl policy explain --file policy.yaml --from tag=ci --to db:5432\n"
                        "  meshctl policy explain --from group=sre,via=agent,scope=ops:run --to 203.0.113.10   "
                        "(the route taken)",
                        formatter_class=p.formatter_class)
    pe.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                    help="key=value,... or a YAML mapping: principal, group, tag, node, owner, agent, scope, via")
    pe.add_argument("--to", dest="dest", required=True, metavar="DEST",
                    help="SERVICE[:PORT], tag:T[:PORT], node:N[:PORT], or an IP address off the mesh: the route "
                    "(gateway) the identity gets there")
    pe.add_argument("--protocol", default="tcp", choices=["tcp", "udp", "icmp"])
    pe.add_argument("--file", type=Path, help="explain against this file instead of the policy in force")
    pe.add_argument("--json", action="store_true")

    ag = sub.add_parser("agent", help="AI agents: run one with its own identity, list, revoke").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    ar = ag.add_parser("run", help="run a command as an agent with its own certificate and address",
                       description="Start CMD as an agent acting for PRINCIPAL with SCOPEs. meshd makes its key "
                       "(which never leaves this node), gets its certificate from the controller (a policy "
                       "delegation must allow it), gives it an overlay address and its own cgroup, and its "
                       "traffic into the mesh leaves with that address without CMD changing. CMD gets "
                       "IDMESH_AGENT_ID, IDMESH_AGENT_CERT, IDMESH_AGENT_KEY, IDMESH_AGENT_ADDRESS and IDMESH_CA. "
                       "The exit code is CMD's; when CMD exits, the identity ends everywhere. Run from inside an "
                       "agent, it starts a sub-agent (scopes and lifetime within the parent's).",
                       epilog="example:\n  meshctl agent run --principal nikita@acme.com --scope db:read --ttl 15m "
                       "-- python agent.py", formatter_class=p.formatter_class)
    ar.add_argument("--principal", required=True, help="the person the agent acts for")
    ar.add_argument("--scope", action="append", required=True, dest="scopes", metavar="SCOPE",
                    help="resource:action, repeatable (e.g. --scope db:read --scope web:*)")
    ar.add_argument("--ttl", type=duration, default="15m", metavar="DURATION", help="lifetime (default 15m)")
    ar.add_argument("--name", help="the agent's name, which policy rules can match (default: the command's name)")
    ar.add_argument("--user", help="run CMD as this user (meshctl must be root)")
    ar.add_argument("--socket", type=lambda s: env_path("", s), default=env_path("IDMESH_SOCKET", DEFAULT_SOCKET),
                    help="meshd's local API socket (env IDMESH_SOCKET; default %(default)s)")
    ar.add_argument("--quiet", "-q", action="store_true", help="do not print the agent's identity")
    ar.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG]...")
    al = ag.add_parser("list", help="this node's agents, or with --mesh the whole mesh's (admin)")
    al.add_argument("--mesh", action="store_true", help="list every live agent of the mesh (needs the admin credential)")
    al.add_argument("--socket", type=lambda s: env_path("", s), default=env_path("IDMESH_SOCKET", DEFAULT_SOCKET))
    al.add_argument("--json", action="store_true")
    av = ag.add_parser("revoke", help="revoke an agent (and its sub-agents), or every agent of a principal",
                       description="Revoke with the admin credential; every connected node stops honoring the "
                       "identity within a second and the agent's node kills its processes.")
    av.add_argument("id", nargs="?", help="the agent id (spiffe://<domain>/agent/<id>)")
    av.add_argument("--principal", help="revoke every live agent of this principal")
    av.add_argument("--json", action="store_true")

    wh = sub.add_parser("whois", help="who holds an overlay address, as this node has verified it",
                        description="Ask the local meshd which identity holds ADDRESS: a node, or an agent with "
                        "its principal, scopes, parent and expiry (from a certificate this node checked itself).")
    wh.add_argument("address")
    wh.add_argument("--socket", type=lambda s: env_path("", s), default=env_path("IDMESH_SOCKET", DEFAULT_SOCKET))
    wh.add_argument("--json", action="store_true")

    au = sub.add_parser("audit", help="the controller's audit log: enrollments, certificates, agents, policies",
                        description="Read the audit log: every identity event (tokens, enrollments, certificates "
                        "issued/renewed/revoked, agents issued/refused/retired/revoked, policy versions with their "
                        "diff) with who, what, when and from where. Filters combine.",
                        epilog="examples:\n  meshctl audit --since 1h\n  meshctl audit --principal nikita@acme.com "
                        "--action agent\n  meshctl audit --node db-1 --json", formatter_class=p.formatter_class)
    au.add_argument("--since", metavar="TIME", help="an ISO time (2026-11-28T09:00:00Z) or a duration ago (15m, 2h, 7d)")
    au.add_argument("--principal", help="events about this principal's nodes and agents")
    au.add_argument("--node", help="events about or by this node")
    au.add_argument("--action", help="an action (agent.revoked) or a family (agent)")
    au.add_argument("--limit", type=int, default=1000, help="the newest N events (default %(default)s)")
    au.add_argument("--json", action="store_true")

    fl = sub.add_parser("flows", help="the identity flow log: denied connections and a sample of accepted ones",
                        description="Connections nodes saw arrive over the mesh, with the full identity of the "
                        "sender (principal, agent, scopes, node), the destination, the verdict and the rule. "
                        "Denied connections are logged (rate-limited), accepted ones sampled.",
                        epilog="examples:\n  meshctl flows --denied\n  meshctl flows --principal nikita@acme.com --json",
                        formatter_class=p.formatter_class)
    fl.add_argument("--denied", action="store_true", help="only denied connections")
    fl.add_argument("--principal", help="only connections made for this principal")
    fl.add_argument("--node", help="only connections seen by this node")
    fl.add_argument("--limit", type=int, default=200, help="the newest N (default %(default)s)")
    fl.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="this node: its identity, the controller link, its peers",
                        description="Ask the local meshd (over its Unix socket) for this node's identity, "
                        "whether it is connected to the controller, and each peer's endpoint and handshake.")
    st.add_argument("--socket", type=lambda s: env_path("", s), default=env_path("IDMESH_SOCKET", DEFAULT_SOCKET),
                    help="meshd's local API socket (env IDMESH_SOCKET; default %(default)s)")
    st.add_argument("--json", action="store_true")

    deploy_cli.add_parser(sub)
    return p


def _ago(iso_time: str | None) -> str:
    if not iso_time:
        return "never"
    seconds = int((datetime.now(timezone.utc) - datetime.fromisoformat(iso_time)).total_seconds())
    return f"{format_duration(timedelta(seconds=max(seconds, 1)))} ago"


def _agent_rows(agents: list[dict[str, Any]]) -> None:
    now = datetime.now(timezone.utc)
    _table([[a["id"], a["name"], a["node"], a["principal"], " ".join(a["scopes"]), a.get("parent") or "-",
             " ".join(a["addresses"]),
             format_duration(datetime.fromisoformat(a["expires"]) - now) if datetime.fromisoformat(a["expires"]) > now
             else "expired"] for a in agents],
           ["ID", "NAME", "NODE", "PRINCIPAL", "SCOPES", "PARENT", "ADDRESSES", "EXPIRES IN"])


def _agent(args: argparse.Namespace) -> int:
    if args.action == "run":
        return _agent_run(args)
    if args.action == "list" and not args.mesh:
        agents = LocalClient(args.socket).get("/v1/agents")
        print_json(agents) if args.json else _agent_rows(agents)
        return 0
    with AdminCredential.load(args.admin).client() as api:
        if args.action == "list":
            agents = api.request("GET", "/v1/agents")
            print_json(agents) if args.json else _agent_rows(agents)
            return 0
        if (args.id is None) == (args.principal is None):
            raise InvalidInput("name one agent id, or --principal")
        if args.id is not None:
            ended = AgentsEnded.model_validate(api.request("DELETE", f"/v1/agents/{args.id}"))
        else:
            body = AgentRevokeRequest(principal=args.principal).model_dump()
            ended = AgentsEnded.model_validate(api.request("POST", "/v1/agents/revoke", body))
        if args.json:
            print_json(ended)
        else:
            print(f"revoked {len(ended.ended)} agent(s): {' '.join(ended.ended) or '-'}")
    return 0


def _agent_run(args: argparse.Namespace) -> int:
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise InvalidInput("no command to run: meshctl agent run --principal P --scope S -- CMD [ARG]...")
    uid = gid = None
    if args.user:
        try:
            pw = pwd.getpwnam(args.user)
        except KeyError as exc:
            raise NotFound(f"no user {args.user!r}") from exc
        uid, gid = pw.pw_uid, pw.pw_gid
    body = {"principal": args.principal, "scopes": args.scopes, "ttl_seconds": int(args.ttl.total_seconds()),
            "name": args.name or Path(command[0]).name, "uid": uid, "gid": gid}
    # meshd moves *this* process into the agent's cgroup; exec keeps it there, so the
    # command's signals and exit code are its own, and the identity ends when it does.
    born = LocalClient(args.socket).request("POST", "/v1/agents", body)
    agent = born["agent"]
    if not args.quiet:
        print(f"meshctl: agent {agent['id']} ({agent['name']}) for {agent['principal']} "
              f"[{' '.join(agent['scopes'])}] at {' '.join(agent['addresses'])}, expires {agent['expires']}",
              file=sys.stderr, flush=True)
    env = {**os.environ, **born["environment"]}
    if uid is not None and gid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise NotFound(f"cannot run {command[0]!r}: {exc.strerror}") from exc


def _since(text: str) -> str:
    try:
        return (datetime.now(timezone.utc) - parse_duration(text)).isoformat()
    except InvalidInput:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).isoformat()
    except ValueError as exc:
        raise InvalidInput(f"--since {text!r}: expected an ISO time or a duration such as 15m or 2h") from exc


def _audit(api: Any, args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("since", _since(args.since) if args.since else None), ("principal", args.principal),
                                ("node", args.node), ("action", args.action), ("limit", str(args.limit))) if v}
    rows = [AuditEntry.model_validate(r) for r in api.request("GET", f"/v1/audit?{urlencode(params)}")]
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        detail = {k: v for k, v in r.detail.items() if k != "diff"}
        extra = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(detail.items()))
        print(f"{_when(r.at)}  {r.action:<20} {r.target or '-'}  by {r.actor}"
              + (f" from {r.source}" if r.source else "") + (f"  {extra}" if extra else ""))
        if "diff" in r.detail and r.detail["diff"]:
            print("    " + str(r.detail["diff"]).rstrip().replace("\n", "\n    "))
    return 0


def _flows(api: Any, args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("denied", "true" if args.denied else None), ("principal", args.principal),
                                ("node", args.node), ("limit", str(args.limit))) if v}
    flows = [FlowRecord.model_validate(f) for f in api.request("GET", f"/v1/flows?{urlencode(params)}")]
    if args.json:
        print_json(flows)
        return 0
    _table([[_when(f.at), f.verdict, f.agent and f"agent {f.agent}" or f"node {f.source_node or f.source}",
             f.principal or "-", " ".join(f.scopes) or "-", f"{f.node}:{f.port or ''}/{f.protocol}", f.rule]
            for f in flows], ["WHEN", "VERDICT", "FROM", "PRINCIPAL", "SCOPES", "TO", "RULE"])
    return 0


def _status(args: argparse.Namespace) -> int:
    status = LocalClient(args.socket).get("/v1/status")
    if args.json:
        print_json(status)
        return 0
    me, ctl = status["self"], status["controller"]
    print(f"{me['name']}  {' '.join(me['addresses'])}  {me['owner'] or ','.join('tag:' + t for t in me['tags'])}")
    state = "connected" if ctl["connected"] else f"disconnected ({ctl.get('last_error') or 'connecting'})"
    print(f"controller {ctl['url']}: {state}, netmap version {ctl['netmap_version']}")
    pol, agents = status.get("policy", {}), status.get("agents", {})
    print(f"policy version {pol.get('version', 0)}, {pol.get('rules', 0)} rule(s), ruleset "
          f"{(pol.get('ruleset') or '-')[:16]}; agents: {agents.get('local', 0)} here, "
          f"{agents.get('honored', 0)} honored")
    _table([[p["name"], " ".join(p["addresses"]), p["endpoint"] or "-", _ago(p["latest_handshake"]),
             str(p["rx_bytes"]), str(p["tx_bytes"])] for p in status["peers"]],
           ["PEER", "ADDRESSES", "ENDPOINT", "HANDSHAKE", "RX", "TX"])
    routing = status.get("routing") or {}
    if routing.get("offered"):
        print(f"gateway on {routing['gateway_interface']} for {', '.join(routing['offered'])}; "
              f"clients: {', '.join(routing['clients']) or '-'}")
    if routing.get("tunnels"):
        _table([[t["interface"], t["gateway"], "up" if t["up"] else "down"] for t in routing["tunnels"]],
               ["TUNNEL", "GATEWAY", "STATE"])
    if routing.get("routes"):
        up = {t["gateway"]: t["up"] for t in routing["tunnels"]}
        _table([[r["identity"], r["prefix"], r["via"] or "-",
                 ", ".join(g + ("" if up.get(g) else " (down)") for g in r["gateways"])] for r in routing["routes"]],
               ["IDENTITY", "ROUTE", "VIA", "GATEWAYS IN ORDER"])
    return 0


def _read_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror}") from exc
    return load_policy(text, str(path))


def _check(path: Path) -> Policy:
    """Load and test; every failing test is printed, the error says how many."""
    policy = _read_policy(path)
    failures = run_tests(policy)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        raise InvalidInput(f"{path}: {len(failures)} of {len(policy.tests)} policy test(s) fail")
    return policy


def _policy(args: argparse.Namespace) -> int:
    if args.action == "check":
        policy = _check(args.file)
        print(f"{args.file}: valid; {len(policy.acls)} acl(s), {len(policy.tests)} test(s) pass")
        return 0
    if args.action == "explain" and args.file is not None:
        return _explain(args, _read_policy(args.file), None)
    if args.action == "apply":
        _check(args.file)
    with AdminCredential.load(args.admin).client() as api:
        if args.action == "apply":
            body = PolicyApply(text=args.file.read_text(), filename=str(args.file)).model_dump()
            info = PolicyInfo.model_validate(api.request("POST", "/v1/policy", body))
            if args.json:
                print_json(info.model_copy(update={"text": None}))
            elif info.unchanged:
                print(f"policy unchanged: version {info.version} (sha256:{info.hash[:16]}) is already in force")
            else:
                print(f"applied policy version {info.version} (sha256:{info.hash[:16]}); nodes update now")
        elif args.action == "show":
            query = f"?version={args.version}" if args.version is not None else ""
            info = PolicyInfo.model_validate(api.request("GET", f"/v1/policy{query}"))
            if args.json:
                print_json(info)
            else:
                print(f"# version {info.version}, sha256:{info.hash}, applied by {info.applied_by} "
                      f"at {_when(info.applied_at)} from {info.filename}")
                print(info.text, end="" if (info.text or "").endswith("\n") else "\n")
        elif args.action == "history":
            history = [PolicyInfo.model_validate(h) for h in api.request("GET", "/v1/policy/history")]
            if args.json:
                print_json(history)
            else:
                _table([[str(h.version), _when(h.applied_at), h.applied_by, h.hash[:16], h.filename]
                        for h in history], ["VERSION", "APPLIED", "BY", "SHA256", "FILE"])
        elif args.action == "explain":
            info = PolicyInfo.model_validate(api.request("GET", "/v1/policy"))
            gateways = _gateways(api) if _is_address(args.dest) else None
            return _explain(args, load_policy(info.text or "", f"policy v{info.version}"), gateways)
    return 0


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _gateways(api: ControllerClient) -> dict[str, Gateway]:
    offers: dict[str, list[RouteInfo]] = {}
    for item in api.request("GET", "/v1/routes"):
        info = RouteInfo.model_validate(item)
        offers.setdefault(info.node, []).append(info)
    return {n: Gateway(n, frozenset(o[0].tags), tuple(i.prefix for i in o)) for n, o in offers.items()}


def _explain(args: argparse.Namespace, policy: Policy, gateways: dict[str, Gateway] | None) -> int:
    if _is_address(args.dest):
        route = explain_address(policy, args.source, args.dest, gateways)
        if args.json:
            print_json({"route": None if route.choice is None else route.choice.prefix, "flow": route.flow,
                        "gateways": [] if route.choice is None else list(route.choice.gateways),
                        "rule": route.rule_text, "rule_index": None if route.choice is None else route.choice.rule})
        else:
            print(route)
        return 0
    decision = explain(policy, args.source, args.dest, args.protocol)
    if args.json:
        print_json({"verdict": decision.verdict, "flow": decision.flow, "rule": decision.rule_text,
                    "rule_index": decision.rule_index, "also": list(decision.also), "hints": list(decision.hints)})
    else:
        print(decision)
        for hint in decision.hints:
            print(f"  hint: {hint}")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "deploy":
        return deploy_cli.run(args)
    if args.command == "status":
        return _status(args)
    if args.command == "policy":
        return _policy(args)
    if args.command == "agent":
        return _agent(args)
    if args.command == "whois":
        info = LocalClient(args.socket).get("/v1/whois", params={"address": args.address})
        if args.json:
            print_json(info)
        elif info["kind"] == "agent":
            print(f"agent {info['agent']} ({info['name']}) on node {info['node']}, acting for {info['principal']}")
            print(f"  scopes  {' '.join(info['scopes'])}")
            print(f"  parent  {info['parent'] or '-'}")
            print(f"  expires {info['expires']}")
        else:
            print(f"node {info['node']} ({info['principal'] or ','.join('tag:' + t for t in info.get('tags', []))})")
        return 0
    with AdminCredential.load(args.admin).client() as api:
        if args.command == "audit":
            return _audit(api, args)
        if args.command == "flows":
            return _flows(api, args)
        if args.command == "token" and args.action == "create":
            req = TokenCreateRequest(tags=args.tags, owner=args.owner,
                                     ttl_seconds=int(args.ttl.total_seconds()), reusable=args.reusable)
            created = TokenCreated.model_validate(api.request("POST", "/v1/tokens", req.model_dump()))
            print_json(created) if args.json else print(created.token)
        elif args.command == "token" and args.action == "list":
            tokens = [TokenInfo.model_validate(t) for t in api.request("GET", "/v1/tokens")]
            if args.json:
                print_json(tokens)
            else:
                now = datetime.now(timezone.utc)
                _table([[t.id, ",".join(t.tags) or "-", t.owner or "-", "yes" if t.reusable else "no", str(t.uses),
                         format_duration(t.expires - now) if t.expires > now else "expired"] for t in tokens],
                       ["ID", "TAGS", "OWNER", "REUSABLE", "USES", "EXPIRES IN"])
        elif args.command == "token" and args.action == "delete":
            api.request("DELETE", f"/v1/tokens/{args.id}")
            print(f"deleted token {args.id}")
        elif args.command == "nodes" and args.action == "list":
            nodes = [NodeInfo.model_validate(n) for n in api.request("GET", "/v1/nodes")]
            if args.json:
                print_json(nodes)
            else:
                _table([[n.name, " ".join(n.addresses), n.owner or "-", ",".join(n.tags) or "-",
                         _when(n.cert_not_after)] for n in nodes],
                       ["NAME", "ADDRESSES", "OWNER", "TAGS", "CERT VALID TO"])
        elif args.command == "routes" and args.action == "list":
            offered = [RouteInfo.model_validate(r) for r in api.request("GET", "/v1/routes")]
            if args.json:
                print_json(offered)
            else:
                _table([[r.node, r.prefix, "exit" if r.exit else "subnet",
                         "; ".join(e.split(": from ", 1)[0] for e in r.enabled_by) or "- (no rule uses it)"]
                        for r in offered], ["NODE", "ROUTE", "KIND", "ENABLED BY"])
        elif args.command == "nodes" and args.action == "remove":
            node = NodeInfo.model_validate(api.request("DELETE", f"/v1/nodes/{args.name}"))
            print_json(node) if args.json else print(f"removed {node.spiffe_id}; its certificate is revoked")
    return 0


def main() -> None:
    run("meshctl", _main)
