"""deploy's SSH side against an in-process asyncssh server on loopback: every way of failing to
connect becomes one line a person can act on, and commands run as root (sudo -n otherwise)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from deploy.inventory import HostSpec, parse_inventory
from deploy.plan import HostFailure
from deploy.ssh import connect

PASSWORD = "right"


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return password == PASSWORD


COMMANDS: list[tuple[str, str]] = []


async def _session(process: asyncssh.SSHServerProcess[str]) -> None:
    """``fail ...`` exits 3 with a message on stderr; a few commands answer as on a host; others echo."""
    command = process.command or ""
    stdin = await process.stdin.read() if ("cat" in command or " - " in command) else ""
    COMMANDS.append((command, stdin))
    if " - wait " in command:  # the deploy helper, read from stdin
        process.stdout.write('{"ready": true}\n')
        process.exit(0)
    elif "MainPID" in command:
        process.stdout.write("4242\n")
        process.exit(0)
    elif "fail" in command:
        process.stderr.write("Traceback (most recent call last):\nERROR: no matching distribution for idmesh\n")
        process.exit(3)
    else:
        process.stdout.write(f"ran: {command}|{stdin}")
        process.exit(0)


@pytest.fixture
def host_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def spec(port: int, known_hosts: Path | None, *, password: str = PASSWORD, user: str = "root",
         timeout: float = 5) -> HostSpec:
    extra = f"known_hosts: {known_hosts}" if known_hosts else "known_hosts: ignore"
    text = (f"hosts:\n  h: {{address: 127.0.0.1, port: {port}, user: {user}, password: {password}, tags: [t], "
            f"connect_timeout: {timeout}, {extra}}}\n")
    return parse_inventory(text, "hosts.yaml", environ={}).hosts[0]


async def _with_server(host_key: asyncssh.SSHKey, body: Any) -> Any:
    server = await asyncssh.listen("127.0.0.1", 0, server_factory=_Server, server_host_keys=[host_key],
                                   process_factory=_session)
    try:
        return await body(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def known_hosts_file(tmp_path: Path, key: asyncssh.SSHKey, port: int) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(f"[127.0.0.1]:{port} {key.export_public_key().decode().strip()}\n")
    return path


def failure(coro: Any) -> str:
    with pytest.raises(HostFailure) as err:
        asyncio.run(coro)
    return str(err.value)


async def _connect_only(s: HostSpec) -> None:
    async with connect(s):
        pass


def test_commands_run_as_root_and_their_failures_are_one_line(tmp_path: Path, host_key: asyncssh.SSHKey) -> None:
    async def body(port: int) -> tuple[str, str, str]:
        known = known_hosts_file(tmp_path, host_key, port)
        async with connect(spec(port, known)) as host:
            out = await host._run(["meshd", "enroll", "idm1.secret"])
            with pytest.raises(HostFailure) as err:
                await host._run(["fail", "now"], what="pip install")
        async with connect(spec(port, known, user="deploy")) as host:
            sudo = await host._run(["cat"], input="unit text")
        return out, str(err.value), sudo

    out, failed, sudo = asyncio.run(_with_server(host_key, body))
    assert out == "ran: meshd enroll idm1.secret|"
    assert failed == "pip install failed: ERROR: no matching distribution for idmesh"
    assert sudo == "ran: sudo -n -- cat|unit text"


def test_a_wrong_password(tmp_path: Path, host_key: asyncssh.SSHKey) -> None:
    async def body(port: int) -> None:
        await _connect_only(spec(port, known_hosts_file(tmp_path, host_key, port), password="wrong"))

    assert failure(_with_server(host_key, body)) == \
        "authentication failed: root@127.0.0.1 did not accept the password"


def test_an_unknown_host_key(tmp_path: Path, host_key: asyncssh.SSHKey) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519")

    async def body(port: int) -> None:
        await _connect_only(spec(port, known_hosts_file(tmp_path, other, port)))

    reason = failure(_with_server(host_key, body))
    assert reason.startswith("host key not trusted: ") and "known_hosts: ignore" in reason, reason


def test_refused_and_silent_hosts_are_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert failure(_connect_only(spec(closed, None))) == \
        f"unreachable: 127.0.0.1:{closed} refused the connection (is sshd running?)"

    async def silent() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
        try:
            async with server:
                await _connect_only(spec(server.sockets[0].getsockname()[1], None, timeout=0.3))
        finally:
            for writer in accepted:
                writer.close()
                await writer.wait_closed()

    assert failure(silent()).startswith("unreachable: no SSH answer from 127.0.0.1:")


def test_systemd_steps(tmp_path: Path, host_key: asyncssh.SSHKey) -> None:
    """What install_unit and start run on a systemd host, in order."""
    COMMANDS.clear()

    async def body(port: int) -> int | None:
        s = spec(port, known_hosts_file(tmp_path, host_key, port))
        s = replace(s, service="systemd")
        async with connect(s) as host:
            await host.install_unit("[Service]\nExecStart=/opt/idmesh/bin/meshd run\n")
            return await host.start(restart=True)

    assert asyncio.run(_with_server(host_key, body)) == 4242
    commands = [c for c, _ in COMMANDS]
    assert commands[0].startswith("sh -c ") and commands[0].endswith(" sh /etc/systemd/system/meshd.service")
    assert COMMANDS[0][1] == "[Service]\nExecStart=/opt/idmesh/bin/meshd run\n"
    assert commands[1:3] == ["systemctl daemon-reload", "systemctl enable meshd.service"]
    assert commands[3] == "systemctl restart meshd.service"
    assert commands[4].startswith("python3 - wait ") and "def probe" in COMMANDS[4][1]  # the helper's source
    assert commands[5] == "systemctl show -p MainPID --value meshd.service"
