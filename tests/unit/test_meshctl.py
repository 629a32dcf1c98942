"""``meshctl``'s wiring: every command has a handler, and a command loads only what it uses.

Start-up time is part of every agent's birth, so ``meshctl agent run`` must
not pay for the policy compiler, the wire models or a web framework, and
building the parser must pay for none of them. Imports are observed in a
fresh interpreter: this process has loaded everything already.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from meshctl.main import build_parser

Parser = argparse.ArgumentParser

HEAVY = ("meshcore.policy", "meshcore.wire", "meshcore.identity", "pydantic", "fastapi", "cryptography", "httpx",
         "asyncssh", "yaml", "deploy.runner")


def commands(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Parser]]:
    """Every command path that takes no further subcommand, with its parser."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, p
    for action in subs:
        for name, child in action.choices.items():
            yield from commands(child, (*path, name))


def loaded_by(code: str) -> set[str]:
    """Every module a fresh interpreter has loaded after running ``code``."""
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> set[str]:
    return {h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in modules)}


def test_every_command_has_a_handler() -> None:
    found = {" ".join(path): p.get_default("func") for path, p in commands(build_parser())}
    assert set(found) == {"token create", "token list", "token delete", "nodes list", "nodes remove", "routes list",
                          "policy check", "policy apply", "policy show", "policy history", "policy explain",
                          "agent run", "agent list", "agent revoke", "serve list", "serve remove", "login approve", "whoami", "logout",
                          "grant create", "grant list", "grant revoke", "whois", "audit", "flows", "status", "deploy"}
    assert all(callable(func) for func in found.values()), found
    assert callable(build_parser().parse_args(["login"]).func)  # login itself runs; login approve is its action
    assert callable(build_parser().parse_args(["serve", "--port", "80", "--to", "http://127.0.0.1:9"]).func)


def test_building_the_parser_loads_nothing_heavy() -> None:
    assert heavy(loaded_by("from meshctl.main import build_parser; build_parser()")) == set()


FAKE_MESHD = """\
import http.server, json, os, socketserver, sys, tempfile, threading
ANSWERS = {"/v1/agents": {"agent": {"id": "a1", "name": "true", "principal": "p", "scopes": ["s:r"],
                                    "addresses": ["100.64.0.2", "fd00::2"], "expires": "2026-12-01T00:00:00+00:00"},
                          "environment": {"IDMESH_AGENT_ID": "a1"}},
           "/v1/status": {"node": "n"}, "/v1/whois": {"kind": "node"}}
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(ANSWERS[self.path.split("?")[0]]).encode()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *args): pass
SOCKET = os.path.join(tempfile.mkdtemp(), "meshd.sock")
server = socketserver.UnixStreamServer(SOCKET, Answer)
threading.Thread(target=server.serve_forever, daemon=True).start()
def exec_instead(*argv):  # what would be exec'd: report the modules loaded up to here, instead
    print(json.dumps(sorted(sys.modules)), flush=True); os._exit(0)
os.execvpe = exec_instead
from meshctl.main import build_parser
def meshctl(command, *rest):  # command: the words before the options, e.g. "agent run"
    args = build_parser().parse_args([*command.split(), "--socket", SOCKET, *rest])
    args.func(args)
"""


def test_agent_run_loads_neither_httpx_nor_the_policy_compiler_nor_pydantic() -> None:
    # The whole command against a meshd that answers, up to the exec of the agent's command.
    modules = loaded_by(FAKE_MESHD + "meshctl('agent run', '-q', '--principal', 'p', '--scope', 's:r', '--', 'true')")
    assert heavy(modules) == set()


def test_status_and_whois_load_nothing_heavy() -> None:
    modules = loaded_by(FAKE_MESHD + "meshctl('status', '--json')\nmeshctl('whois', '100.64.0.2', '--json')")
    assert heavy(modules) == set()


def test_a_meshd_that_is_not_there_is_one_line() -> None:
    from idmesh.local import LocalClient
    from meshcore.errors import Unavailable

    try:
        LocalClient(Path("/nonexistent/meshd.sock")).get("/v1/status")
    except Unavailable as exc:
        assert str(exc) == "meshd is not running or not reachable at /nonexistent/meshd.sock: No such file or directory"
    else:
        raise AssertionError("reached a meshd at /nonexistent")
