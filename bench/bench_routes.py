"""Identity-based routes: throughput through a gateway, time for a route change to take effect, failover. Needs root.

One throwaway network with the topology of tests/e2e/test_routes.py
(tests/e2e/netns.py: namespaces on a bridge, IPv4 only, removed afterwards,
also on failure) and the real daemons::

    h1 controller      h2 agents (sender)      mesh bridge 198.51.100.0/24
    h3 exit-a ─┐
    h4 exit-b ─┴─ internet  203.0.113.0/24  (servers on 203.0.113.1)
    h5 billing-gw ── lan    10.20.0.0/16

The policy is the test's POLICY (SRE agents leave through exit-a, then
exit-b; billing agents through exit-b) plus one acl: tag:agents may reach
tag:exit on TCP 5201, for the direct path below.

1. Throughput. iperf3, one TCP stream, ``-t`` seconds, from h2 over:

   (a) through_gateway: an SRE agent on the ``agents`` node runs
       ``iperf3 -c 203.0.113.1`` (inside ``meshctl agent run``): agents ->
       the route tunnel to exit-a -> exit-a's gateway (route firewall,
       forwarding, NAT) -> the internet segment;
   (b) direct_tunnel: a plain process on the same node to exit-a's mesh
       address: the ordinary mesh tunnel, no gateway.

   Interleaved a, b, a, b, ... so that drift in the machine's load hits both
   alike. Reported: each run's Gbit/s (receiver side), the median per path
   and the ratio median(a)/median(b).

2. Time for a route policy change to take effect. A docs agent (ann@acme.com,
   ``docs:read``: no route in POLICY) runs a loop that connects to
   203.0.113.1 every ~0.1 s and prints ``<monotonic time> <answer>``. Then,
   ``--changes`` times: ``meshctl policy apply`` of a policy whose first
   route sends ``docs:*`` to 0.0.0.0/0 via exit-b, timed until the loop's
   first ``hello 203.0.113.3`` ("route granted"); then the original policy
   again, timed until the first ``failed`` ("route withdrawn"). Timed twice:
   from just before the apply command starts (time.monotonic(), the clock
   the agent prints: it is not per namespace), and from the controller's
   commit (the ``at`` of its ``policy.applied`` audit row, stamped as the
   controller takes the request, just before it validates and commits;
   wall clock, the agent's times converted on this machine). The first
   includes the ``meshctl policy apply`` command itself (~0.3-0.5 s of
   Python start-up and TLS before its request; the whole command's run,
   also reported, ends only after its answer, often after the effect).
   Both include the loop's granularity: 0.1 s
   between tries, plus up to 0.5 s for a connect that times out (a
   withdrawn route shows as a timeout). A connection succeeds only once
   both the sender (agents: route tunnel, policy routing) and the gateway
   (exit-b: its route firewall) have the new policy, so this is the time
   until every node that matters for the flow has converged. Before each
   change, every node reports the previous policy version.

3. Failover. An SRE agent runs the same loop; exit-a's meshd is stopped
   (SIGTERM) and the time until the first ``hello 203.0.113.3`` (exit-b)
   is taken from the signal; then meshd is started again on exit-a and the
   time until the first ``hello 203.0.113.2`` is taken from that start
   (meshd's own start-up included). ``--failovers`` times. Target: failover
   < 5 s.

Every process here shares the machine's cores (2 here) with iperf3, five
meshd and their wireguard-go processes (mesh interfaces, route tunnels and
gateway interfaces) and whatever else runs on the host.

    sudo .venv/bin/python bench/bench_routes.py [--runs 3] [--seconds 5] [--changes 5] [--failovers 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import start_namespace_bench

from tests.e2e.mesh import Mesh, Node, audited, tcp_server, wait_until
from tests.e2e.netns import Host, Network
from tests.e2e.test_routes import (
    BILLING_GW,
    DOCS,
    EXIT_A,
    EXIT_B,
    INTERNET,
    LAN,
    LOOP,
    POLICY,
    PORT,
    SRE,
    agent_argv,
    hello,
)

IPERF_PORT = 5201
FAILOVER_TARGET_S = 5.0
BASE_POLICY = POLICY + f'acls:\n  - from: {{tag: agents}}\n    to: ["tag:exit:{IPERF_PORT}"]\n'
DOCS_ROUTE = '  - from: {scope: "docs:*"}\n    to: 0.0.0.0/0\n    via: node:exit-b\n'
GRANTED_POLICY = BASE_POLICY.replace("routes:\n", "routes:\n" + DOCS_ROUTE, 1)
assert GRANTED_POLICY != BASE_POLICY and "acls:\n" in BASE_POLICY


def iperf_argv(address: str, seconds: int) -> list[str]:
    return ["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", "--connect-timeout", "3000"]


def iperf(host: Host, argv: list[str], seconds: int, mesh: Mesh) -> float:
    """Gbit/s received by the server for one TCP stream (iperf3 -J's end.sum_received)."""
    done = host.run(argv, check=False, timeout=seconds + 60)
    try:
        return float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"iperf3 failed ({' '.join(argv)}): exit {done.returncode}\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n{mesh.logs()}") from exc


def listening(host: Host, port: int) -> bool:
    return bool(host.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip())


class Loop:
    """An agent running the test's LOOP against the internet server; a thread collects its
    ``<monotonic time> <answer>`` lines as they arrive."""

    def __init__(self, mesh: Mesh, node: Node, who: tuple[str, str]) -> None:
        self.mesh = mesh
        self.who = who
        self.started = time.monotonic()
        self.proc = node.host.popen(agent_argv(node, who, sys.executable, "-c", LOOP, INTERNET, str(PORT)),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.done = False
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at, _, said = line.strip().partition(" ")
            try:
                moment = float(at)
            except ValueError:
                continue
            with self.cond:
                self.lines.append((moment, said))
                self.cond.notify_all()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def first(self, answer: str, after: float, timeout: float) -> float:
        """The monotonic time of the first line at or after ``after`` that reads ``answer``."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for at, said in self.lines[seen:]:
                    if at >= after and said == answer:
                        return at
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    break
                self.cond.wait(min(left, 1.0))
        stderr = ""
        if self.done and self.proc.stderr is not None:
            stderr = self.proc.stderr.read()
        recent = " | ".join(f"{at:.2f} {said}" for at, said in self.lines[-10:])
        raise SystemExit(f"{self.who[0]}'s agent never got {answer!r} within {timeout:g} s "
                         f"(last lines: {recent}) {stderr}\n{self.mesh.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        self.reader.join(10)


def audit_applied(mesh: Mesh) -> tuple[int, float]:
    """The newest ``policy.applied`` audit row: (policy version, its time as a Unix timestamp)."""
    moment, target = audited(mesh, "policy.applied")
    return int(target.rsplit("v", 1)[1]), moment


def policy_version_everywhere(mesh: Mesh, version: int) -> bool:
    return all(node.status()["policy"]["version"] == version for node in mesh.nodes.values() if node.proc is not None)


def timed_change(mesh: Mesh, loop: Loop, text: str, answer: str) -> dict[str, float]:
    """Apply ``text``; seconds from the apply command's start and from the controller's commit
    until the loop first reads ``answer``."""
    version, _ = audit_applied(mesh)
    wait_until(lambda: policy_version_everywhere(mesh, version), 30, f"every node on policy v{version}",
               on_fail=mesh.logs)
    time.sleep(0.5)  # a few more tries of the loop in the old state
    t0 = time.monotonic()
    mesh.apply_policy(text)
    applied = time.monotonic() - t0
    effect = loop.first(answer, t0, 60)
    wall = time.time() - time.monotonic()  # both clocks of this machine: the agent's monotonic times to wall clock
    new_version, committed = audit_applied(mesh)
    assert new_version == version + 1, (version, new_version)
    return {"from_apply": round(effect - t0, 3), "from_commit": round(effect + wall - committed, 3),
            "apply_command": round(applied, 3)}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (default %(default)s)")
    ap.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run (default %(default)s)")
    ap.add_argument("--changes", type=int, default=5,
                    help="route changes, each a grant then a withdrawal (default %(default)s)")
    ap.add_argument("--failovers", type=int, default=3, help="stops and restarts of exit-a (default %(default)s)")
    args = ap.parse_args()
    start_namespace_bench("iperf3, meshd, wireguard-go")
    with tempfile.TemporaryDirectory() as tmpdir, Network(5, ipv6=False) as net:
        internet = net.add_segment("internet", f"{INTERNET}/24",
                                   [(net["h3"], f"{EXIT_A}/24"), (net["h4"], f"{EXIT_B}/24")])
        net.add_segment("lan", f"{LAN}/16", [(net["h5"], f"{BILLING_GW}/16")])
        mesh = Mesh(net, Path(tmpdir), net["h1"])
        mesh.init(policy=BASE_POLICY)
        agents = mesh.enroll(net["h2"], "agents", "--tag", "agents")
        exit_a = mesh.enroll(net["h3"], "exit-a", "--tag", "exit")
        mesh.start(agents)
        mesh.start(exit_a, "--advertise-exit-node")
        mesh.start(mesh.enroll(net["h4"], "exit-b", "--tag", "exit"), "--advertise-exit-node")
        mesh.start(mesh.enroll(net["h5"], "billing-gw", "--tag", "billing-gw"), "--advertise-routes", "10.20.0.0/16")
        mesh.wait_converged()
        tcp_server(internet, "0.0.0.0", PORT)
        wait_until(lambda: hello(agents, SRE, INTERNET) == f"hello {EXIT_A}", 30, "the SRE agent leaving via exit-a",
                   on_fail=mesh.logs)
        print("mesh up; an SRE agent reaches the internet through exit-a", flush=True)

        # 1. throughput --------------------------------------------------------------------------
        for host in (internet, exit_a.host):
            host.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda host=host: listening(host, IPERF_PORT), 10, f"iperf3 server in {host.name}")
        paths: dict[str, Any] = {
            "through_gateway": lambda seconds: iperf(agents.host, agent_argv(agents, SRE, *iperf_argv(INTERNET, seconds)),
                                                     seconds, mesh),
            "direct_tunnel": lambda seconds: iperf(agents.host, iperf_argv(exit_a.addresses[0], seconds), seconds, mesh),
        }
        for path, measure in paths.items():  # warm-up, and the direct path waits for the acl
            wait_until(lambda measure=measure: measure(1) > 0, 30, f"a first iperf3 run {path}", on_fail=mesh.logs)
        gbps: dict[str, list[float]] = {p: [] for p in paths}
        for run in range(args.runs):
            for path, measure in paths.items():
                gbps[path].append(round(measure(args.seconds), 3))
                print(f"run {run + 1} {path:<16} {gbps[path][-1]:.3f} Gbit/s", flush=True)
        median_gbps = {p: median(v) for p, v in gbps.items()}

        # 2. route policy change -------------------------------------------------------------------
        docs = Loop(mesh, agents, DOCS)
        try:
            docs.first("failed", docs.started, 30)
            changes: dict[str, list[dict[str, float]]] = {"granted": [], "withdrawn": []}
            for k in range(args.changes):
                for kind, text, answer in (("granted", GRANTED_POLICY, f"hello {EXIT_B}"),
                                           ("withdrawn", BASE_POLICY, "failed")):
                    took = timed_change(mesh, docs, text, answer)
                    changes[kind].append(took)
                    print(f"change {k + 1}: route {kind:<9} {took['from_apply']:.3f} s after the apply command "
                          f"started, {took['from_commit']:.3f} s after the controller's commit "
                          f"(the command took {took['apply_command']:.3f} s)", flush=True)
        finally:
            docs.stop()

        # 3. failover ------------------------------------------------------------------------------
        failover: dict[str, list[float]] = {"to_exit_b": [], "meshd_stop": [], "back_to_exit_a": [],
                                            "meshd_start_to_local_api": []}
        sre = Loop(mesh, agents, SRE)
        try:
            sre.first(f"hello {EXIT_A}", sre.started, 30)
            for k in range(args.failovers):
                mesh.wait_converged()
                time.sleep(0.5)
                stopped = time.monotonic()
                code = mesh.stop(exit_a)
                failover["meshd_stop"].append(round(time.monotonic() - stopped, 3))
                failover["to_exit_b"].append(round(sre.first(f"hello {EXIT_B}", stopped, 60) - stopped, 3))
                print(f"failover {k + 1}: exit-a's meshd stopped (exit {code} after "
                      f"{failover['meshd_stop'][-1]:.3f} s); via exit-b after {failover['to_exit_b'][-1]:.3f} s",
                      flush=True)
                time.sleep(0.5)
                restarted = time.monotonic()
                mesh.start(exit_a, "--advertise-exit-node")
                failover["meshd_start_to_local_api"].append(round(time.monotonic() - restarted, 3))
                failover["back_to_exit_a"].append(round(sre.first(f"hello {EXIT_A}", restarted, 90) - restarted, 3))
                print(f"failover {k + 1}: exit-a's meshd started (local API after "
                      f"{failover['meshd_start_to_local_api'][-1]:.3f} s); via exit-a again after "
                      f"{failover['back_to_exit_a'][-1]:.3f} s", flush=True)
        finally:
            sre.stop()

    route_change = {kind: {"from_apply_s": [c["from_apply"] for c in runs],
                           "from_apply_median_s": median([c["from_apply"] for c in runs]),
                           "from_commit_s": [c["from_commit"] for c in runs],
                           "from_commit_median_s": median([c["from_commit"] for c in runs]),
                           "apply_command_median_s": median([c["apply_command"] for c in runs])}
                    for kind, runs in changes.items()}
    print(json.dumps({
        "iperf3": {"runs": args.runs, "seconds": args.seconds, "streams": 1, "gbit_s": gbps,
                   "median_gbit_s": median_gbps},
        "ratio_gateway_to_direct": round(median_gbps["through_gateway"] / median_gbps["direct_tunnel"], 3),
        "route_change": {"changes": args.changes, **route_change},
        "failover_s": {"failovers": args.failovers, **failover,
                       "to_exit_b_median": median(failover["to_exit_b"]),
                       "back_to_exit_a_median": median(failover["back_to_exit_a"])},
        "failover_target_s": FAILOVER_TARGET_S,
        "failover_within_target": median(failover["to_exit_b"]) < FAILOVER_TARGET_S,
        "cores": os.cpu_count(),
        "load_average_after": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
