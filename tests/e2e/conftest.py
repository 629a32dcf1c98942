"""E2E prerequisites and fixtures: root, the data-plane tools, throwaway networks that clean up after themselves.

Every test under tests/e2e is marked ``e2e``. Before one runs, the
prerequisites are checked: outside CI a missing one skips the test (a
developer without root can still run the suite), but with ``CI=true`` it
fails, because a skipped e2e test in CI is a promise nobody checked.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

import pytest

from tests.e2e.natlab import NatKind, NatLab
from tests.e2e.netns import Network, reap_stale
from tests.prerequisites import require

REQUIRED_TOOLS = ("ip", "wireguard-go", "ping", "nft")


def missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    missing += [f"the {tool} command (apt-get install iproute2 wireguard-go iputils-ping nftables)"
                for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun (wireguard-go needs the TUN driver)")
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _e2e_prerequisites(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("e2e") is not None:
        require_e2e()


def require_e2e() -> None:
    """Also for module fixtures, which run before the per-test check above."""
    require("e2e prerequisites missing", missing_prerequisites())


@pytest.fixture(scope="session", autouse=True)
def _reap_and_trap_sigterm() -> Iterator[None]:
    """Reap namespaces of harness runs that were killed, and turn SIGTERM into a clean teardown."""
    if os.geteuid() == 0 and shutil.which("ip"):
        reap_stale()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def close_all(made: Sequence[Network]) -> None:
    """Tear down every network made, the last first, closing the others when one fails; then fail if any did."""
    errors = []
    for net in reversed(made):
        try:
            net.close()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # keep closing the others
            errors.append(str(exc))
    assert not errors, "; ".join(errors)


@pytest.fixture
def network() -> Iterator[Callable[..., Network]]:
    """``network(hosts=3)`` builds a :class:`Network`; all of them are torn down (and checked empty) after the test."""
    made: list[Network] = []

    def build(hosts: int = 2, *, ipv6: bool = True) -> Network:
        net = Network(hosts, ipv6=ipv6)
        made.append(net)
        net.build()
        return net

    yield build
    close_all(made)


@pytest.fixture
def nat_lab() -> Iterator[Callable[..., NatLab]]:
    """``nat_lab(homes=2, nat="eim")`` builds a :class:`NatLab`; all of them are torn down (and checked empty)."""
    made: list[NatLab] = []

    def build(homes: int = 2, *, hosts_per_home: int = 1, nat: NatKind | list[NatKind] = "eim") -> NatLab:
        lab = NatLab(homes, hosts_per_home=hosts_per_home, nat=nat)
        made.append(lab)
        lab.build()
        return lab

    yield build
    close_all(made)
