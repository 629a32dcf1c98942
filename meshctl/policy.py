"""``meshctl policy``: who may reach what — check, apply, show, history, explain.

``check`` and ``explain --file`` need no controller; the rest use the admin
credential. The policy compiler (:mod:`meshcore.policy`) is imported by the
handlers that load a policy, never to build the parser.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from idmesh.cli import HelpFormatter, print_json
from meshcore.errors import InvalidInput, NotFound

from .connect import controller, get_all
from .output import table, when

if TYPE_CHECKING:
    from idmesh.client import ControllerClient
    from meshcore.policy import Gateway, Policy

__all__ = ["register"]

_EXPLAIN_EPILOG = """\
examples:
  meshctl policy explain --from principal=nikita@acme.com,via=agent,scope=db:read --to db:5432
  meshctl policy explain --from '{group: sre}' --to tag:monitoring:9100
  meshctl policy explain --from principal=nikita@acme.com,via=agent,scope=db:read --to db:8080 --tool drop_table
  meshctl policy explain --file policy.yaml --from tag=ci --to db:5432
  meshctl policy explain --from group=sre,via=agent,scope=ops:run --to 203.0.113.10   (the route taken)"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pol = commands.add_parser("policy", help="who may reach what: check, apply, show, explain").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    check = pol.add_parser("check", help="validate a policy file and run its tests; changes nothing",
                           description="Validate FILE (every error names file:line:column) and run its 'tests'. "
                           "Exit 0 when it is valid and every test passes; otherwise list each problem and exit 2. "
                           "Needs no controller.")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_check)
    apply = pol.add_parser("apply", help="check, then make FILE the mesh's policy (every node within 1 s)",
                           description="Check FILE as 'policy check' does, then store it at the controller as the "
                           "next version (with its hash and who applied it) and push it to every node. A file "
                           "that fails changes nothing.")
    apply.add_argument("file", type=Path)
    apply.add_argument("--json", action="store_true")
    apply.set_defaults(func=_apply)
    show = pol.add_parser("show", help="print the policy in force (or an older version)")
    show.add_argument("--version", type=int, metavar="N")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)
    history = pol.add_parser("history", help="every policy version: when, by whom, its hash")
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=_history)
    explain = pol.add_parser("explain", help="the decision for one flow and the rule that made it",
                             description="Decide whether SOURCE may reach DEST under the policy in force "
                             "(or --file), and name the rule.",
                             epilog=_EXPLAIN_EPILOG, formatter_class=HelpFormatter)
    explain.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                         help="key=value,... or a YAML mapping: principal, group, tag, node, owner, agent, scope, via, "
                         "authorized (grant | delegation)")
    explain.add_argument("--to", dest="dest", required=True, metavar="DEST",
                         help="SERVICE[:PORT], tag:T[:PORT], node:N[:PORT], or an IP address off the mesh: the route "
                         "(gateway) the identity gets there")
    explain.add_argument("--protocol", default="tcp", choices=["tcp", "udp", "icmp"])
    explain.add_argument("--method", help="one HTTP request to a port meshd serves: its method (GET if --path)")
    explain.add_argument("--path", help="the request's path (/ if not given)")
    explain.add_argument("--tool", help="an MCP tools/call of this tool (a POST to /mcp unless --path)")
    explain.add_argument("--file", type=Path, help="explain against this file instead of the policy in force")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(func=_explain)


def _read(path: Path) -> Policy:
    from meshcore.policy import load_policy

    try:
        text = path.read_text()
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror}") from exc
    return load_policy(text, str(path))


def _tested(path: Path) -> Policy:
    """Load and test; every failing test is printed, the error says how many."""
    from meshcore.policy import run_tests

    policy = _read(path)
    failures = run_tests(policy)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        raise InvalidInput(f"{path}: {len(failures)} of {len(policy.tests)} policy test(s) fail")
    return policy


def _check(args: argparse.Namespace) -> int:
    policy = _tested(args.file)
    print(f"{args.file}: valid; {len(policy.acls)} acl(s), {len(policy.tests)} test(s) pass")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from meshcore.wire.api import PolicyApply, PolicyInfo

    _tested(args.file)
    with controller(args) as api:
        body = PolicyApply(text=args.file.read_text(), filename=str(args.file)).model_dump()
        info = PolicyInfo.model_validate(api.request("POST", "/v1/policy", body))
    if args.json:
        print_json(info.model_copy(update={"text": None}))
    elif info.unchanged:
        print(f"policy unchanged: version {info.version} (sha256:{info.hash[:16]}) is already in force")
    else:
        print(f"applied policy version {info.version} (sha256:{info.hash[:16]}); nodes update now")
    return 0


def _show(args: argparse.Namespace) -> int:
    from meshcore.wire.api import PolicyInfo

    with controller(args) as api:
        query = f"?version={args.version}" if args.version is not None else ""
        info = PolicyInfo.model_validate(api.request("GET", f"/v1/policy{query}"))
    if args.json:
        print_json(info)
    else:
        print(f"# version {info.version}, sha256:{info.hash}, applied by {info.applied_by} "
              f"at {when(info.applied_at)} from {info.filename}")
        print(info.text, end="" if (info.text or "").endswith("\n") else "\n")
    return 0


def _history(args: argparse.Namespace) -> int:
    from meshcore.wire.api import PolicyInfo

    with controller(args) as api:
        history = get_all(api, "/v1/policy/history", PolicyInfo)
    if args.json:
        print_json(history)
    else:
        table([[str(h.version), when(h.applied_at), h.applied_by, h.hash[:16], h.filename] for h in history],
              ["VERSION", "APPLIED", "BY", "SHA256", "FILE"])
    return 0


def _explain(args: argparse.Namespace) -> int:
    """Against ``--file``, or the policy in force (and, for an address, the routes nodes offer)."""
    from meshcore.policy import load_policy
    from meshcore.wire.api import PolicyInfo

    if args.file is not None:
        return _decide(args, _read(args.file), None)
    with controller(args) as api:
        info = PolicyInfo.model_validate(api.request("GET", "/v1/policy"))
        gateways = _gateways(api) if _is_address(args.dest) else None
    return _decide(args, load_policy(info.text or "", f"policy v{info.version}"), gateways)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _gateways(api: ControllerClient) -> dict[str, Gateway]:
    from meshcore.policy import Gateway
    from meshcore.wire.api import RouteInfo

    offers: dict[str, list[RouteInfo]] = {}
    for info in get_all(api, "/v1/routes", RouteInfo):
        offers.setdefault(info.node, []).append(info)
    return {n: Gateway(n, frozenset(o[0].tags), tuple(i.prefix for i in o)) for n, o in offers.items()}


def _decide(args: argparse.Namespace, policy: Policy, gateways: dict[str, Gateway] | None) -> int:
    from meshcore.policy import explain, explain_address

    if _is_address(args.dest):
        route = explain_address(policy, args.source, args.dest, gateways)
        if args.json:
            print_json({"route": None if route.choice is None else route.choice.prefix, "flow": route.flow,
                        "gateways": [] if route.choice is None else list(route.choice.gateways),
                        "rule": route.rule_text, "rule_index": None if route.choice is None else route.choice.rule})
        else:
            print(route)
        return 0
    decision = explain(policy, args.source, args.dest, args.protocol, method=args.method, path=args.path,
                       tool=args.tool)
    if args.json:
        print_json({"verdict": decision.verdict, "flow": decision.flow, "rule": decision.rule_text,
                    "rule_index": decision.rule_index, "also": list(getattr(decision, "also", ())),
                    "hints": list(decision.hints), "scopes": list(getattr(decision, "scopes", ()))})
    else:
        print(decision)
        for hint in decision.hints:
            print(f"  hint: {hint}")
    return 0
