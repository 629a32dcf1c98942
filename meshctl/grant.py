"""``meshctl grant``: a logged-in person approves work for agents: create, list, revoke.

``create`` signs a grant with the principal key ``meshctl login`` made
(:mod:`meshcore.grants`), registers it at the controller (so it can be
counted and revoked) and prints it: one line, handed to ``meshctl agent run
--grant`` on the node it names. ``list`` and ``revoke`` act for the
logged-in principal; ``revoke --principal P`` is the administrator's.
Revoking a grant revokes the live agents born from it.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from idmesh.cli import HelpFormatter, duration, print_json

from .connect import controller
from .output import remaining, table

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    grant = commands.add_parser("grant", help="approve work for agents with your own signature").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    create = grant.add_parser(
        "create", help="sign a grant: agents on NODE may act for you with SCOPEs",
        description="Sign a grant with your principal key (meshctl login first) and register it at the controller. "
        "On the node it names, 'meshctl agent run --grant GRANT' may start agents for you within its scopes and "
        "lifetime (and within the policy's delegations) — where the policy requires a grant, only so. Prints the "
        "grant, one line.", formatter_class=HelpFormatter,
        epilog="examples:\n  meshctl grant create --node agents-1 --scope db:write --ttl 30m --uses 1\n"
        "  meshctl grant create --node tag:agents --scope web:* --ttl 8h > grant.txt\n"
        "  meshctl agent run --grant @grant.txt --scope web:deploy -- ./deploy.sh    (on that node)")
    create.add_argument("--node", required=True, metavar="NODE|tag:TAG", help="where agents may be born from it")
    create.add_argument("--scope", action="append", required=True, dest="scopes", metavar="SCOPE",
                        help="resource:action, repeatable")
    create.add_argument("--ttl", type=duration, default="30m", metavar="DURATION",
                        help="how long the grant lasts; its agents end by then (default 30m)")
    create.add_argument("--uses", type=int, metavar="N", help="how many agents it may start (default: any number)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=_create)
    listing = grant.add_parser("list", help="your grants (with the admin credential and --principal: anyone's)")
    listing.add_argument("--principal", help="(admin) this principal's grants; 'all' for every one")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)
    revoke = grant.add_parser("revoke", help="revoke a grant and the live agents born from it",
                              description="Revoke one of your grants by id; or, with the admin credential, every "
                              "grant of --principal. Live agents born from a revoked grant are revoked with it.")
    revoke.add_argument("id", nargs="?", help="the grant id (g...)")
    revoke.add_argument("--principal", help="(admin) revoke every grant of this principal")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=_revoke)


def _create(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from meshcore.grants import sign_grant
    from meshcore.identity import load_certificate
    from meshcore.wire.api import GrantInfo, GrantRegister

    from .principal import Principal

    me = Principal.load()
    key = serialization.load_pem_private_key(me.key_file.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    line = sign_grant(key, load_certificate(me.cert_file.read_bytes()), me.principal, me.domain, args.node,
                      args.scopes, args.ttl, datetime.now(UTC), args.uses)
    with me.client() as api:
        info = GrantInfo.model_validate(api.request("POST", "/v1/grants", GrantRegister(grant=line).model_dump()))
    if args.json:
        print_json({"grant": line, **info.model_dump(mode="json")})
    else:
        print(line)
    return 0


def _list(args: argparse.Namespace) -> int:
    from meshcore.wire.api import GrantInfo

    from .connect import get_all
    from .principal import Principal

    if args.principal:
        with controller(args) as api:
            grants = get_all(api, "/v1/grants", GrantInfo,
                             principal=None if args.principal == "all" else args.principal)
    else:
        with Principal.load().client() as api:
            grants = get_all(api, "/v1/grants", GrantInfo)
    if args.json:
        print_json(grants)
        return 0
    now = datetime.now(UTC)
    table([[g.id, g.principal, g.node, " ".join(g.scopes), f"{g.used}/{g.uses if g.uses is not None else '-'}",
            g.state, remaining(g.expires, now) if g.expires > now else "-"] for g in grants],
          ["ID", "PRINCIPAL", "NODE", "SCOPES", "USED", "STATE", "EXPIRES IN"])
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from meshcore.errors import InvalidInput
    from meshcore.wire.api import GrantRevokeRequest, GrantsRevoked

    from .principal import Principal

    if (args.id is None) == (args.principal is None):
        raise InvalidInput("name one grant id, or --principal (admin)")
    if args.principal:
        with controller(args) as api:
            body = GrantRevokeRequest(principal=args.principal).model_dump()
            done = GrantsRevoked.model_validate(api.request("POST", "/v1/grants/revoke", body))
    else:
        with Principal.load().client() as api:
            done = GrantsRevoked.model_validate(api.request("DELETE", f"/v1/grants/{args.id}"))
    if args.json:
        print_json(done)
    else:
        print(f"revoked {len(done.grants)} grant(s): {' '.join(done.grants) or '-'}; "
              f"{len(done.agents)} agent(s) born from them: {' '.join(done.agents) or '-'}")
    return 0
