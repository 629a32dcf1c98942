"""Identity-based routes for real: the policy-routing driver and the route firewall in a network namespace.

Each test gets a fresh namespace with three interfaces: ``rA`` and ``rB``
stand for tunnels to two gateways, ``mesh`` for the overlay interface
(100.64.0.1/32, fd00::1/128, and the main table's overlay routes through
it). They are TUN devices, the kind wireguard-go makes (the e2e
prerequisites guarantee /dev/net/tun; the dummy driver is not in every
kernel). The drivers run in a child inside the namespace (rtnetlink and
nftables act on the namespace of the process), driven over JSON lines; the
tests look at the result from outside with ``ip route get``, ``ip rule``
and ``nft``. Nothing is sent anywhere: only route lookups are made.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.routes.plan import BYPASS_MARK, TABLE_GATEWAY, TABLE_LAST, RoutingPlan, SenderRoutes, plan_routing
from meshd.routes.tables import TABLES
from tests.e2e.netns import netns_pids

pytestmark = pytest.mark.e2e

_REPO = Path(__file__).resolve().parents[2]
_sequence = itertools.count(900)
AGENT = 0x00100000
MASK = 0xFFF00000
OVERLAY = ("100.64.0.0/10", "fd00::/48")
CONTROLLER = "198.51.100.11/32"

CHILD = """
import dataclasses, json, sys
from meshcore.errors import IdmeshError
from meshd.routes.firewall import RouteFirewall, RouteFirewallConfig
from meshd.routes.plan import Rule, RoutingPlan, TableRoute
from meshd.routes.tables import IPRoutePolicyRouting

routing, fw = IPRoutePolicyRouting(), RouteFirewall()
for line in sys.stdin:
    cmd = json.loads(line)
    op, out = cmd.pop("op"), None
    try:
        if op == "apply":
            routing.apply(RoutingPlan(frozenset(Rule(**r) for r in cmd["rules"]),
                                      frozenset(TableRoute(**r) for r in cmd["routes"])))
        elif op == "installed":
            plan = routing.installed()
            out = {"rules": [dataclasses.asdict(r) for r in plan.rules],
                   "routes": [dataclasses.asdict(r) for r in plan.routes]}
        elif op == "close":
            routing.close()
        elif op == "fw_apply":
            sets = {k: frozenset(map(tuple, v)) if k.startswith("grants") else frozenset(v)
                    for k, v in cmd.items() if isinstance(v, list)}
            fw.apply(RouteFirewallConfig(**(cmd | sets)))
        elif op == "fw_refused":
            out = fw.refused()
        elif op == "fw_close":
            fw.close()
        print(json.dumps({"ok": out}), flush=True)
    except IdmeshError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
"""


class DriverError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class Namespace:
    """A throwaway namespace with rA, rB and mesh; ``driver`` talks to the child running our drivers in it."""

    def __init__(self) -> None:
        self.name = f"idm-{os.getpid()}-{next(_sequence)}-rt"
        self.child: subprocess.Popen[str] | None = None

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True, timeout=30,
                              check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")
        return done

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              timeout=30, check=False)

    def build(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=30)
        self.ip("link", "set", "lo", "up")
        for dev in ("rA", "rB", "mesh"):
            self.ip("tuntap", "add", "dev", dev, "mode", "tun")
            self.ip("link", "set", dev, "up")
        self.ip("addr", "add", "100.64.0.1/32", "dev", "mesh")
        self.ip("addr", "add", "fd00::1/128", "dev", "mesh", "nodad")
        self.ip("route", "add", OVERLAY[0], "dev", "mesh")
        self.ip("route", "add", OVERLAY[1], "dev", "mesh")
        for family in ("ipv4", "ipv6"):  # so that `ip route get ... iif X` answers as for forwarded packets
            done = self.run("sysctl", "-qw", f"net.{family}.conf.all.forwarding=1")
            assert done.returncode == 0, done.stderr
        self.child = subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, "-c", CHILD], cwd=_REPO,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      start_new_session=True)

    def driver(self, op: str, **args: Any) -> Any:
        assert self.child is not None and self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.child.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.child.stdout, selectors.EVENT_READ)
            if not sel.select(30):
                raise AssertionError(f"the driver child did not answer {op} in 30 s")
        line = self.child.stdout.readline()
        if not line:
            raise AssertionError(f"the driver child died during {op} (exit code {self.child.wait(5)})")
        reply = json.loads(line)
        if "error" in reply:
            raise DriverError(reply["error"], reply["message"])
        return reply["ok"]

    def apply(self, plan: RoutingPlan) -> None:
        self.driver("apply", rules=[dataclasses.asdict(r) for r in plan.rules],
                    routes=[dataclasses.asdict(r) for r in plan.routes])

    def installed(self) -> RoutingPlan:
        from meshd.routes.plan import Rule, TableRoute

        got = self.driver("installed")
        return RoutingPlan(frozenset(Rule(**r) for r in got["rules"]),
                           frozenset(TableRoute(**r) for r in got["routes"]))

    def route_get(self, *args: str) -> str | None:
        """The device ``ip route get`` picks, or None when there is no route."""
        done = self.ip("route", "get", *args, check=False)
        if done.returncode != 0:
            assert "unreachable" in done.stderr or "No route to host" in done.stderr, done.stderr
            return None
        words = done.stdout.split()
        return words[words.index("dev") + 1]

    def table_routes(self) -> str:
        out = []
        for family in ("-4", "-6"):
            listing = self.ip(family, "route", "show", "table", "all").stdout.splitlines()
            out += [line for line in listing if any(f"table {t} " in line + " " for t in TABLES)]
        return "\n".join(out)

    def close(self) -> None:
        if self.child is not None:
            assert self.child.stdin is not None and self.child.stdout is not None
            self.child.stdin.close()
            try:
                self.child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.child.pid, signal.SIGKILL)
                self.child.wait(10)
            self.child.stdout.close()
        for pid in netns_pids(self.name):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30, check=False)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30,
                                check=False).stdout
        assert self.name not in listed.split(), f"namespace {self.name} was left behind"


@pytest.fixture
def ns() -> Iterator[Namespace]:
    space = Namespace()
    try:
        space.build()
        yield space
    finally:
        space.close()


def plan_for(*senders: SenderRoutes, gateway: str | None = None) -> RoutingPlan:
    return plan_routing(senders, mark_mask=MASK, mesh_ifname="mesh", overlay=OVERLAY,
                        addresses=("100.64.0.1", "fd00::1"), bypass=(CONTROLLER,), gateway_ifname=gateway)


PLAN = plan_for(SenderRoutes(AGENT, (("203.0.113.0/24", "rA"), ("2001:db8:5::/48", "rA"))),
                SenderRoutes(None, (("10.20.0.0/16", "rB"),)))


def default_rules(space: Namespace) -> tuple[list[str], list[str]]:
    return ([line.split(":")[0] for line in space.ip("-4", "rule").stdout.splitlines()],
            [line.split(":")[0] for line in space.ip("-6", "rule").stdout.splitlines()])


def test_each_identity_is_steered_to_its_gateway_interface(ns: Namespace) -> None:
    ns.apply(PLAN)
    assert ns.installed() == PLAN
    assert ns.route_get("203.0.113.10", "mark", f"{AGENT:#x}") == "rA"  # the agent's route
    assert ns.route_get("2001:db8:5::10", "mark", f"{AGENT:#x}") == "rA"
    assert ns.route_get("203.0.113.10") == "mesh"  # before the mark: the fallback, so the hook gets the packet
    assert ns.route_get("2001:db8:5::10") == "mesh"
    assert ns.route_get("10.20.1.1") == "rB"  # the node's own route (locally generated, iif lo)
    assert ns.route_get("10.20.1.1", "from", "192.0.2.7", "iif", "rA") is None  # not for forwarded traffic
    assert ns.route_get("100.64.0.9", "mark", f"{AGENT:#x}") == "mesh"  # the overlay throws to main
    assert ns.route_get("198.51.100.11", "mark", f"{AGENT:#x}") is None  # the controller: main only (none here)
    assert ns.route_get("203.0.113.10", "mark", f"{BYPASS_MARK:#x}") is None  # WireGuard's own: main only
    assert ns.route_get("203.0.113.10", "mark", f"{AGENT | BYPASS_MARK:#x}") is None  # even with an agent's bits
    assert ns.route_get("10.20.1.1", "mark", f"{BYPASS_MARK:#x}") is None
    rules = ns.ip("-4", "rule").stdout
    assert "fwmark 0/0xfff40000 iif lo lookup 5201 proto 108" in rules
    assert "fwmark 0x100000/0xfff40000 lookup 5202 proto 108" in rules


def test_applying_the_same_plan_again_sends_nothing(ns: Namespace) -> None:
    """``ip monitor`` between two marker routes of our own sees no rule or route change from the second apply."""
    ns.apply(PLAN)
    monitor = subprocess.Popen(["ip", "-n", ns.name, "monitor", "rule", "route"], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    assert monitor.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    def pump() -> None:
        for line in monitor.stdout or ():
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []

    def wait_for(marker: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                seen.append(lines.get(timeout=left))
            except queue.Empty:
                break
            if marker in seen[-1]:
                return True
        return False

    try:
        for n in range(1, 50):  # markers until the monitor shows one: from then on it sees everything
            ns.ip("route", "add", f"192.0.2.{n}/32", "dev", "rA", "table", "100")
            if wait_for(f"192.0.2.{n} ", 0.2):
                break
        else:
            raise AssertionError("ip monitor never showed a marker route")
        before = len(seen)
        ns.apply(PLAN)
        ns.ip("route", "add", "192.0.2.200/32", "dev", "rA", "table", "100")
        assert wait_for("192.0.2.200 ", 10), "ip monitor did not show the closing marker"
        changes = [line for line in seen[before:] if "192.0.2." not in line]
        assert changes == [], changes
    finally:
        os.killpg(monitor.pid, signal.SIGTERM)
        monitor.wait(10)
        monitor.stdout.close()
    assert ns.installed() == PLAN


def test_a_changed_plan_moves_routes_in_place_and_drops_stale_rules_and_tables(ns: Namespace) -> None:
    ns.apply(PLAN)
    moved = plan_for(SenderRoutes(AGENT, (("203.0.113.0/24", "rB"),)), gateway="rA")
    ns.apply(moved)
    assert ns.installed() == moved
    assert ns.route_get("203.0.113.10", "mark", f"{AGENT:#x}") == "rB"
    assert ns.route_get("10.20.1.1") is None  # the node no longer routes it
    assert ns.route_get("2001:db8:5::10", "mark", f"{AGENT:#x}") is None
    assert ns.route_get("100.64.0.9", "mark", "0x80000", "from", "192.0.2.7", "iif", "rB") == "rA"  # gateway
    assert f"table {TABLE_GATEWAY}" in ns.table_routes()


def test_an_empty_plan_and_close_leave_only_the_kernels_rules_and_empty_tables(ns: Namespace) -> None:
    pristine = default_rules(ns)
    assert pristine == (["0", "32766", "32767"], ["0", "32766"])
    ns.apply(plan_for(SenderRoutes(AGENT, (("203.0.113.0/24", "rA"),)), gateway="rB"))
    ns.apply(RoutingPlan())
    assert default_rules(ns) == pristine
    assert ns.table_routes() == ""
    assert ns.installed() == RoutingPlan()
    ns.apply(PLAN)
    ns.ip("route", "add", "192.0.2.0/24", "dev", "rA", "table", str(TABLE_LAST + 1))  # not ours: stays
    ns.driver("close")
    assert default_rules(ns) == pristine and ns.table_routes() == ""
    assert "192.0.2.0/24 dev rA" in ns.ip("route", "show", "table", str(TABLE_LAST + 1)).stdout
    assert "100.64.0.0/10 dev mesh" in ns.ip("route", "show").stdout  # the main table is not ours
    with pytest.raises(DriverError, match="closed"):
        ns.apply(PLAN)


def test_a_plan_through_a_missing_interface_is_refused_before_anything_is_sent(ns: Namespace) -> None:
    ns.apply(PLAN)
    with pytest.raises(DriverError, match="interface rZ does not exist") as refused:
        ns.apply(plan_for(SenderRoutes(AGENT, (("203.0.113.0/24", "rZ"),))))
    assert refused.value.kind == "Unavailable"
    assert ns.installed() == PLAN


def test_the_route_firewall_table_loads_and_goes(ns: Namespace) -> None:
    cfg = {"mesh_ifname": "mesh", "overlay4": OVERLAY[0], "overlay6": OVERLAY[1], "route_ifnames": ["rA"],
           "gateway_ifname": "rB", "grants4": [["100.64.0.5", "10.20.0.0/16"]],
           "grants6": [["fd00::5", "2001:db8::/32"]]}
    ns.driver("fw_apply", **cfg)
    listed = ns.run("nft", "list", "table", "inet", "idmesh_routes")
    assert listed.returncode == 0, listed.stderr
    assert "100.64.0.5 . 10.20.0.0/16" in listed.stdout and "masquerade" in listed.stdout
    granted = ns.run("nft", "get", "element", "inet", "idmesh_routes", "grant4", "{ 100.64.0.5 . 10.20.1.1 }")
    assert granted.returncode == 0, granted.stderr  # the concatenated interval set matches inside the prefix
    other = ns.run("nft", "get", "element", "inet", "idmesh_routes", "grant4", "{ 100.64.0.6 . 10.20.1.1 }")
    assert other.returncode != 0
    assert ns.driver("fw_refused") == 0
    ns.driver("fw_apply", **(cfg | {"gateway_ifname": None, "grants4": [], "grants6": []}))
    assert "masquerade" not in ns.run("nft", "list", "table", "inet", "idmesh_routes").stdout
    ns.driver("fw_close")
    assert ns.run("nft", "list", "table", "inet", "idmesh_routes").returncode != 0
    ns.driver("fw_close")  # twice is fine
