"""``mesh-controller``: create a mesh (``init``) and run its API (``serve``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from idmesh.cli import duration, env_path, parser, print_json, run
from idmesh.logs import setup_logging
from idmesh.paths import DEFAULT_DATA

from .middleware import DEFAULT_MAX_BODY


def _main(argv: Sequence[str] | None) -> int:
    p = parser(
        "mesh-controller",
        "The idmesh controller: the mesh's certificate authority, registry and policy server.",
        epilog="examples:\n"
        "  mesh-controller init --domain acme.mesh --data /var/lib/idmesh --url https://ctl.acme.internal:8443\n"
        "  mesh-controller serve --data /var/lib/idmesh --listen 0.0.0.0:8443\n\n"
        "several controllers on one PostgreSQL database (SPEC §8):\n"
        "  mesh-controller init --domain acme.mesh --data /var/lib/idmesh --url https://ctl-1:8443 \\\n"
        "      --db postgresql://idmesh@db.acme.internal/idmesh\n"
        "  scp ctl-1:/var/lib/idmesh/ca.key /root/ca.key   # the mesh CA key, over a channel you trust\n"
        "  mesh-controller join --data /var/lib/idmesh --url https://ctl-2:8443 \\\n"
        "      --db postgresql://idmesh@db.acme.internal/idmesh --ca-key /root/ca.key\n\n"
        "The data directory can also be given as IDMESH_DATA.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = sub.add_parser("init", help="create the mesh CA, the store and the admin credential",
                          description="Create a new mesh in DIR: an Ed25519 CA (ca.key is 0600), the "
                          "controller's TLS certificate, an SQLite store and DIR/admin.conf for meshctl. "
                          "Refuses to run where a CA already exists.", formatter_class=p.formatter_class)
    init.add_argument("--domain", required=True, help="trust domain, e.g. acme.mesh (the host part of SPIFFE IDs)")
    init.add_argument("--data", type=lambda s: env_path("", s), default=env_path("IDMESH_DATA", DEFAULT_DATA),
                      help="data directory (env IDMESH_DATA; default %(default)s)")
    init.add_argument("--url", help="how nodes reach the controller, https://HOST:PORT; goes into admin.conf "
                      "and every token (default https://<hostname>:8443)")
    init.add_argument("--node-block-v4", type=int, default=26, metavar="LEN",
                      help="IPv4 prefix length of each node's block: the node plus its agents (default /26)")
    init.add_argument("--node-block-v6", type=int, default=64, metavar="LEN",
                      help="IPv6 prefix length of each node's block (default /64)")
    init.add_argument("--node-cert-ttl", type=duration, default="24h", metavar="DURATION",
                      help="lifetime of node certificates (default 24h)")
    init.add_argument("--db", metavar="URL", help="a PostgreSQL database (postgresql://USER[:PASS]@HOST[:PORT]/DB) "
                      "holding no mesh yet, for several controllers (mesh-controller join); default: SQLite in DIR")
    init.add_argument("--json", action="store_true", help="print the result as JSON")

    join = sub.add_parser("join", help="add a controller replica to a mesh on PostgreSQL",
                          description="Make DIR a replica of the mesh in the PostgreSQL database --db: it serves the "
                          "whole API from the same database, with its own TLS certificate for --url and its own "
                          "admin.conf. Replicas share the mesh CA's key: --ca-key is the first controller's ca.key "
                          "(copied over a channel you trust; it is written 0600 and never stored in the database). "
                          "Nodes learn of the new replica from their netmap stream.",
                          formatter_class=p.formatter_class)
    join.add_argument("--data", type=lambda s: env_path("", s), default=env_path("IDMESH_DATA", DEFAULT_DATA),
                      help="data directory of this replica (env IDMESH_DATA; default %(default)s)")
    join.add_argument("--db", required=True, metavar="URL", help="the mesh's PostgreSQL database")
    join.add_argument("--url", required=True, help="how nodes reach this replica, https://HOST:PORT")
    join.add_argument("--ca-key", required=True, type=Path, metavar="FILE", help="the mesh CA's private key")
    join.add_argument("--json", action="store_true", help="print the result as JSON")

    gone = sub.add_parser("leave", help="take a replica out of the mesh's list of controllers",
                          description="Remove this replica's URL from the list every node, token and admin.conf "
                          "made from now on carries (nodes learn it from their stream and stop trying it). Stop its "
                          "'serve' after: nodes still streaming from it move on then. The last controller cannot "
                          "leave.", formatter_class=p.formatter_class)
    gone.add_argument("--data", type=lambda s: env_path("", s), default=env_path("IDMESH_DATA", DEFAULT_DATA),
                      help="data directory of the replica (env IDMESH_DATA; default %(default)s)")
    gone.add_argument("--json", action="store_true", help="print the result as JSON")

    srv = sub.add_parser("serve", help="run the HTTPS API (mTLS)",
                         description="Serve the controller API over TLS 1.3. Admin calls need the admin "
                         "credential, node calls a node certificate; enrollment needs a token.",
                         formatter_class=p.formatter_class)
    srv.add_argument("--data", type=lambda s: env_path("", s), default=env_path("IDMESH_DATA", DEFAULT_DATA),
                     help="data directory (env IDMESH_DATA; default %(default)s)")
    srv.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT to listen on (default %(default)s)")
    srv.add_argument("--metrics", metavar="HOST:PORT", default=os.environ.get("IDMESH_METRICS"),
                     help="serve Prometheus metrics here, e.g. 127.0.0.1:9464 (env IDMESH_METRICS; default off)")
    srv.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, metavar="BYTES",
                     help="largest request body accepted; larger ones get HTTP 413 (default %(default)s)")
    srv.add_argument("--stun-listen", metavar="HOST:PORT", default="",
                     help="STUN for nodes behind NAT, on UDP PORT and PORT+1 (default: the --listen host, 3478)")
    srv.add_argument("--no-stun", action="store_true", help="no STUN server")
    srv.add_argument("--relay", metavar="turn:HOST:PORT",
                     help="a TURN server (coturn with use-auth-secret) for nodes no direct path reaches; each node "
                     "gets short-lived credentials made with --relay-secret-file's secret")
    srv.add_argument("--relay-secret-file", type=Path, metavar="FILE",
                     help="the TURN server's static-auth-secret (0600; never logged)")
    srv.add_argument("--svid-ttl", type=duration, default="1h", metavar="DURATION",
                     help="longest life of an X509-SVID an agent gets from its node's SPIFFE Workload API; it is "
                     "signed again before it ends, and never outlives the agent (default %(default)s, at least 10s)")
    srv.add_argument("--workers", type=int, default=1, metavar="N",
                     help="serve with N processes, to use N cores (PostgreSQL store only; default 1)")
    srv.add_argument("--flow-retention", type=duration, default="7d", metavar="DURATION",
                     help="how long flow records are kept (default %(default)s)")
    _oidc_parser(sub, p.formatter_class)
    args = p.parse_args(argv)
    if args.command == "serve" and args.svid_ttl < timedelta(seconds=10):
        p.error("--svid-ttl must be at least 10s")
    if args.command == "serve" and not 1 <= args.workers <= 64:
        p.error("--workers must be between 1 and 64")

    if args.command == "oidc":
        return _oidc(args)
    if args.command == "init":
        from .authority import default_url, init_data_dir

        result = init_data_dir(args.data, args.domain, args.url or default_url(), datetime.now(UTC),
                               args.node_block_v4, args.node_block_v6, args.node_cert_ttl, db=args.db)
        if args.json:
            print_json(result)
        else:
            print(f"created mesh {result['domain']} in {args.data}")
            print(f"  controller URL   {result['url']}")
            print(f"  CA fingerprint   sha256:{result['ca_fingerprint']}")
            print(f"  overlay          {result['prefix_v4']}  {result['prefix_v6']}")
            print(f"  store            {result['database']}")
            print(f"  admin credential {result['admin_conf']} (keep it secret; meshctl reads it)")
            print(f"next: mesh-controller serve --data {args.data}")
        return 0

    if args.command == "join":
        from .authority import join_data_dir

        joined = join_data_dir(args.data, args.db, args.url, args.ca_key, datetime.now(UTC))
        if args.json:
            print_json(joined)
        else:
            print(f"joined mesh {joined['domain']} as {joined['url']}")
            print(f"  controllers      {'  '.join(joined['controllers'])}")
            print(f"  CA fingerprint   sha256:{joined['ca_fingerprint']}")
            print(f"  admin credential {joined['admin_conf']}")
            print(f"next: mesh-controller serve --data {args.data}")
        return 0

    if args.command == "leave":
        from .authority import leave

        left = leave(args.data, datetime.now(UTC))
        if args.json:
            print_json(left)
        else:
            print(f"{left['url']} left the mesh's controllers; they are now: {'  '.join(left['controllers'])}")
            print(f"next: stop its 'mesh-controller serve --data {args.data}'")
        return 0

    from .server import NatOptions, ServeOptions, serve

    setup_logging()
    nat = NatOptions(None if args.no_stun else args.stun_listen, args.relay, args.relay_secret_file)
    serve(args.data, args.listen, ServeOptions(args.max_body, args.metrics, nat, args.svid_ttl, args.flow_retention,
                                               args.workers))
    return 0


def _oidc_parser(sub: Any, formatter: Any) -> None:
    oidc = sub.add_parser("oidc", help="the organisation's OpenID Connect provider, for meshctl login",
                          description="People log in with 'meshctl login'. Without a provider (the default) an "
                          "administrator approves each login ('meshctl login approve CODE --principal P'); with "
                          "one, the controller runs the provider's device flow and trusts its verified ID tokens.",
                          formatter_class=formatter).add_subparsers(dest="action", required=True, metavar="ACTION")
    data = {"type": lambda s: env_path("", s), "default": env_path("IDMESH_DATA", DEFAULT_DATA),
            "help": "data directory (env IDMESH_DATA; default %(default)s)"}
    st = oidc.add_parser("set", help="trust an OpenID provider (audited)",
                         description="Check that ISSUER's discovery document offers the device flow, then store the "
                         "configuration. The running controller uses it for the next login. The client secret is "
                         "read from its file at each use and never stored.",
                         epilog="example:\n  mesh-controller oidc set --issuer https://idp.acme.com --client-id idmesh "
                         "\\\n      --client-secret-file /etc/idmesh/oidc-secret", formatter_class=formatter)
    st.add_argument("--data", **data)
    st.add_argument("--issuer", required=True, metavar="URL", help="the provider's issuer, https://...")
    st.add_argument("--client-id", required=True, metavar="ID")
    st.add_argument("--client-secret-file", metavar="FILE", help="the client secret (absent: a public client)")
    st.add_argument("--ca-file", metavar="FILE", help="CA bundle for the provider's TLS (default: the system's)")
    st.add_argument("--principal-claim", default="email", metavar="CLAIM",
                    help="the ID token claim naming the principal (default %(default)s; <claim>_verified must be "
                    "true where the provider sends one, and always for email)")
    st.add_argument("--no-check", action="store_true", help="store it without fetching the discovery document")
    for action, text in (("show", "print the provider in use (never the secret)"),
                         ("clear", "go back to administrator approval (audited)")):
        a = oidc.add_parser(action, help=text)
        a.add_argument("--data", **data)
        a.add_argument("--json", action="store_true")


def _oidc(args: Any) -> int:
    import asyncio

    from .context import Context
    from .logins import clear_oidc, oidc_config, set_oidc
    from .oidc import OidcConfig, OidcProvider

    ctx = Context.open(args.data)
    now = datetime.now(UTC)
    actor = f"mesh-controller oidc {args.action} (local)"
    try:
        if args.action == "set":
            def absolute(value: str | None) -> str | None:
                return str(Path(value).resolve()) if value else None

            config = OidcConfig(args.issuer, args.client_id, absolute(args.client_secret_file), absolute(args.ca_file),
                                args.principal_claim)
            if not args.no_check:
                config.secret()  # the file must be readable now

                async def probe() -> None:
                    provider = OidcProvider(config)
                    try:
                        await provider.metadata()
                    finally:
                        await provider.close()

                asyncio.run(probe())
            set_oidc(ctx, actor, config, now)
            print(f"logins now go through {config.issuer} (client {config.client_id}, principal claim "
                  f"{config.principal_claim})")
        elif args.action == "clear":
            print("logins now need an administrator's approval" if clear_oidc(ctx, actor, now)
                  else "no identity provider was set; logins need an administrator's approval")
        else:
            with ctx.store.transaction() as tx:
                shown = oidc_config(tx)
            if args.json:
                print_json(None if shown is None else dict(vars(shown)))
            elif shown is None:
                print("no identity provider: an administrator approves each login (meshctl login approve)")
            else:
                for key, value in vars(shown).items():
                    print(f"{key.replace('_', ' '):<20} {value if value is not None else '-'}")
    finally:
        ctx.store.close()
    return 0


def main() -> None:
    run("mesh-controller", _main)
