"""``meshd``: the node daemon's command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idmesh.cli import env_path, parser, print_json, run
from idmesh.paths import DEFAULT_INTERFACE, DEFAULT_SOCKET, DEFAULT_STATE
from meshcore.errors import InvalidInput
from meshd.node.state import StateDir


def _main(argv: Sequence[str] | None) -> int:
    p = parser(
        "meshd",
        "The idmesh node daemon: joins this host to a mesh and keeps its tunnels and rules.",
        epilog="examples:\n"
        "  meshd enroll idm1.eyJ1Ijo...          join with a token from 'meshctl token create'\n"
        "  meshd enroll --name db-1 --state /var/lib/meshd-db1 TOKEN\n"
        "  meshd enroll - < token.txt              the token on standard input (not in 'ps')\n\n"
        "The state directory can also be given as IDMESH_STATE.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    en = sub.add_parser("enroll", help="join a mesh with an enrollment token",
                        description="Generate this node's identity key (Ed25519) and WireGuard key here, "
                        "prove possession to the controller named in the token (trusting only the CA the "
                        "token pins) and store the issued certificate and overlay block in the state directory.",
                        formatter_class=p.formatter_class)
    en.add_argument("token", nargs="?", help="the one-line token printed by 'meshctl token create'; '-' reads it "
                    "from standard input (a token on the command line is visible to every user in 'ps')")
    en.add_argument("--token-file", type=Path, metavar="FILE", help="read the token from FILE instead")
    en.add_argument("--name", help="node name, a DNS label (default: this host's name)")
    en.add_argument("--state", type=lambda s: env_path("", s), default=env_path("IDMESH_STATE", DEFAULT_STATE),
                    help="state directory (env IDMESH_STATE; default %(default)s)")
    en.add_argument("--force", action="store_true", help="enroll again even if this node is enrolled (new keys)")
    en.add_argument("--json", action="store_true", help="print the node record as JSON")

    rn = sub.add_parser("run", help="run the node daemon",
                        description="Connect to the controller, receive the netmap and keep the WireGuard "
                        "interface, its addresses and routes converged to it. SIGTERM stops it and removes the "
                        "interface. The data plane keeps working while the controller is away.",
                        formatter_class=p.formatter_class)
    rn.add_argument("--state", type=lambda s: env_path("", s), default=env_path("IDMESH_STATE", DEFAULT_STATE),
                    help="state directory (env IDMESH_STATE; default %(default)s)")
    rn.add_argument("--interface", default=os.environ.get("IDMESH_INTERFACE") or DEFAULT_INTERFACE,
                    help="WireGuard interface name (env IDMESH_INTERFACE; default %(default)s)")
    rn.add_argument("--socket", type=lambda s: env_path("", s), default=env_path("IDMESH_SOCKET", DEFAULT_SOCKET),
                    help="local API socket (env IDMESH_SOCKET; default %(default)s)")
    rn.add_argument("--workload-socket", type=Path,
                    default=Path(os.environ["IDMESH_WORKLOAD_SOCKET"]) if os.environ.get("IDMESH_WORKLOAD_SOCKET") else None,
                    help="the SPIFFE Workload API's socket, given to agents as SPIFFE_ENDPOINT_SOCKET (env "
                    "IDMESH_WORKLOAD_SOCKET; default: beside --socket, SOCKET-workload.sock)")
    rn.add_argument("--listen-port", type=int, default=51820, help="WireGuard UDP port (default %(default)s)")
    rn.add_argument("--no-discovery", action="store_true", help="do not announce or look for peers with mDNS")
    rn.add_argument("--wireguard", choices=["auto", "kernel", "wireguard-go"], default="auto",
                    help="WireGuard implementation (default: the kernel module if present, else wireguard-go)")
    rn.add_argument("--metrics", metavar="HOST:PORT", default=os.environ.get("IDMESH_METRICS"),
                    help="serve Prometheus metrics here, e.g. 127.0.0.1:9465 (env IDMESH_METRICS; default off)")
    rn.add_argument("--no-flow-log", action="store_true",
                    help="do not log denied and sampled accepted connections to the controller")
    rn.add_argument("--advertise-routes", metavar="PREFIX[,PREFIX...]",
                    default=os.environ.get("IDMESH_ADVERTISE_ROUTES", ""),
                    help="offer to route these prefixes for the mesh, e.g. 10.20.0.0/16 (env "
                    "IDMESH_ADVERTISE_ROUTES). Nobody's traffic uses the offer until a policy 'routes' rule names "
                    "this node")
    rn.add_argument("--advertise-exit-node", action="store_true",
                    default=os.environ.get("IDMESH_ADVERTISE_EXIT_NODE", "") in ("1", "yes", "true"),
                    help="offer to be an exit node (0.0.0.0/0 and ::/0; env IDMESH_ADVERTISE_EXIT_NODE=1)")
    rn.add_argument("--gateway-port", type=int, metavar="PORT",
                    help="UDP port of the gateway interface when offering routes (default: listen port + 1)")
    rn.add_argument("--principal-map", action="append", metavar="UID=PRINCIPAL",
                    default=[m for m in os.environ.get("IDMESH_PRINCIPAL_MAP", "").split(",") if m.strip()],
                    help="let the local user UID start agents for PRINCIPAL without a grant (repeatable; env "
                    "IDMESH_PRINCIPAL_MAP, comma-separated). Without it only root may, or anyone with the "
                    "principal's grant")
    rn.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = p.parse_args(argv)

    if args.command == "run":
        import asyncio

        from idmesh.logs import setup_logging
        from meshd.node.daemon import Daemon
        from meshd.routes.routing import advertised
        from meshd.settings import Settings

        setup_logging(args.verbose)
        try:
            offered = advertised(args.advertise_routes.split(","), args.advertise_exit_node)
        except ValueError as exc:
            raise InvalidInput(f"--advertise-routes: {exc}") from exc
        principal_map = _principal_map(args.principal_map)
        settings = Settings(
            state=args.state, interface=args.interface, socket=args.socket, workload_socket=args.workload_socket,
            listen_port=args.listen_port,
            discovery=not args.no_discovery, wireguard=args.wireguard, metrics=args.metrics,
            flow_log=not args.no_flow_log, advertise=offered,
            gateway_port=args.gateway_port or (args.listen_port + 1 if args.listen_port else 51821),
            principal_map=principal_map)
        asyncio.run(Daemon(settings).run())
        return 0

    from meshd.node.enroll import enroll

    done = enroll(_token(args), StateDir(args.state), args.name, args.force)
    node = done.response.node
    if args.json:
        print_json(done.state.read_record())
    else:
        print(f"enrolled {node.spiffe_id}")
        print(f"  addresses  {' '.join(node.addresses)}")
        print(f"  block      {' '.join(node.blocks)}")
        print(f"  {'owner' if node.owner else 'tags':<10} {node.owner or ','.join(node.tags) or '-'}")
        print(f"  valid to   {node.cert_not_after.isoformat(timespec='seconds')}")
        print(f"  state      {args.state}")
    return 0


def _token(args: Any) -> str:
    """The enrollment token: the argument, standard input (``-``) or ``--token-file``; exactly one of them."""
    if (args.token is None) == (args.token_file is None):
        raise InvalidInput("give the token, '-' to read it from standard input, or --token-file FILE (one of them)")
    if args.token_file is not None:
        try:
            return str(args.token_file.read_text().strip())
        except OSError as exc:
            raise InvalidInput(f"cannot read --token-file {args.token_file}: {exc.strerror or exc}") from exc
    return str(sys.stdin.readline().strip() if args.token == "-" else args.token)


def _principal_map(entries: list[str]) -> tuple[tuple[int, str], ...]:
    """``--principal-map 1000=nikita@acme.com`` (a uid or a user name), each one checked."""
    import pwd
    import re

    from meshcore.names import PRINCIPAL_PATTERN, normal_principal

    out = []
    for entry in entries:
        who, sep, principal = entry.strip().partition("=")
        if not sep or not re.match(PRINCIPAL_PATTERN, principal):
            raise InvalidInput(f"--principal-map {entry!r}: expected UID=PRINCIPAL, e.g. 1000=nikita@acme.com")
        try:
            uid = int(who) if who.isdigit() else pwd.getpwnam(who).pw_uid
        except KeyError as exc:
            raise InvalidInput(f"--principal-map {entry!r}: no local user {who!r}") from exc
        out.append((uid, normal_principal(principal)))
    return tuple(out)


def main() -> None:
    run("meshd", _main)
