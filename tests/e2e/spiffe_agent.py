"""A SPIFFE-aware program, run inside an agent by the e2e tests: it knows nothing of idmesh, only py-spiffe.

It finds the Workload API through ``SPIFFE_ENDPOINT_SOCKET``, as any SPIFFE
program does, and prints one JSON object a line for the test to read.

    server PORT                 mTLS on 0.0.0.0:PORT with its X509-SVID; greets each caller by SPIFFE ID, echoes
    client HOST:PORT SECONDS    dials with mTLS, keeps the connection for SECONDS echoing while the SVID rotates,
                                then dials once more with the rotated SVID; a JWT-SVID for audience "db"
    ids [SPIFFE_ID]             its own SVID's ID; with SPIFFE_ID, asks for that one's JWT-SVID too
    escape                      leaves its agent's cgroup (it runs as root) (it runs as root), then reports what the Workload API
                                says as its agent is revoked
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from spiffe import JwtSource, WorkloadApiClient, X509Source
from spiffetls import dial
from spiffetls.context import create_ssl_context
from spiffetls.tlsconfig.authorize import authorize_any


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def peer_id(conn: object) -> str:
    cert = conn.get_peer_certificate().to_cryptography()  # type: ignore[attr-defined]
    return str(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
               .get_values_for_type(x509.UniformResourceIdentifier)[0])


def serve(port: int) -> None:
    """A fresh TLS context per connection, from the source's current SVID: a pyOpenSSL context that has made a
    connection cannot take a new certificate, so spiffetls's own listen() would keep presenting the first one."""
    source = X509Source(timeout_in_seconds=10)
    say(ready=str(source.get_x509_context().default_svid.spiffe_id))
    listener = socket.create_server(("0.0.0.0", port))

    def talk(raw: socket.socket) -> None:
        try:
            ctx = create_ssl_context(SSL.TLS_SERVER_METHOD, source, authorize_any(),
                                     SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, False)
            c = SSL.Connection(ctx, raw)
            c.set_accept_state()
            c.do_handshake()
            c.sendall(f"hello {peer_id(c)} from {source.get_x509_context().default_svid.spiffe_id}\n".encode())
            while data := c.recv(1024):
                c.sendall(data)
        except Exception as exc:  # noqa: BLE001 (a test helper reports and goes on)
            say(server_error=str(exc))

    while True:
        raw, _ = listener.accept()
        threading.Thread(target=talk, args=(raw,), daemon=True).start()


def client(address: str, seconds: float) -> None:
    source = X509Source(timeout_in_seconds=10)
    first = source.get_x509_context().default_svid
    with JwtSource(timeout_in_seconds=10) as jwts:
        token = jwts.fetch_svid(audience={"db"})
    conn = dial(address, source, authorize_fn=authorize_any())
    greeting = conn.recv(1024).decode().strip()
    seen = {first.leaf.serial_number: first.leaf.not_valid_after_utc.isoformat()}
    echoes = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.sendall(f"ping {echoes}\n".encode())
        if conn.recv(1024).decode().strip() == f"ping {echoes}":
            echoes += 1
        leaf = source.get_x509_context().default_svid.leaf
        seen.setdefault(leaf.serial_number, leaf.not_valid_after_utc.isoformat())
        time.sleep(0.5)
    conn.close()
    again = dial(address, source, authorize_fn=authorize_any())  # the rotated SVID, to a rotated server
    say(id=str(first.spiffe_id), server=peer_id(conn), greeting=greeting, echoes=echoes,
        svids=list(seen.values()), again=again.recv(1024).decode().strip(), jwt=token.token,
        jwt_id=str(token.spiffe_id), key_file=os.environ["IDMESH_AGENT_KEY"])


def ids(other: str | None) -> None:
    with WorkloadApiClient() as api:
        own = api.fetch_x509_svid()
        out: dict[str, object] = {"id": str(own.spiffe_id)}
        if other:
            try:
                api.fetch_jwt_svid(audience={"db"}, subject=other)  # type: ignore[arg-type]
                out["other"] = "issued"
            except Exception as exc:  # noqa: BLE001
                out["other"] = str(exc)
    say(**out)


def cgroup2_root() -> Path:
    """Where cgroup2 is mounted in this mount namespace (``ip netns exec`` makes one), or a mount of our own."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2" and fields[3] == "/":
            return Path(fields[4])
    target = tempfile.mkdtemp()
    subprocess.run(["mount", "-t", "cgroup2", "none", target], check=True)
    return Path(target)


def escape() -> None:
    """Root may leave its agent's cgroup (README: agents should run with --user); then it watches revocation."""
    errors: list[str] = []
    with WorkloadApiClient() as api:
        first = api.fetch_x509_svid()
        api.stream_x509_contexts(on_success=lambda ctx: None, on_error=lambda e: errors.append(str(e)),
                                 retry_connect=False)
        time.sleep(0.5)
        (cgroup2_root() / "cgroup.procs").write_text(str(os.getpid()))
        say(id=str(first.spiffe_id), escaped=True)
        sys.stdin.readline()  # the test revokes the agent, then writes a line
        time.sleep(0.5)
        try:
            api.fetch_x509_svid()
            after = "issued"
        except Exception as exc:  # noqa: BLE001
            after = str(exc)
    say(stream=errors, fetch_after=after)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        serve(int(sys.argv[2]))
    elif mode == "client":
        client(sys.argv[2], float(sys.argv[3]))
    elif mode == "ids":
        ids(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        escape()
