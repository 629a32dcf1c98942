"""``meshctl login`` (and ``login approve``), ``whoami``, ``logout``: a person proves who they are.

``login`` makes the person's key here, asks this node's meshd to start the
login at the controller (the node vouches for the device), shows what to do
— open the identity provider's page and confirm the code, or ask an
administrator to approve it — and polls until the principal certificate
arrives (RFC 8628's rhythm: the server's interval, five seconds more on
``slow_down``). ``login approve`` is the administrator's side of the
embedded mode. ``whoami`` reads the login here; ``logout`` revokes it at the
controller (with every grant it signed) and forgets it.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta

from idmesh.cli import HelpFormatter, duration, print_json

from .connect import controller, meshd, socket_option
from .output import remaining

__all__ = ["register"]

_LOGIN = ("Log in as the person at this device. The key is made here; the controller signs a principal certificate "
          "(spiffe://<domain>/user/...) once the identity provider (or an administrator) confirms who you are. It "
          "lands in IDMESH_USER_STATE (default ~/.config/idmesh), the key 0600, and lets you sign grants for agents.")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    login = commands.add_parser("login", help="log in as a person: a principal certificate for this device",
                                description=_LOGIN, formatter_class=HelpFormatter,
                                epilog="examples:\n  meshctl login\n  meshctl login --ttl 8h --json\n"
                                "  meshctl login approve WDJB-MJHT --principal nikita@acme.com   (an administrator)")
    login.add_argument("--ttl", type=duration, default="12h", metavar="DURATION",
                       help="how long the principal certificate lives (default 12h, at most 7d)")
    socket_option(login)
    login.add_argument("--json", action="store_true", help="print the login as JSON once done")
    login.set_defaults(func=_login)
    actions = login.add_subparsers(dest="login_action", metavar="ACTION")
    approve = actions.add_parser("approve", help="approve a waiting login (administrator; no identity provider)",
                                 description="Without an OpenID provider, each login waits for an administrator: "
                                 "check who asks (out of band), then name them. Codes expire after 10 minutes and "
                                 "work once; wrong codes are rate-limited.")
    approve.add_argument("code", help="the code meshctl login printed, e.g. WDJB-MJHT")
    approve.add_argument("--principal", required=True, help="who the person is, e.g. nikita@acme.com")
    approve.add_argument("--json", action="store_true")
    approve.set_defaults(func=_approve)

    whoami = commands.add_parser("whoami", help="who you are logged in as on this device")
    whoami.add_argument("--json", action="store_true")
    whoami.set_defaults(func=_whoami)
    logout = commands.add_parser("logout", help="revoke your principal certificate (and its grants), forget it",
                                 description="Revoke the principal certificate at the controller, with every grant "
                                 "it signed; live agents born from those grants are revoked too. Then forget it here.")
    logout.add_argument("--json", action="store_true")
    logout.set_defaults(func=_logout)


def _login(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from meshcore.identity import build_csr, key_pem

    from .principal import Principal, user_state

    key = ed25519.Ed25519PrivateKey.generate()
    local = meshd(args)
    answer = local.request("POST", "/v1/login", {"csr": build_csr(key), "ttl_seconds": int(args.ttl.total_seconds())})
    login, contact = answer["login"], answer["controller"]
    code = login["user_code"]
    if login["mode"] == "oidc":
        complete = login.get("verification_uri_complete")
        print(f"To log in, open {complete or login['verification_uri']}\nand confirm the code {code}"
              + (f" (or open {login['verification_uri']} and enter it)." if complete else "."), file=sys.stderr)
    else:
        print(f"Ask an administrator of {contact['domain']} to approve this login:\n"
              f"  meshctl login approve {code} --principal <you@example.com>", file=sys.stderr)
    print(f"(the code expires in {timedelta(seconds=int(login['expires_in']))}; waiting...)", file=sys.stderr,
          flush=True)
    interval = int(login["interval"])
    while True:
        polled = local.request("POST", f"/v1/login/{login['id']}")
        if polled["status"] == "done":
            break
        interval = int(polled.get("interval") or interval)  # slow_down: the controller grew it
        if login["mode"] == "oidc":  # the embedded mode's poll waits at the controller itself
            time.sleep(interval)
    me = Principal.save(user_state(), key_pem(key), polled["certificate"], contact["ca"],
                        principal=polled["principal"], controller=contact["url"],
                        controllers=tuple(contact.get("urls") or ()), domain=contact["domain"],
                        device=answer["device"], not_after=datetime.fromisoformat(polled["not_after"]))
    if args.json:
        print_json(_describe(me))
    else:
        print(f"logged in as {me.principal} on {me.device} until {me.not_after.isoformat(timespec='seconds')} "
              f"({me.directory})")
    return 0


def _approve(args: argparse.Namespace) -> int:
    from meshcore.wire.api import LoginApprove, PrincipalInfo

    with controller(args) as api:
        body = LoginApprove(code=args.code, principal=args.principal).model_dump()
        info = PrincipalInfo.model_validate(api.request("POST", "/v1/login/approve", body))
    if args.json:
        print_json(info)
    else:
        print(f"approved: {info.principal} is logged in on {info.device} until "
              f"{info.not_after.isoformat(timespec='seconds')}")
    return 0


def _describe(me: object) -> dict[str, object]:
    from .principal import Principal

    assert isinstance(me, Principal)
    return {"principal": me.principal, "device": me.device, "controller": me.controller, "domain": me.domain,
            "not_after": me.not_after.isoformat(), "expired": datetime.now(UTC) >= me.not_after,
            "state": str(me.directory)}


def _whoami(args: argparse.Namespace) -> int:
    from .principal import Principal

    me = Principal.load(valid=False)
    if args.json:
        print_json(_describe(me))
    else:
        now = datetime.now(UTC)
        left = "expired" if now >= me.not_after else f"{remaining(me.not_after, now)} left"
        print(f"{me.principal} on {me.device} ({left}, until {me.not_after.isoformat(timespec='seconds')})")
    return 0


def _logout(args: argparse.Namespace) -> int:
    from meshcore.wire.api import GrantsRevoked

    from .principal import Principal

    me = Principal.load(valid=False)
    if datetime.now(UTC) < me.not_after:
        with me.client() as api:
            done = GrantsRevoked.model_validate(api.request("POST", "/v1/logout"))
    else:
        done = GrantsRevoked(grants=[], agents=[])  # an expired certificate can no longer be used anyway
    me.forget()
    if args.json:
        print_json({"principal": me.principal, **done.model_dump()})
    else:
        print(f"logged out {me.principal}: its certificate is revoked"
              + (f", with {len(done.grants)} grant(s) and {len(done.agents)} agent(s) born from them"
                 if done.grants else ""))
    return 0
