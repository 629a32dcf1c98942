"""``make demo``: a controller and four nodes on this machine, identities shown working.

Everything runs in a temporary directory with the real commands
(``mesh-controller``, ``meshd``, ``meshctl``); on exit or Ctrl-C the
controller is stopped by PID and the directory removed. ``--keep`` leaves the
mesh up to explore and prints how to tear it down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
NODES = [  # name, token flags: the cast of the SPEC's seed example
    ("laptop", ["--owner", "nikita@acme.com"]),
    ("db", ["--tag", "db"]),
    ("agents", ["--tag", "agents"]),
    ("exit-eu", ["--tag", "exit"]),
]


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def sh(*args: str, env: dict[str, str], check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    shown = " ".join(a if len(a) < 60 else a[:28] + "…" + a[-8:] for a in args)
    if not quiet:
        print(f"$ {shown}", flush=True)
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).rstrip()
    if out and not quiet:
        print("  " + out.replace("\n", "\n  "))
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: step failed: {shown}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, ca: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                ctx.wrap_socket(raw, server_hostname="127.0.0.1").close()
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("demo: the controller did not start")


def main() -> None:
    ap = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the mesh running to explore with meshctl")
    args = ap.parse_args()
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="idmesh-demo-"))
    data = work / "controller"
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    env = {**os.environ, "IDMESH_ADMIN": str(data / "admin.conf")}
    controller: subprocess.Popen[bytes] | None = None

    def teardown(*_: object) -> None:
        if controller is not None and controller.poll() is None:
            controller.terminate()
            controller.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        step("1. a mesh: the controller is its CA (Ed25519) and registry (SQLite)")
        sh("mesh-controller", "init", "--domain", "acme.mesh", "--data", str(data), "--url", url, env=env)
        with (work / "controller.log").open("wb") as log:
            controller = subprocess.Popen([str(BIN / "mesh-controller"), "serve", "--data", str(data),
                                           "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        wait_listening(port, data / "ca.crt")
        print(f"  controller pid {controller.pid} serving {url} (mTLS)")

        step("2. nodes join with one-line tokens; keys are made on each node and never leave it")
        for name, flags in NODES:
            token = sh("meshctl", "token", "create", *flags, "--ttl", "10m", env=env).stdout.strip()
            sh("meshd", "enroll", token, "--name", name, "--state", str(work / "nodes" / name), env=env)

        step("3. every node is an X509-SVID: spiffe://acme.mesh/node/<name>, with its overlay block")
        sh("meshctl", "nodes", "list", env=env)
        db = work / "nodes" / "db"
        sh_openssl = subprocess.run(["openssl", "verify", "-CAfile", str(db / "ca.crt"), str(db / "node.crt")],
                                    capture_output=True, text=True)
        print(f"$ openssl verify -CAfile ca.crt node.crt\n  {sh_openssl.stdout.strip() or sh_openssl.stderr.strip()}")
        text = subprocess.run(["openssl", "x509", "-in", str(db / "node.crt"), "-noout", "-ext",
                               "subjectAltName,keyUsage,extendedKeyUsage"], capture_output=True, text=True).stdout
        print("  " + text.strip().replace("\n", "\n  "))

        step("4. bad input is refused with one line, and changes nothing")
        used = sh("meshctl", "token", "create", "--tag", "ci", env=env).stdout.strip()
        sh("meshd", "enroll", used, "--name", "ci-1", "--state", str(work / "nodes" / "ci-1"), env=env)
        sh("meshd", "enroll", used, "--name", "ci-2", "--state", str(work / "nodes" / "ci-2"), env=env, check=False)
        sh("meshd", "enroll", "idm1.not-a-token", "--state", str(work / "nodes" / "x"), env=env, check=False)

        step("5. removing a node revokes its certificate: the controller no longer accepts it")
        sh("meshctl", "nodes", "remove", "ci-1", env=env)
        records = json.loads(sh("meshctl", "nodes", "list", "--json", env=env, quiet=True).stdout)
        print(f"  {len(records)} nodes remain: {', '.join(r['name'] for r in records)}")
        print(f"\ndemo finished in {time.monotonic() - t0:.1f} s")
        if args.keep:
            print(f"\nthe mesh is still up. Try:\n  export IDMESH_ADMIN={data / 'admin.conf'}\n"
                  f"  {BIN / 'meshctl'} nodes list\n"
                  f"tear it down with:\n  kill {controller.pid}; rm -rf {work}")
            controller = None
            return
    except KeyboardInterrupt:
        print("\ndemo: interrupted, cleaning up")
    finally:
        if not args.keep or controller is not None:
            teardown()


if __name__ == "__main__":
    main()
