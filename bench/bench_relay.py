"""WireGuard throughput through meshd's TURN relay and coturn, against a direct path between the same hosts.

The NAT lab (tests/e2e/natlab.py: namespaces removed afterwards, also on
failure): coturn on the public host, two hosts in two homes, each running
wireguard-go (tests/e2e/wgnode.py, MTU 1420 like meshd) and a
:class:`meshd.nat.relay.Relay` (tests/e2e/relaynode.py). iperf3, one TCP
stream, host a -> host b over the overlay, ``-t`` seconds:

  (a) relayed: both routers symmetric NATs, each WireGuard's endpoint for
      the other is its relay's local socket: a's WireGuard -> a's relay ->
      coturn (allocation a -> allocation b) -> b's relay -> b's WireGuard;
  (b) direct: then both routers "open" (plain routing), the endpoints set
      to the other's LAN address: the same WireGuard, no relay, no coturn.

All relayed runs come first, then the direct ones (switching the NAT kind
changes the relays' own mappings to coturn, which would need new
allocations). Also reported: CPU seconds per relayed run of each relay
process and of coturn, so the cost per Gbit is visible. Every process here
shares the machine's cores (2 here) with iperf3, two wireguard-go, two
relays and coturn.

    sudo .venv/bin/python bench/bench_relay.py [--runs 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_seconds, start_namespace_bench

from meshcore.turn import turn_credentials
from meshd.wg import DeviceConfig, PeerConfig, generate_private_key, public_key_of
from tests.e2e.coturn import Coturn
from tests.e2e.natlab import NatLab
from tests.e2e.netns import Host, wait_until
from tests.e2e.relaynode import RelayNode
from tests.e2e.wgnode import WgNode

WG_PORT = 51820
IPERF_PORT = 5201
OVERLAY = {"a": "100.64.1.1", "b": "100.64.2.1"}


def iperf(client: Host, address: str, seconds: int) -> float:
    """Gbit/s received by the server for one TCP stream."""
    done = client.run(["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
                      timeout=seconds + 30)
    return float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def ping_once(host: Host, address: str) -> bool:
    return host.run(["ping", "-c", "1", "-W", "0.5", address], check=False, timeout=5).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (default %(default)s)")
    ap.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run (default %(default)s)")
    args = ap.parse_args()
    start_namespace_bench("iperf3, two wireguard-go, two relays, coturn")
    with tempfile.TemporaryDirectory() as tmpdir, NatLab(2, nat="symmetric") as lab:
        tmp = Path(tmpdir)
        turn = Coturn(lab.public, tmp / "coturn")
        turn.start()
        hosts = {"a": lab.homes[0].hosts[0], "b": lab.homes[1].hosts[0]}
        keys = {n: generate_private_key() for n in hosts}
        wg = {n: WgNode(h, tmp / f"{n}-wg.log") for n, h in hosts.items()}
        relays = {n: RelayNode(h, tmp / f"{n}-relay.log") for n, h in hosts.items()}
        now = datetime.now(UTC)
        relayed = {n: r.start(turn.server, *turn_credentials(turn.secret, n, now, timedelta(hours=1)), WG_PORT)
                   for n, r in relays.items()}

        def configure(endpoints: dict[str, str]) -> None:
            for name, other in (("a", "b"), ("b", "a")):
                peer = PeerConfig(public_key_of(keys[other]), (f"{OVERLAY[other]}/32",), endpoints[name])
                wg[name].apply(DeviceConfig(keys[name], WG_PORT, (peer,)), [f"{OVERLAY[name]}/32"], ["100.64.0.0/10"])

        configure({"a": relays["a"].open(public_key_of(keys["b"]), relayed["b"]),
                   "b": relays["b"].open(public_key_of(keys["a"]), relayed["a"])})
        hosts["b"].popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: ping_once(hosts["a"], OVERLAY["b"]), 20, "the relayed tunnel")
        wait_until(lambda: hosts["a"].run(["iperf3", "-c", OVERLAY["b"], "-p", str(IPERF_PORT), "-t", "1"],
                                          check=False).returncode == 0, 20, "iperf3 server")
        gbps: dict[str, list[float]] = {"relayed": [], "direct": []}
        cpu: dict[str, list[float]] = {"relay_a": [], "relay_b": [], "coturn": []}
        pids = {"relay_a": relays["a"].proc.pid, "relay_b": relays["b"].proc.pid, "coturn": turn.proc.pid}  # type: ignore[union-attr]
        for run in range(args.runs):
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            gbps["relayed"].append(round(iperf(hosts["a"], OVERLAY["b"], args.seconds), 3))
            for k, p in pids.items():
                cpu[k].append(round(cpu_seconds(p) - before[k], 2))
            print(f"run {run + 1} relayed {gbps['relayed'][-1]:.3f} Gbit/s", flush=True)
        counters = {n: r.state()["counters"] for n, r in relays.items()}

        for router in lab.routers:
            router.set_nat("open")
        configure({"a": f"{hosts['b'].underlay4}:{WG_PORT}", "b": f"{hosts['a'].underlay4}:{WG_PORT}"})
        wait_until(lambda: ping_once(hosts["a"], OVERLAY["b"]), 20, "the direct tunnel")
        for run in range(args.runs):
            gbps["direct"].append(round(iperf(hosts["a"], OVERLAY["b"], args.seconds), 3))
            print(f"run {run + 1} direct  {gbps['direct'][-1]:.3f} Gbit/s", flush=True)
        for node in [*relays.values(), *wg.values()]:
            node.close()
        turn.stop()
    median = {p: round(statistics.median(v), 3) for p, v in gbps.items()}
    print(json.dumps({
        "iperf3": {"runs": args.runs, "seconds": args.seconds, "streams": 1, "gbit_s": gbps, "median_gbit_s": median},
        "ratio_relayed_to_direct": round(median["relayed"] / median["direct"], 3),
        "cpu_seconds_per_relayed_run": cpu,
        "relay_counters_after_relayed_runs": counters,
        "paths": {"relayed": "a wg -> 127.0.0.1 relay a -> coturn 203.0.113.10 -> relay b -> b wg (symmetric NATs)",
                  "direct": "a wg -> b wg over the two routers, plain routing (open)"},
        "cores": os.cpu_count(),
        "load_average_after": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
