"""NAT traversal with the whole product: real meshd, the controller's STUN, coturn, NAT routers in namespaces.

The NAT lab (tests/e2e/natlab.py; namespaces removed afterwards, also on
failure): the controller (STUN on 3478/3479, ``--relay`` to coturn on 3480)
on the public host, nodes a and b in two homes behind their own routers.
Figures, each the median of ``--runs``:

* **start → first packet**: both ``meshd run`` launched at once (node
  state enrolled before, controller up), then ``ping -c 1 -W 0.2`` from a
  to b over the overlay in a loop: the time from the launch to the first
  answer. Behind two endpoint-independent NATs (the path found is
  direct), and behind two symmetric NATs (through the relay).
* **relay → direct**: both on the relay (symmetric NATs), then both
  routers switched to endpoint-independent NAT (conntrack flushed, as a
  router reconfiguration does): the time until both ends report a direct
  path, and until a ping through it answers.
* **throughput**: iperf3, one TCP stream a → b over the overlay, for the
  direct path behind the two NATs, the same with the routers "open" (no
  NAT: plain routing), and through the relay.

Everything shares the machine's cores (2 here): two meshd, two
wireguard-go, the controller, coturn, iperf3.

    sudo .venv/bin/python bench/bench_nat.py [--runs 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import start_namespace_bench

from tests.e2e.coturn import Coturn
from tests.e2e.mesh import Mesh, Node, cmd, wait_until
from tests.e2e.natlab import NatKind, NatLab

IPERF_PORT = 5201
TURN_PORT = 3480
POLICY = """\
acls:
  - from: {tag: e2e}
    to: ["tag:e2e:*"]
    protocol: [tcp, udp, icmp]
"""


def ping_once(node: Node, address: str) -> bool:
    return node.host.run(["ping", "-c", "1", "-W", "0.2", address], check=False, timeout=5).returncode == 0


def path(node: Node) -> str:
    (peer,) = node.status()["peers"]
    return str(peer["path"])


def iperf(client: Node, address: str, seconds: int) -> float:
    done = client.host.run(["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
                           timeout=seconds + 30)
    return float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


class Bench:
    def __init__(self, lab: NatLab, tmp: Path) -> None:
        self.lab = lab
        self.coturn = Coturn(lab.public, tmp / "turn", port=TURN_PORT)
        self.coturn.start()
        secret = tmp / "relay-secret"
        secret.touch(mode=0o600)
        secret.write_text(self.coturn.secret.decode())
        self.mesh = Mesh(lab, tmp, lab.public, serve=[cmd("mesh-controller"), "serve", "--relay",
                                                       f"turn:{self.coturn.address}:{TURN_PORT}",
                                                       "--relay-secret-file", str(secret)])
        self.mesh.init(policy=POLICY)
        self.a = self.mesh.enroll(lab.homes[0].hosts[0], "a", "--tag", "e2e")
        self.b = self.mesh.enroll(lab.homes[1].hosts[0], "b", "--tag", "e2e")

    def set_nat(self, kind: NatKind) -> None:
        for router in self.lab.routers:
            router.set_nat(kind)

    def start_both(self) -> float:
        """Launch both meshd at once; return the launch time (monotonic)."""
        t0 = time.monotonic()
        for node in (self.a, self.b):
            node.socket.unlink(missing_ok=True)
            with node.log.open("a") as log:
                node.proc = node.host.popen(
                    [cmd("meshd"), "run", "--state", str(node.state), "--interface", node.host.wg_ifname,
                     "--socket", str(node.socket), "--no-discovery"], stdout=log, stderr=subprocess.STDOUT)
        return t0

    def stop_both(self) -> None:
        for node in (self.a, self.b):
            if node.proc is not None:
                self.mesh.stop(node)

    def first_packet(self, kind: NatKind, runs: int) -> list[float]:
        self.set_nat(kind)
        out = []
        for _ in range(runs):
            t0 = self.start_both()
            wait_until(lambda: ping_once(self.a, self.b.addresses[0]), 30, f"a first packet behind {kind} NATs",
                       self.mesh.logs, interval=0.0)
            out.append(round(time.monotonic() - t0, 3))
            self.stop_both()
            self.set_nat(kind)  # every run starts from routers that have no mapping
        return out

    def upgrade(self, runs: int) -> tuple[list[float], list[float]]:
        to_path, to_packet = [], []
        self.set_nat("symmetric")
        self.start_both()
        for _ in range(runs):
            wait_until(lambda: path(self.a) == "relay" == path(self.b), 40, "both relayed", self.mesh.logs)
            wait_until(lambda: ping_once(self.a, self.b.addresses[0]), 30, "a ping over the relay", self.mesh.logs)
            t0 = time.monotonic()
            self.set_nat("eim")
            wait_until(lambda: path(self.a) == "direct" == path(self.b), 40, "both direct", self.mesh.logs,
                       interval=0.02)
            to_path.append(round(time.monotonic() - t0, 3))
            wait_until(lambda: ping_once(self.a, self.b.addresses[0]), 30, "a ping over the direct path",
                       self.mesh.logs, interval=0.0)
            to_packet.append(round(time.monotonic() - t0, 3))
            self.set_nat("symmetric")
        self.stop_both()
        return to_path, to_packet

    def throughput(self, seconds: int, runs: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        server = self.b.host.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            kinds: list[tuple[NatKind, str, str]] = [("eim", "direct behind NAT", "direct"),
                                                     ("open", "direct, no NAT", "direct"),
                                                     ("symmetric", "relayed", "relay")]
            for kind, label, want in kinds:
                self.set_nat(kind)
                self.start_both()
                wait_until(lambda want=want: path(self.a) == want == path(self.b), 40, f"both {want}",
                           self.mesh.logs)
                wait_until(lambda: ping_once(self.a, self.b.addresses[0]), 30, "a ping", self.mesh.logs)
                out[label] = [round(iperf(self.a, self.b.addresses[0], seconds), 3) for _ in range(runs)]
                print(f"{label}: {out[label]} Gbit/s", flush=True)
                self.stop_both()
        finally:
            server.terminate()
            server.wait(5)
        return out


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (default %(default)s)")
    ap.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run (default %(default)s)")
    args = ap.parse_args()
    start_namespace_bench("two meshd, two wireguard-go, the controller, coturn, iperf3")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmpdir, NatLab(2, nat="eim") as lab:
        bench = Bench(lab, Path(tmpdir))
        try:
            direct = bench.first_packet("eim", args.runs)
            print(f"start -> first packet, direct behind two EIM NATs: {direct} s", flush=True)
            relayed = bench.first_packet("symmetric", args.runs)
            print(f"start -> first packet, relayed (two symmetric NATs): {relayed} s", flush=True)
            to_path, to_packet = bench.upgrade(args.runs)
            print(f"relay -> direct: path {to_path} s, first packet {to_packet} s", flush=True)
            gbps = bench.throughput(args.seconds, max(1, args.runs // 2))
        finally:
            bench.stop_both()
            bench.coturn.stop()
        result = {
            "start_to_first_packet_s": {"direct_behind_eim_nats": median(direct), "relayed": median(relayed),
                                        "runs": {"direct": direct, "relayed": relayed}},
            "relay_to_direct_s": {"path": median(to_path), "first_packet": median(to_packet),
                                  "runs": {"path": to_path, "first_packet": to_packet}},
            "iperf3_gbit_s": {k: median(v) for k, v in gbps.items()},
            "ratio_direct_behind_nat_to_no_nat": round(median(gbps["direct behind NAT"])
                                                       / median(gbps["direct, no NAT"]), 3),
            "ratio_relayed_to_direct": round(median(gbps["relayed"]) / median(gbps["direct behind NAT"]), 3),
            "cores": os.cpu_count(),
            "load_average_after": round(os.getloadavg()[0], 2),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
