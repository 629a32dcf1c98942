"""Tunnel throughput between two namespaces, and time to a first packet through a new tunnel. Needs root.

One throwaway network (tests/e2e/netns.py: namespaces on a bridge, removed
afterwards, also on failure): h1 runs the controller, h2 and h3 carry the
traffic, h4 hosts the nodes whose start-up is timed. iperf3 (one TCP
stream, h2 -> h3, ``-t`` seconds) over:

  (a) the bare veth/bridge underlay: the physical ceiling here;
  (b) wireguard-go configured by hand: ``wireguard-go -f``, ``wg set``,
      ``ip addr``/``ip link`` (MTU 1420 like meshd), 10.99.0.0/24;
  (c) the tunnel idmesh builds: ``mesh-controller serve`` + ``meshd run`` on
      h2 and h3 (same wireguard-go binary), their overlay addresses.

(c) also carries what meshd installs besides the tunnel (its nftables
tables, listed in the output); (b) has none. (b) and (c) run side by side
on different interfaces and ports, and the
runs are interleaved a, b, c, a, b, c, ... so that drift in the machine's
load hits all three alike. Reported: each run's Gbit/s (receiver side), the
median per path and the ratio (c)/(b) (target >= 0.95); and (d): the same to a
third node, on h4, whose meshd runs with ``--no-flow-log``, interleaved too:
(c)/(d) is the flow log's cost (target >= 0.97).

Then, K times: enroll a fresh node on h4, start ``meshd run`` and ping h2's
overlay address in a loop (``ping -c1 -W0.2`` per try) until one answers;
the time from starting meshd to that answer, median of K. Once more with a
restart of an already-running node (its netmap cached on disk).

Every process here shares the machine's cores (2 here) with iperf3, two or
four wireguard-go processes and whatever else runs on the host.

    sudo .venv/bin/python bench/bench_tunnel.py [--runs 3] [--seconds 5] [--starts 5]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import start_namespace_bench

from tests.e2e.mesh import Mesh, Node, cmd
from tests.e2e.netns import UAPI_DIR, Host, Network, wait_until

IPERF_PORT = 5201
MANUAL_PORT = 51821
MANUAL_NET = "10.99.0"


def wg_keys() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], check=True, capture_output=True, text=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, check=True, capture_output=True, text=True).stdout.strip()
    return private, public


def manual_tunnel(net: Network, hosts: list[Host], tmp: Path) -> dict[str, str]:
    """(b): wireguard-go between the hosts, configured only with wg and ip. Returns host name -> tunnel address."""
    keys = {h.name: wg_keys() for h in hosts}
    addresses = {h.name: f"{MANUAL_NET}.{h.index}" for h in hosts}
    for host in hosts:
        ifname = host.wg_ifname + "m"
        host.popen(["wireguard-go", "-f", ifname], env={**os.environ, "LOG_LEVEL": "error"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sock = UAPI_DIR / f"{ifname}.sock"
        wait_until(sock.exists, 10, f"wireguard-go {ifname}")
        keyfile = tmp / f"{host.name}.wgkey"
        keyfile.write_text(keys[host.name][0] + "\n")
        keyfile.chmod(0o600)
        argv = ["wg", "set", ifname, "listen-port", str(MANUAL_PORT), "private-key", str(keyfile)]
        for other in hosts:
            if other is not host:
                argv += ["peer", keys[other.name][1], "allowed-ips", f"{addresses[other.name]}/32",
                         "endpoint", f"{other.underlay4}:{MANUAL_PORT}"]
        host.run(argv)
        host.run(["ip", "addr", "add", f"{addresses[host.name]}/24", "dev", ifname])
        host.run(["ip", "link", "set", ifname, "mtu", "1420", "up"])
    return addresses


def iperf(client: Host, address: str, seconds: int) -> float:
    """Gbit/s received by the server for one TCP stream."""
    done = client.run(["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
                      timeout=seconds + 30)
    return float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def link_mtu(host: Host, ifname: str) -> int:
    fields = host.run(["ip", "-o", "link", "show", "dev", ifname]).stdout.split()
    return int(fields[fields.index("mtu") + 1])


def nft_tables(host: Host) -> list[str]:
    return [" ".join(line.split()[1:]) for line in host.run(["nft", "list", "tables"], check=False).stdout.splitlines()]


def ping_once(host: Host, address: str) -> bool:
    return host.run(["ping", "-c", "1", "-W", "0.2", address], check=False, timeout=5).returncode == 0


def start_meshd(node: Node) -> None:
    """As Mesh.start, without waiting for anything: the caller is timing."""
    with node.log.open("a") as log:
        node.proc = node.host.popen(
            [cmd("meshd"), "run", "--state", str(node.state), "--interface", node.host.wg_ifname,
             "--socket", str(node.socket)], stdout=log, stderr=subprocess.STDOUT)


def time_to_first_ping(mesh: Mesh, node: Node, target: str, timeout: float = 60) -> float:
    t0 = time.monotonic()
    start_meshd(node)
    while not ping_once(node.host, target):
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"no ping through {node.name}'s new tunnel in {timeout:g} s\n{mesh.logs()}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (default %(default)s)")
    ap.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run (default %(default)s)")
    ap.add_argument("--starts", type=int, default=5, help="timed meshd starts (default %(default)s)")
    args = ap.parse_args()
    start_namespace_bench("iperf3, wireguard-go")
    with tempfile.TemporaryDirectory() as tmpdir, Network(4) as net:
        tmp = Path(tmpdir)
        h1, h2, h3, h4 = net.hosts
        mesh = Mesh(net, tmp, h1)
        mesh.init()
        a, b = mesh.enroll(h2, "a"), mesh.enroll(h3, "b")
        quiet = mesh.enroll(h4, "quiet")  # a receiver like b, without the flow log: its cost is (c)/(d)
        mesh.start(a)
        mesh.start(b)
        mesh.start(quiet, "--no-flow-log")
        mesh.wait_converged()
        manual = manual_tunnel(net, [h2, h3], tmp)
        wait_until(lambda: ping_once(h2, manual["h3"]), 10, "the hand-made tunnel")
        for host in (h3, h4):
            host.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        paths = {"a_underlay": h3.underlay4, "b_wireguard_go_by_hand": manual["h3"],
                 "c_idmesh": b.addresses[0], "d_idmesh_no_flow_log": quiet.addresses[0]}
        wait_until(lambda: h2.run(["iperf3", "-c", h3.underlay4, "-p", str(IPERF_PORT), "-t", "1"],
                                  check=False).returncode == 0, 10, "iperf3 server")
        setup = {"mtu_by_hand": link_mtu(h3, h3.wg_ifname + "m"), "mtu_idmesh": link_mtu(h3, h3.wg_ifname),
                 "nftables_tables_on_receiver": nft_tables(h3)}
        gbps: dict[str, list[float]] = {p: [] for p in paths}
        for run in range(args.runs):
            for path, address in paths.items():
                gbps[path].append(round(iperf(h2, address, args.seconds), 3))
                print(f"run {run + 1} {path:<24} {gbps[path][-1]:.3f} Gbit/s", flush=True)

        mesh.stop(quiet)
        mesh.admin("nodes", "remove", quiet.name)

        cold: list[float] = []
        target = a.addresses[0]
        for k in range(args.starts):
            node = mesh.enroll(h4, f"new-{k}")
            took = time_to_first_ping(mesh, node, target)
            cold.append(round(took, 3))
            print(f"start {k + 1}: fresh node, first ping after {took:.3f} s", flush=True)
            if k < args.starts - 1:
                mesh.stop(node)
                mesh.admin("nodes", "remove", node.name)
        warm: list[float] = []
        for k in range(3):
            mesh.stop(node)
            took = time_to_first_ping(mesh, node, target)
            warm.append(round(took, 3))
            print(f"restart {k + 1}: enrolled node, cached netmap, first ping after {took:.3f} s", flush=True)
        median = {p: round(statistics.median(v), 3) for p, v in gbps.items()}
    print(json.dumps({
        "iperf3": {"runs": args.runs, "seconds": args.seconds, "streams": 1, "gbit_s": gbps, "median_gbit_s": median},
        "ratio_idmesh_to_hand_made": round(median["c_idmesh"] / median["b_wireguard_go_by_hand"], 3),
        "ratio_target": 0.95,
        "ratio_flow_log_on_to_off": round(median["c_idmesh"] / median["d_idmesh_no_flow_log"], 3),
        "flow_log_ratio_target": 0.97,
        "ratio_hand_made_to_underlay": round(median["b_wireguard_go_by_hand"] / median["a_underlay"], 3),
        "setup": setup,
        "first_ping_after_meshd_run_s": {"fresh_node_runs": cold, "fresh_node_median": statistics.median(cold),
                                         "restart_runs": warm, "restart_median": statistics.median(warm)},
        "cores": os.cpu_count(),
        "load_average_after": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
