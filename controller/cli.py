"""``mesh-controller``: create a mesh (``init``) and run its API (``serve``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime

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
    init.add_argument("--json", action="store_true", help="print the result as JSON")

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
    args = p.parse_args(argv)

    if args.command == "init":
        from .authority import default_url, init_data_dir

        result = init_data_dir(args.data, args.domain, args.url or default_url(), datetime.now(UTC),
                               args.node_block_v4, args.node_block_v6, args.node_cert_ttl)
        if args.json:
            print_json(result)
        else:
            print(f"created mesh {result['domain']} in {args.data}")
            print(f"  controller URL   {result['url']}")
            print(f"  CA fingerprint   sha256:{result['ca_fingerprint']}")
            print(f"  overlay          {result['prefix_v4']}  {result['prefix_v6']}")
            print(f"  admin credential {result['admin_conf']} (keep it secret; meshctl reads it)")
            print(f"next: mesh-controller serve --data {args.data}")
        return 0

    from .server import serve

    setup_logging()
    serve(args.data, args.listen, args.max_body, args.metrics)
    return 0


def main() -> None:
    run("mesh-controller", _main)
