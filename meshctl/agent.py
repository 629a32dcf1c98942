"""``meshctl agent``: AI agents — run one with its own identity, list, revoke.

``run`` and ``list`` talk to this node's meshd; ``list --mesh`` and ``revoke``
use the admin credential. ``run`` is on the path of every agent's birth, so it
loads only the local client: no policy compiler, no wire models.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from idmesh.cli import HelpFormatter, duration, print_json
from meshcore.errors import InvalidInput, NotFound

from .connect import controller, meshd, socket_option
from .output import remaining, table

__all__ = ["register"]

_RUN_DESCRIPTION = (
    "Start CMD as an agent acting for PRINCIPAL with SCOPEs. meshd makes its key (which never leaves this node), "
    "gets its certificate from the controller (a policy delegation must allow it), gives it an overlay address and "
    "its own cgroup, and its traffic into the mesh leaves with that address without CMD changing. CMD gets "
    "IDMESH_AGENT_ID, IDMESH_AGENT_CERT, IDMESH_AGENT_KEY, IDMESH_AGENT_ADDRESS and IDMESH_CA. The exit code is "
    "CMD's; when CMD exits, the identity ends everywhere. Run from inside an agent, it starts a sub-agent (scopes "
    "and lifetime within the parent's). An agent may also serve: it listens on its own address "
    "($IDMESH_AGENT_ADDRESS, e.g. bind(('$IDMESH_AGENT_ADDRESS', 9000))), and connections to that address are "
    "delivered only to its own processes, from whom the policy allows (to: ['{principal: P, scope: S}:PORT']); "
    "a UDP server should bind that address too (not the wildcard), so its replies leave from the port it was "
    "asked on.")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = commands.add_parser("agent", help="AI agents: run one with its own identity, list, revoke").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    run = agent.add_parser("run", help="run a command as an agent with its own certificate and address",
                           description=_RUN_DESCRIPTION, formatter_class=HelpFormatter,
                           epilog="example:\n  meshctl agent run --principal nikita@acme.com --scope db:read --ttl 15m "
                           "-- python agent.py")
    run.add_argument("--principal", help="the person the agent acts for (default: the grant's)")
    run.add_argument("--grant", default=os.environ.get("IDMESH_GRANT"), metavar="GRANT|@FILE",
                     help="the principal's signed grant (meshctl grant create), or @FILE holding it (env "
                     "IDMESH_GRANT). Without one, only root and users meshd maps to the principal may start agents "
                     "for it, and only where its delegation needs no grant")
    run.add_argument("--scope", action="append", required=True, dest="scopes", metavar="SCOPE",
                     help="resource:action, repeatable (e.g. --scope db:read --scope web:*)")
    run.add_argument("--ttl", type=duration, default="15m", metavar="DURATION", help="lifetime (default 15m)")
    run.add_argument("--name", help="the agent's name, which policy rules can match (default: the command's name)")
    run.add_argument("--user", help="run CMD as this user (meshctl must be root)")
    socket_option(run)
    run.add_argument("--quiet", "-q", action="store_true", help="do not print the agent's identity")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG]...")
    run.set_defaults(func=_run)
    listing = agent.add_parser("list", help="this node's agents, or with --mesh the whole mesh's (admin)")
    listing.add_argument("--mesh", action="store_true",
                         help="list every live agent of the mesh (needs the admin credential)")
    socket_option(listing, described=False)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)
    revoke = agent.add_parser("revoke", help="revoke an agent (and its sub-agents), or every agent of a principal",
                              description="Revoke with the admin credential; every connected node stops honoring "
                              "the identity within a second and the agent's node kills its processes.")
    revoke.add_argument("id", nargs="?", help="the agent id (spiffe://<domain>/agent/<id>)")
    revoke.add_argument("--principal", help="revoke every live agent of this principal")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=_revoke)


def _run(args: argparse.Namespace) -> NoReturn:
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise InvalidInput("no command to run: meshctl agent run --principal P --scope S -- CMD [ARG]...")
    grant = _grant(args.grant)
    principal = args.principal or (_grant_principal(grant) if grant else None)
    if principal is None:
        raise InvalidInput("name the principal (--principal P) or present their grant (--grant)")
    uid = gid = None
    if args.user:
        try:
            pw = pwd.getpwnam(args.user)
        except KeyError as exc:
            raise NotFound(f"no user {args.user!r}") from exc
        uid, gid = pw.pw_uid, pw.pw_gid
    body = {"principal": principal, "scopes": args.scopes, "ttl_seconds": int(args.ttl.total_seconds()),
            "name": args.name or Path(command[0]).name, "uid": uid, "gid": gid, "grant": grant}
    # meshd moves *this* process into the agent's cgroup; exec keeps it there, so the
    # command's signals and exit code are its own, and the identity ends when it does.
    born = meshd(args).request("POST", "/v1/agents", body)
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


def _grant(given: str | None) -> str | None:
    """The grant line: given as it is, or read from ``@FILE``."""
    if not given:
        return None
    if given.startswith("@"):
        try:
            return Path(given[1:]).read_text().strip()
        except OSError as exc:
            raise NotFound(f"cannot read the grant {given[1:]}: {exc.strerror or exc}") from exc
    return given.strip()


def _grant_principal(grant: str) -> str:
    """Whom a grant speaks for, read from its claims (the controller checks its signature, not this)."""
    import base64
    import json

    try:
        payload = grant.split(".")[1]
        return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput("not a grant (expected the one line printed by 'meshctl grant create')") from exc


def _list(args: argparse.Namespace) -> int:
    if args.mesh:
        with controller(args) as api:
            agents = api.request("GET", "/v1/agents")
    else:
        agents = meshd(args).get("/v1/agents")
    if args.json:
        print_json(agents)
    else:
        _table(agents)
    return 0


def _table(agents: list[dict[str, Any]]) -> None:
    now = datetime.now(UTC)
    table([[a["id"], a["name"], a["node"], a["principal"], " ".join(a["scopes"]), a.get("parent") or "-",
            " ".join(a["addresses"]), remaining(datetime.fromisoformat(a["expires"]), now),
            "grant " + a["grant"] if a.get("grant") else "delegation"] for a in agents],
          ["ID", "NAME", "NODE", "PRINCIPAL", "SCOPES", "PARENT", "ADDRESSES", "EXPIRES IN", "AUTHORIZED BY"])


def _revoke(args: argparse.Namespace) -> int:
    from meshcore.wire.api import AgentRevokeRequest, AgentsEnded

    with controller(args) as api:
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
