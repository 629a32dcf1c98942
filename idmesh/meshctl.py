"""``meshctl``: the administrator's and the node user's command line.

Controller-side commands (``token``, ``nodes``) use the admin credential
(``--admin`` / ``IDMESH_ADMIN``, default /var/lib/idmesh/admin.conf).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from meshcore.durations import format_duration
from meshcore.wire import NodeInfo, TokenCreated, TokenCreateRequest, TokenInfo

from .cli import duration, env_path, parser, print_json, run
from .client import AdminCredential, LocalClient

DEFAULT_SOCKET = "/run/meshd/meshd.sock"

DEFAULT_ADMIN = "/var/lib/idmesh/admin.conf"


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
        "  meshctl nodes remove laptop-7\n\n"
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

    st = sub.add_parser("status", help="this node: its identity, the controller link, its peers",
                        description="Ask the local meshd (over its Unix socket) for this node's identity, "
                        "whether it is connected to the controller, and each peer's endpoint and handshake.")
    st.add_argument("--socket", type=lambda s: env_path("", s), default=env_path("IDMESH_SOCKET", DEFAULT_SOCKET),
                    help="meshd's local API socket (env IDMESH_SOCKET; default %(default)s)")
    st.add_argument("--json", action="store_true")
    return p


def _ago(iso_time: str | None) -> str:
    if not iso_time:
        return "never"
    seconds = int((datetime.now(timezone.utc) - datetime.fromisoformat(iso_time)).total_seconds())
    return f"{format_duration(timedelta(seconds=max(seconds, 1)))} ago"


def _status(args: argparse.Namespace) -> int:
    status = LocalClient(args.socket).get("/v1/status")
    if args.json:
        print_json(status)
        return 0
    me, ctl = status["self"], status["controller"]
    print(f"{me['name']}  {' '.join(me['addresses'])}  {me['owner'] or ','.join('tag:' + t for t in me['tags'])}")
    state = "connected" if ctl["connected"] else f"disconnected ({ctl.get('last_error') or 'connecting'})"
    print(f"controller {ctl['url']}: {state}, netmap version {ctl['netmap_version']}")
    _table([[p["name"], " ".join(p["addresses"]), p["endpoint"] or "-", _ago(p["latest_handshake"]),
             str(p["rx_bytes"]), str(p["tx_bytes"])] for p in status["peers"]],
           ["PEER", "ADDRESSES", "ENDPOINT", "HANDSHAKE", "RX", "TX"])
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "status":
        return _status(args)
    with AdminCredential.load(args.admin).client() as api:
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
        elif args.command == "nodes" and args.action == "remove":
            node = NodeInfo.model_validate(api.request("DELETE", f"/v1/nodes/{args.name}"))
            print_json(node) if args.json else print(f"removed {node.spiffe_id}; its certificate is revoked")
    return 0


def main() -> None:
    run("meshctl", _main)
