"""A real controller on loopback, driven through the real commands.

Each test gets its own data directory and port; the controller runs as a
subprocess (``mesh-controller serve``) exactly as a user starts it, and is
killed by PID when the test ends, passing or failing. Every test that
takes the ``controller`` fixture runs twice: on SQLite and on PostgreSQL
(a database of its own in the session's cluster, tests/pg.py).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.pg import Cluster

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_pair() -> int:
    """A UDP port P with P+1 free too, on loopback: the controller's STUN takes both. Not the default 3478, so
    two test runs on one machine (a developer's and CI's) do not take each other's."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def cli(*args: str, env: dict[str, str] | None = None, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one of the installed commands (mesh-controller, meshd, meshctl)."""
    prog, *rest = args
    proc = subprocess.run([str(BIN / prog), *rest], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@dataclass
class Controller:
    data: Path
    port: int
    url: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    stun: int = field(default_factory=free_udp_pair)
    db: str | None = None
    """The PostgreSQL database's URL (None: SQLite in ``data``)."""

    def start(self) -> None:
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                [str(BIN / "mesh-controller"), "serve", "--data", str(self.data), "--listen",
                 f"127.0.0.1:{self.port}", "--stun-listen", f"127.0.0.1:{self.stun}", *self.extra],
                stdout=logf, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"controller exited: {self.log.read_text()}")
            try:
                ctx = ssl.create_default_context(cafile=str(self.data / "ca.crt"))
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw, \
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("controller did not start listening in 20 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def token(self, *args: str) -> str:
        return cli("meshctl", "token", "create", *args, env=self.env, check=True).stdout.strip()

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (``?`` placeholders) read straight from the store, whichever engine it is."""
        if self.db is None:
            with closing(sqlite3.connect(self.data / "controller.db")) as db:
                return db.execute(sql, args).fetchall()
        import psycopg

        with psycopg.connect(self.db) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("%", "%%").replace("?", "%s"), args).fetchall()]


@contextmanager
def running_controller(data: Path, log: Path, db: str | None = None) -> Iterator[Controller]:
    """A new mesh in ``data`` (acme.mesh; its store SQLite there, or the PostgreSQL database ``db``) and its
    controller on a free loopback port, killed on the way out."""
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    cli("mesh-controller", "init", "--domain", "acme.mesh", "--data", str(data), "--url", url,
        *(("--db", db) if db else ()), check=True)
    c = Controller(data, port, url, log, env={"IDMESH_ADMIN": str(data / "admin.conf")}, db=db)
    c.start()
    try:
        yield c
    finally:
        c.stop(signal.SIGKILL)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the data directory) or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


@pytest.fixture
def controller(tmp_path: Path, store_url: str | None) -> Iterator[Controller]:
    with running_controller(tmp_path / "ctl", tmp_path / "controller.log", store_url) as c:
        yield c


class Device:
    """An enrolled node, speaking to the controller with its own certificate as meshd does (login, agents)."""

    def __init__(self, controller: Controller, state: Path) -> None:
        import json

        import httpx

        from idmesh.client import client_ssl_context

        self.controller = controller
        self.state = state
        self.record = json.loads((state / "node.json").read_text())
        self.name: str = self.record["name"]
        ctx = client_ssl_context((state / "ca.crt").read_text(), cert_file=state / "node.crt",
                                 key_file=state / "node.key")
        self.http = httpx.Client(base_url=controller.url, verify=ctx, trust_env=False, timeout=30)

    def login(self, key: object | None = None, ttl: int = 3600) -> tuple[object, dict[str, object]]:
        """Start a login for a fresh key (or ``key``): (the key, the controller's LoginStarted)."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from meshcore.identity import build_csr

        key = key or ed25519.Ed25519PrivateKey.generate()
        resp = self.http.post("/v1/login", json={"csr": build_csr(key), "ttl_seconds": ttl})  # type: ignore[arg-type]
        assert resp.status_code == 200, resp.text
        return key, resp.json()

    def close(self) -> None:
        self.http.close()


def enroll_device(controller: Controller, state: Path, name: str, *token_flags: str) -> Device:
    token = controller.token(*(token_flags or ("--tag", "agents")))
    cli("meshd", "enroll", token, "--name", name, "--state", str(state), check=True)
    return Device(controller, state)
