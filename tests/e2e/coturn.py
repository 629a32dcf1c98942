"""coturn as a real TURN server in the e2e tests: ``turnserver`` in a lab host's namespace, killed by PID.

:class:`Coturn` writes one configuration file (0600, it holds the
``static-auth-secret``) in the test's temporary directory and starts
``turnserver -c FILE`` through ``host.popen``, so the network stops it even
if the test forgets. What the configuration says, and why:

* ``listening-ip`` / ``relay-ip`` = the host's address, ``listening-port``
  3478 (UDP; ``no-tcp``, ``no-tls``, ``no-dtls``: the relay speaks TURN over
  UDP only), relay ports in a small range (``min-port``/``max-port``);
* ``use-auth-secret`` + ``static-auth-secret`` + ``realm``: the TURN REST
  API, credentials from :func:`meshcore.turn.turn_credentials`;
* ``no-cli`` (no telnet console on 5766), ``userdb`` and ``pidfile`` in the
  temporary directory (coturn opens an SQLite database even when it only
  checks HMACs, by default under /var/lib/turn), ``log-file`` there too
  with ``simple-log`` (no date suffix, one file) and ``no-stdout-log``;
  ``verbose`` so sessions log their usage (bytes and packets each way);
* peers: coturn refuses loopback peers unless ``allow-loopback-peers``
  (not set: nothing here needs it) and has no other default denial, so
  relaying between two allocations of this server (both relayed addresses
  on 203.0.113.0/24) needs only each side's permission for the other's IP.
  ``denied-peer-ip``/``allowed-peer-ip`` are left unset on purpose; a test
  can pass ``extra`` lines to set them.

:meth:`Coturn.start` returns once the server answers a STUN Binding request
on its port (polled from inside the namespace; no fixed sleep).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.netns import Host

__all__ = ["STUN_PING", "Coturn"]

# One STUN Binding request a few times a second until an answer with our transaction id comes back.
STUN_PING = """\
import os, socket, struct, sys, time
server = (sys.argv[1], int(sys.argv[2])); deadline = time.monotonic() + float(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sock.settimeout(0.1)
tid = os.urandom(12)
while time.monotonic() < deadline:
    sock.sendto(struct.pack("!HHI", 0x0001, 0, 0x2112A442) + tid, server)
    try:
        data, _ = sock.recvfrom(2048)
    except (TimeoutError, ConnectionRefusedError):
        continue
    if data[8:20] == tid:
        sys.exit(0)
sys.exit(1)
"""


@dataclass
class Coturn:
    """One ``turnserver`` on ``host`` (the lab's public host), configured and logging under ``tmp``."""

    host: Host
    tmp: Path
    port: int = 3478
    relay_ports: tuple[int, int] = (49160, 49199)
    realm: str = "idmesh.test"
    secret: bytes = field(default_factory=lambda: secrets.token_urlsafe(24).encode())
    extra: Sequence[str] = ()
    proc: subprocess.Popen[Any] | None = None

    @property
    def address(self) -> str:
        return self.host.underlay4

    @property
    def server(self) -> tuple[str, int]:
        return self.address, self.port

    @property
    def log(self) -> Path:
        return self.tmp / "turnserver.log"

    @property
    def config(self) -> Path:
        return self.tmp / "turnserver.conf"

    def render(self) -> str:
        low, high = self.relay_ports
        lines = [
            f"listening-ip={self.address}", f"relay-ip={self.address}", f"listening-port={self.port}",
            "no-tcp", "no-tls", "no-dtls", "no-tcp-relay", f"min-port={low}", f"max-port={high}",
            "use-auth-secret", f"static-auth-secret={self.secret.decode()}", f"realm={self.realm}",
            "fingerprint", "no-cli", "no-rfc5780", "no-software-attribute",
            f"userdb={self.tmp / 'turndb'}", f"pidfile={self.tmp / 'turnserver.pid'}",
            f"log-file={self.log}", "simple-log", "no-stdout-log", "verbose",
            *self.extra,
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> None:
        """Write the configuration (0600) and start the server; return when it answers STUN."""
        turnserver = shutil.which("turnserver")
        if turnserver is None:
            raise AssertionError("turnserver is missing (apt-get install coturn)")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.config.touch(mode=0o600)
        self.config.chmod(0o600)
        self.config.write_text(self.render())
        self.proc = self.host.popen([turnserver, "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = self.host.run([sys.executable, "-c", STUN_PING, self.address, str(self.port), str(timeout)],
                             check=False, timeout=timeout + 10)
        if done.returncode != 0:
            raise AssertionError(f"turnserver did not answer STUN on {self.address}:{self.port} in {timeout:g} s "
                                 f"(exit {self.proc.poll()}); log:\n{self.logs()}")

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL after 5 s); the network's cleanup would do it too."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def logs(self, tail: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-tail:])

    def usage(self) -> list[dict[str, int]]:
        """Every ``usage:`` line of the log as numbers: rp/rb (received packets/bytes), sp/sb (sent)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines() if self.log.exists() else []:
            if "usage:" not in line:
                continue
            numbers = {}
            for part in line.split("usage:", 1)[1].replace(",", " ").split():
                key, _, value = part.partition("=")
                if key in ("rp", "rb", "sp", "sb") and value.isdigit():
                    numbers[key] = int(value)
            if numbers:
                found.append(numbers)
        return found
