"""What the benchmarks share: how they print their own command, and loopback helpers.

Each bench is run as ``python bench/NAME.py``, so this directory is on
``sys.path`` and ``from common import ...`` works.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from pathlib import Path

__all__ = ["command_line", "cpu_seconds", "free_port", "start_namespace_bench", "wait_listening"]


def command_line() -> str:
    """The command that produced the figures, as the user would type it."""
    python = sys.executable
    if python.startswith(os.getcwd() + os.sep):
        python = os.path.relpath(python)
    return shlex.join([python, *sys.argv])


def start_namespace_bench(sharers: str) -> None:
    """Print the command line; refuse to run without root (network namespaces); say who shares the cores."""
    print(f"$ {command_line()}")
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    print(f"{os.cpu_count()} cores shared by {sharers} and the rest of this host "
          f"(load average before start: {os.getloadavg()[0]:.2f})", flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("controller did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
