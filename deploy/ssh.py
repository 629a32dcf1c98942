"""A host reached over SSH (asyncssh): the I/O side of a deployment.

:func:`connect` opens the connection and maps every way it can fail to a
:class:`~deploy.plan.HostFailure` whose message says why in terms a person
can act on (wrong password, host key not trusted, unreachable...).
:class:`SshHost` runs the steps: the helper :mod:`deploy.remote` for
probing and for starting meshd, SFTP for the wheels, pip, systemctl and
``meshd enroll``. Commands run as root: directly when logged in as root,
else through ``sudo -n`` (passwordless sudo; a password prompt is a failure).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from .artifacts import Wheel
from .inventory import HostSpec
from .plan import HostFailure

__all__ = ["REMOTE_HELPER", "UNIT_NAME", "RemoteHost", "SshHost", "connect"]

REMOTE_HELPER = (Path(__file__).parent / "remote.py").read_text()
UNIT_NAME = "meshd.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
COMMAND_TIMEOUT = 900.0


class RemoteHost(Protocol):
    """The steps the runner drives on one host (real: :class:`SshHost`; tests use a fake)."""

    async def probe(self) -> dict[str, Any]: ...

    async def install(self, wheels: list[Path], project: Wheel, *, venv_exists: bool) -> None: ...

    async def install_unit(self, text: str) -> None: ...

    async def enroll(self, token: str, *, force: bool) -> dict[str, Any]: ...

    async def start(self, *, restart: bool) -> int | None: ...


@asynccontextmanager
async def connect(spec: HostSpec) -> AsyncIterator[SshHost]:
    import asyncssh

    options: dict[str, Any] = {"port": spec.port, "username": spec.user, "connect_timeout": spec.connect_timeout}
    if not spec.check_host_key:
        options["known_hosts"] = None
    elif spec.known_hosts is not None:
        options["known_hosts"] = str(spec.known_hosts)
    if spec.password is not None:
        options.update(password=spec.password, client_keys=None, agent_path=None)
    elif spec.key_file is not None:
        options.update(client_keys=[str(spec.key_file)], passphrase=spec.passphrase, agent_path=None)
    try:
        conn = await asyncssh.connect(spec.address, **options)
    except asyncssh.PermissionDenied:
        how = "password" if spec.password is not None else "key" if spec.key_file else "keys (agent, ~/.ssh)"
        raise HostFailure(f"authentication failed: {spec.user}@{spec.address} did not accept the {how}") from None
    except asyncssh.HostKeyNotVerifiable as exc:
        where = spec.known_hosts or "~/.ssh/known_hosts"
        raise HostFailure(f"host key not trusted: {exc.reason} (add the host's key to {where}, "
                          "or set known_hosts: ignore)") from None
    except asyncssh.DisconnectError as exc:
        raise HostFailure(f"ssh: {exc.reason}") from None
    except TimeoutError:
        raise HostFailure(f"unreachable: no SSH answer from {spec.address}:{spec.port} within "
                          f"{spec.connect_timeout:g} s") from None
    except ConnectionRefusedError:
        raise HostFailure(f"unreachable: {spec.address}:{spec.port} refused the connection (is sshd running?)") \
            from None
    except socket.gaierror as exc:
        raise HostFailure(f"unreachable: cannot resolve {spec.address}: {exc.strerror}") from None
    except OSError as exc:
        raise HostFailure(f"unreachable: {spec.address}:{spec.port}: {exc.strerror or exc}") from None
    except asyncssh.Error as exc:
        raise HostFailure(f"ssh: {exc}") from None
    try:
        yield SshHost(spec, conn)
    finally:
        conn.close()
        try:
            async with asyncio.timeout(5):
                await conn.wait_closed()
        except (TimeoutError, OSError):
            pass


class SshHost:
    def __init__(self, spec: HostSpec, conn: Any) -> None:
        self.spec = spec
        self.conn = conn

    # -- plumbing --------------------------------------------------------------------------------------------
    async def _run(self, argv: list[str], *, root: bool = True, input: str | None = None,
                   timeout: float = COMMAND_TIMEOUT, what: str | None = None) -> str:
        import asyncssh

        what = what or _short(argv)
        command = shlex.join(argv)
        if root and self.spec.sudo:
            command = "sudo -n -- " + command
        try:
            async with asyncio.timeout(timeout):
                done = await self.conn.run(command, input=input, check=False)
        except TimeoutError:
            raise HostFailure(f"{what} did not finish within {timeout:g} s") from None
        except (asyncssh.Error, OSError) as exc:
            raise HostFailure(f"connection lost during {what}: {getattr(exc, 'reason', None) or exc}") from None
        if done.exit_status != 0:
            raise CommandFailed(done.exit_status,
                                _failure(what, done.exit_status, str(done.stderr or ""), str(done.stdout or "")))
        return str(done.stdout or "")

    async def _helper(self, op: str, args: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        out = await self._run([self.spec.python, "-", op, json.dumps(args)], input=REMOTE_HELPER, timeout=timeout,
                              what=f"the deploy helper ({op})")
        try:
            return dict(json.loads(out))
        except ValueError:
            raise HostFailure(f"the host's helper ({op}) answered something that is not JSON: {out[:200]!r}") \
                from None

    def _places(self) -> dict[str, Any]:
        s = self.spec
        return {"install_dir": s.install_dir, "state": s.state, "socket": s.socket, "interface": s.interface,
                "pidfile": s.pidfile, "log": s.log, "service": s.service, "unit": UNIT_NAME, "unit_path": UNIT_PATH}

    # -- steps -----------------------------------------------------------------------------------------------
    async def probe(self) -> dict[str, Any]:
        try:
            return await self._helper("probe", self._places())
        except CommandFailed as exc:
            if exc.status in (126, 127):
                raise HostFailure(f"{self.spec.python} was not found on the host (install python3 and "
                                  "python3-venv, or set python:)") from None
            raise

    async def install(self, wheels: list[Path], project: Wheel, *, venv_exists: bool) -> None:
        import asyncssh

        tmp = (await self._run(["mktemp", "-d", "/tmp/idmesh-deploy.XXXXXXXX"], root=False)).strip()
        try:
            try:
                async with self.conn.start_sftp_client() as sftp:
                    await sftp.put([str(w) for w in wheels], tmp)
            except (asyncssh.Error, OSError) as exc:
                raise HostFailure(f"uploading the wheels to {tmp} failed: {getattr(exc, 'reason', None) or exc}") \
                    from None
            install = self.spec.install_dir
            if not venv_exists:
                await self._run([self.spec.python, "-m", "venv", install], what="creating the virtual environment")
            pip = [f"{install}/bin/python", "-m", "pip", "--disable-pip-version-check", "--no-input", "-q",
                   "install", "--no-index", "--find-links", tmp]
            wheel = f"{tmp}/{project.path.name}"
            await self._run([*pip, wheel], what="pip install")
            if venv_exists:  # same version, other content: pip would call it satisfied
                await self._run([*pip, "--no-deps", "--force-reinstall", wheel], what="pip install")
            marker = {"wheel": project.path.name, "version": project.version, "digest": project.digest}
            await self._helper("mark", {**self._places(), "marker": marker})
        finally:
            try:
                await self._run(["rm", "-rf", "--", tmp], root=False, timeout=60)
            except HostFailure:
                pass

    async def install_unit(self, text: str) -> None:
        await self._run(["sh", "-c", 'umask 022 && cat > "$1.tmp" && mv -f "$1.tmp" "$1"', "sh", UNIT_PATH],
                        input=text, what=f"writing {UNIT_PATH}")
        await self._run(["systemctl", "daemon-reload"])
        await self._run(["systemctl", "enable", UNIT_NAME])

    async def enroll(self, token: str, *, force: bool) -> dict[str, Any]:
        s = self.spec
        # The token goes on standard input: on the command line every user of the host could read it in ps.
        argv = [f"{s.install_dir}/bin/meshd", "enroll", "-", "--name", s.node_name, "--state", s.state, "--json"]
        out = await self._run([*argv, *(["--force"] if force else [])], input=token + "\n", timeout=120)
        try:
            return dict(json.loads(out))
        except ValueError:
            raise HostFailure(f"meshd enroll printed something that is not JSON: {out[:200]!r}") from None

    async def start(self, *, restart: bool) -> int | None:
        if self.spec.service == "systemd":
            await self._run(["systemctl", "restart" if restart else "start", UNIT_NAME], timeout=120)
            await self._helper("wait", self._places())
            pid = (await self._run(["systemctl", "show", "-p", "MainPID", "--value", UNIT_NAME])).strip()
            return int(pid) if pid.isdigit() and pid != "0" else None
        if restart:
            await self._helper("stop", self._places())
        return int((await self._helper("start", self._places()))["pid"])


def _short(argv: list[str]) -> str:
    """A command as a report names it: the program and its first argument, never a token."""
    name = Path(argv[0]).name
    return f"{name} {argv[1]}" if len(argv) > 1 and not argv[1].startswith("idm1.") and len(argv[1]) < 40 else name


class CommandFailed(HostFailure):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _failure(what: str, status: int, stderr: str, stdout: str) -> str:
    lines = [ln.strip() for ln in (stderr or stdout).splitlines() if ln.strip()]
    if any("sudo: a password is required" in ln or "sudo: a terminal is required" in ln for ln in lines):
        return "sudo needs a password on the host: allow passwordless sudo for the user, or connect as root"
    errors = [ln for ln in lines if ln.startswith(("ERROR", "error:")) or ": error: " in ln]
    reason = (errors or lines[-1:] or [f"exit status {status}"])[-1]
    return f"{what} failed: {reason}"
