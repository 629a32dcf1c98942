"""The helper ``meshctl deploy`` runs on each host: ``python3 - OP 'JSON' < remote.py``.

Standard library only (Python 3.8+ at run time, parseable by 3.7), because it runs
before idmesh is installed (and must be able to say "this Python is too old").
Each operation prints one JSON object on stdout; a failure exits 1 with one
line on stderr.

* ``probe``: what is there — Python, virtual environment, the deployed wheel's
  marker, node.json, a running meshd (pidfile, checked against
  /proc/PID/cmdline) or the unit's state.
* ``start``: ``meshd run`` detached (posix_spawn with setsid: a new session,
  stdin /dev/null, output to the log file), its pid written to the pidfile; returns when its local API
  socket accepts connections, or fails with the log's last lines.
* ``stop``: SIGTERM the pidfile's meshd (it removes its interface), SIGKILL
  after the grace time.
* ``wait``: until the local API socket accepts connections (systemd mode).
* ``mark``: write the deployed wheel's marker into the install directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

MARKER = "idmesh-deploy.json"
READY_TIMEOUT = 30.0
STOP_GRACE = 20.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Failure(Exception):
    pass


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _meshd_pid(pidfile: str, state: str) -> int | None:
    """The pid in ``pidfile`` if it is a live ``meshd run`` for ``state``, else None."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (OSError, ValueError):
        return None
    is_meshd = any(os.path.basename(a) == "meshd" for a in argv[:2]) and "run" in argv
    if not is_meshd or os.path.normpath(state) not in [os.path.normpath(a) for a in argv]:
        return None
    return pid if _alive(pid) else None


def _systemctl(*args: str) -> str:
    done = subprocess.run(["systemctl", *args], check=False, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
    return done.stdout.strip()


def probe(a: dict[str, Any]) -> dict[str, Any]:
    facts: dict[str, Any] = {"python": list(sys.version_info[:3]), "systemd": os.path.isdir("/run/systemd/system"),
             "uid": os.geteuid()}
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
        facts["ensurepip"] = True
    except ImportError:
        facts["ensurepip"] = False
    install = a["install_dir"]
    facts["venv"] = os.path.exists(os.path.join(install, "bin", "python"))
    try:
        facts["deployed"] = _read_json(os.path.join(install, MARKER))
    except (OSError, ValueError):
        facts["deployed"] = None
    try:
        node = _read_json(os.path.join(a["state"], "node.json"))
    except (OSError, ValueError) as exc:
        facts["node_error"] = "{}/node.json cannot be read ({})".format(a["state"], exc)
        node = None
    if node is not None:
        try:
            facts["node"] = {"name": node["name"], "ca_fingerprint": node["ca_fingerprint"],
                             "wireguard_public_key": node["wireguard_public_key"],
                             "addresses": node.get("addresses", [])}
        except (KeyError, TypeError):
            facts["node_error"] = "{}/node.json is not a node record".format(a["state"])
    if a.get("service") == "systemd":
        try:
            with open(a["unit_path"]) as f:
                facts["unit_text"] = f.read()
        except FileNotFoundError:
            facts["unit_text"] = None
        if facts["systemd"]:
            facts["unit_active"] = _systemctl("is-active", a["unit"]) == "active"
            facts["unit_enabled"] = _systemctl("is-enabled", a["unit"]) == "enabled"
    else:
        facts["pid"] = _meshd_pid(a["pidfile"], a["state"])
    return facts


def _listening(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:] if line.strip())
    except OSError:
        return ""


def start(a: dict[str, Any]) -> dict[str, Any]:
    if _meshd_pid(a["pidfile"], a["state"]) is not None:
        raise Failure("meshd is already running for {}".format(a["state"]))
    for path in (a["socket"], a["pidfile"], a["log"]):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    argv = [os.path.join(a["install_dir"], "bin", "meshd"), "run", "--state", a["state"],
            "--interface", a["interface"], "--socket", a["socket"]]
    env = dict(os.environ, PATH=PATH)
    for name in ("IDMESH_STATE", "IDMESH_SOCKET", "IDMESH_INTERFACE"):
        env.pop(name, None)
    os.chdir("/")  # meshd must not pin the login directory
    with open(a["log"], "ab") as log:
        # posix_spawn, not Popen: meshd outlives this helper, which must not wait for it or warn about it
        pid = os.posix_spawn(argv[0], argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, log.fileno(), 2),
        ])
    tmp = a["pidfile"] + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, a["pidfile"])
    deadline = time.monotonic() + READY_TIMEOUT
    while not _listening(a["socket"]):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            raise Failure(f"meshd exited with {code}: {_tail(a['log']) or '(no output)'}")
        if time.monotonic() > deadline:
            raise Failure(f"meshd did not open {a['socket']} within {READY_TIMEOUT:g} s: {_tail(a['log'])}")
        time.sleep(0.1)
    return {"pid": pid}


def stop(a: dict[str, Any]) -> dict[str, Any]:
    pid = _meshd_pid(a["pidfile"], a["state"])
    if pid is None:
        return {"stopped": None}
    for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _alive(pid):
            break
    if _alive(pid):
        raise Failure(f"meshd pid {pid} survived SIGKILL")
    try:
        os.unlink(a["pidfile"])
    except FileNotFoundError:
        pass
    return {"stopped": pid}


def wait(a: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT
    while not _listening(a["socket"]):
        if time.monotonic() > deadline:
            raise Failure(f"meshd did not open {a['socket']} within {READY_TIMEOUT:g} s")
        time.sleep(0.1)
    return {"ready": True}


def mark(a: dict[str, Any]) -> dict[str, Any]:
    path = os.path.join(a["install_dir"], MARKER)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(a["marker"], f)
    os.replace(tmp, path)
    return {"marked": path}


OPS: dict[str, Any] = {"probe": probe, "start": start, "stop": stop, "wait": wait, "mark": mark}


def main(argv: list[str]) -> int:
    try:
        op, args = OPS[argv[0]], json.loads(argv[1])
        print(json.dumps(op(args)))
        return 0
    except Failure as exc:
        sys.stderr.write(f"{exc}\n")
    except (OSError, ValueError, KeyError, IndexError) as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
