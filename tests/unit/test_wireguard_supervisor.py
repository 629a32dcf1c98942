"""WireGuardGo's supervision, without root: a stand-in ``wireguard-go`` serves the fake UAPI on a temp socket.

The stand-in is a script named ``wireguard-go`` (so /proc/PID/comm matches,
as the stray check requires); it serves :class:`FakeUapiServer` on
``$FAKE_WG_UAPI_DIR/IFNAME.sock`` and removes the socket on SIGTERM, like
the real one. It creates no interface; the real thing is proven in tests/e2e.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshcore.errors import Unavailable
from meshd.wg import DeviceConfig, PeerConfig, WireGuardGo, generate_private_key, public_key_of

STAND_IN = f"""#!{sys.executable}
import os, signal, socket, sys
from pathlib import Path
from meshd.wg.fake import FakeUapiServer

if os.environ.get("FAKE_WG_FAIL"):
    print("Failed to create TUN device: operation not permitted", flush=True)
    sys.exit(1)
path = Path(os.environ["FAKE_WG_UAPI_DIR"]) / (sys.argv[-1] + ".sock")
server = FakeUapiServer()
listener = socket.socket(socket.AF_UNIX)
path.unlink(missing_ok=True)
listener.bind(str(path))
listener.listen()

def stop(*_):
    path.unlink(missing_ok=True)
    os._exit(0)

signal.signal(signal.SIGTERM, stop)
while True:
    conn, _ = listener.accept()
    with conn:
        data = b""
        while not data.endswith(b"\\n\\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(server.request(data.decode()).encode())
"""

CONFIG = DeviceConfig(generate_private_key(), 51820,
                      (PeerConfig(public_key_of(generate_private_key()), ("100.64.0.64/26",), "198.51.100.12:51820"),))
_names = iter(range(1000))


@pytest.fixture
def binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = tmp_path / "bin" / "wireguard-go"
    path.parent.mkdir()
    path.write_text(STAND_IN)
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_WG_UAPI_DIR", str(tmp_path))
    return str(path)


@pytest.fixture
def make(binary: str, tmp_path: Path) -> Iterator[Callable[..., WireGuardGo]]:
    made: list[WireGuardGo] = []

    def _make(**kwargs: object) -> WireGuardGo:
        dev = WireGuardGo(f"fk{os.getpid() % 100000}x{next(_names)}", binary=binary, uapi_dir=tmp_path,
                          start_timeout=5, **kwargs)  # type: ignore[arg-type]
        made.append(dev)
        return dev

    yield _make
    for dev in made:
        dev.close()


def _wait(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_apply_state_close(make: Callable[..., WireGuardGo]) -> None:
    dev = make()
    dev.apply(CONFIG)
    pid = dev.pid
    dev.apply(CONFIG)
    assert dev.pid == pid, "a second apply must not start another process"
    state = dev.state()
    assert state.public_key == CONFIG.public_key and state.listen_port == 51820
    assert [p.public_key for p in state.peers] == [CONFIG.peers[0].public_key]
    dev.close()
    assert pid is not None and not _alive(pid) and dev.pid is None
    assert not dev.sock_path.exists()
    dev.close()  # idempotent
    with pytest.raises(Unavailable, match="closed"):
        dev.apply(CONFIG)


def test_a_dead_child_is_restarted_and_given_the_last_config(make: Callable[..., WireGuardGo]) -> None:
    restarted: list[bool] = []
    dev = make(on_restart=lambda: restarted.append(True))
    dev.apply(CONFIG)
    first = dev.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    _wait(lambda: dev.pid not in (None, first) and restarted == [True])
    assert dev.restarts == 1
    assert [p.public_key for p in dev.state().peers] == [CONFIG.peers[0].public_key]


def test_a_stray_from_a_crashed_run_is_stopped_not_duplicated(make: Callable[..., WireGuardGo], binary: str) -> None:
    dev = make()
    stray = subprocess.Popen([binary, "-f", dev.ifname])
    try:
        _wait(dev.sock_path.exists)
        dev.start()
        assert dev.pid != stray.pid
        stray.wait(5)  # stopped (raises if not); its exit code depends on where in its start-up SIGTERM lands
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_a_stale_socket_file_is_replaced(make: Callable[..., WireGuardGo]) -> None:
    dev = make()
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(dev.sock_path))  # bound, never listening: what a SIGKILLed wireguard-go leaves
    dev.apply(CONFIG)
    assert dev.state().listen_port == 51820


def test_a_child_that_cannot_start_is_reported(make: Callable[..., WireGuardGo],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WG_FAIL", "1")
    dev = make()
    with pytest.raises(Unavailable, match=r"exited with status 1: Failed to create TUN device"):
        dev.start()
    assert dev.pid is None


def test_a_missing_binary_is_named() -> None:
    dev = WireGuardGo("fkmissing", binary="/nonexistent/wireguard-go")
    with pytest.raises(Unavailable, match="install the wireguard-go package"):
        dev.start()
