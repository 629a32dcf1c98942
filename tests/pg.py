"""A PostgreSQL 15 cluster the tests own: made in a temporary directory, once per test session.

``initdb`` and ``pg_ctl`` from Debian's postgresql-15 package, run as the
``postgres`` user when the tests run as root (PostgreSQL refuses to run as
root); listening on a free loopback port and a socket in its own
directory, trusting local connections (nothing outside this machine's
loopback reaches it). Each test gets a database of its own
(:meth:`Cluster.new_database`). fsync is off: the tests prove what a
controller does when it or the database process dies, not the disk's
durability, and it keeps the suite fast. The cluster is stopped and its directory
removed when the session ends, passing or failing.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
_NAMES = itertools.count(1)


def missing() -> list[str]:
    """What this machine lacks to run a cluster (empty: nothing)."""
    out = [f"{BIN / tool} not found (apt-get install postgresql-15)" for tool in ("initdb", "pg_ctl")
           if not (BIN / tool).exists()]
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            out.append("no postgres user to run the cluster as")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, durable: bool = False, root: Path | None = None) -> None:
        """``durable``: fsync on, as in production (benchmarks, the demo); off for tests (see above).
        ``root``: where it lives (a new directory; default a temporary one)."""
        self.durable = durable
        if root is not None:
            root.mkdir(mode=0o700)
        self.root = root or Path(tempfile.mkdtemp(prefix="idmesh-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.log = self.root / "postgres.log"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(BIN / "initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "UTF8",
                  "--no-instructions")
        self.start()

    def _run(self, *args: object) -> None:
        command = [str(a) for a in args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {proc.stderr or proc.stdout}")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str) -> str:
        """The URL through the cluster's Unix socket: reachable from inside any network namespace."""
        return f"postgresql://postgres@/{database}?host={self.root}&port={self.port}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=400"
        if not self.durable:
            # (not synchronous_commit=off: a commit must survive the restarts tests make, and with fsync off
            # a commit is in the kernel's page cache, which an immediate stop of PostgreSQL does not lose)
            options += " -c fsync=off -c full_page_writes=off"
        self._run(BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """Stop (immediate: every connection dropped at once, as a crash does) and start again."""
        self.stop("immediate")
        self.start()

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def new_database(self, socket: bool = False) -> str:
        """A fresh, empty database; its URL (over TCP on loopback, or ``socket``: :meth:`socket_url`)."""
        import psycopg

        name = f"idmesh_{os.getpid()}_{next(_NAMES)}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                return self.socket_url(name) if socket else self.url(name)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        stop_cluster(self.root)


def stop_cluster(root: Path) -> None:
    """Stop the cluster made in ``root`` (if it runs) and remove it: also one a finished process left (the demo's
    ``--keep``)."""
    data = root / "data"
    if (data / "postmaster.pid").exists():
        command = [str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "60", "stop"]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, capture_output=True, timeout=120, check=False)
    shutil.rmtree(root, ignore_errors=True)
