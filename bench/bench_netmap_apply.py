"""What one netmap change costs a node, by mesh size.

For maps of 100, 1,000 and 10,000 peers, times:

* ``apply``: :meth:`NodeView.apply` of a one-node delta (an endpoint change),
  the protocol step that must stay flat (target <= 1 ms; Tailscale applies
  one to a 10k-peer map in ~28 us in Go);
* ``parse_apply``: the same with the JSON line parsed first
  (``StreamMessage.model_validate_json``), which is what meshd does per line;
* ``node_change``: the daemon's whole path for that delta after the view:
  :class:`meshd.mesh.dataplane.DataPlane` taking the change and applying it —
  identities, firewall filter (unchanged here: an endpoint moved) and one
  incremental WireGuard operation through the real UAPI client against the
  in-memory device (``FakeWireGuard``); nftables itself is not run;
* ``agent_born``: the same path for an agent identity joining (a set element
  for the firewall, no WireGuard change);
* for comparison, the whole-device paths the daemon takes only on connect,
  resync or restart: ``desired_device`` (every peer's config, :func:`desired_peers`) and
  ``driver_apply`` (``FakeWireGuard.apply``: read the device, diff, set), and
  ``snapshot_json`` (the cached netmap, written at most every 5 s).

Each figure is the median over many runs (5,000 for the microsecond steps,
at least 5 runs and 0.5 s for the others) on one pinned core, of the
thread's CPU time (the cost, unaffected by other processes on the shared
machine); the median wall time is printed beside it (``*_wall_*``), and a
gap between the two is a neighbour's doing.

    .venv/bin/python bench/bench_netmap_apply.py [--sizes 100,1000,10000]
"""

from __future__ import annotations

import argparse
import base64
import gc
import ipaddress
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

from common import command_line

from meshcore.addressing import MeshPrefixes
from meshcore.netmap import NodeView
from meshcore.policy import AgentIdentity, NodeFilter, load_policy
from meshcore.scopes import parse_scopes
from meshcore.wire.stream import Netmap, NetmapDelta, PeerNode, StreamMessage
from meshd.kernel.netconf import FakeNetConf
from meshd.mesh.dataplane import DataPlane
from meshd.mesh.peers import desired_peers
from meshd.wg import DeviceConfig, FakeWireGuard, generate_private_key

POLICY = load_policy("""\
services:
  db: {nodes: [tag:db], ports: [5432]}
acls:
  - from: {tag: bench}
    to: ["tag:bench:22"]
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: [db]
""", "bench.yaml")


class _UnrunFirewall:
    """Takes the compiled filter like meshd.mesh.firewall.NftFirewall, without running nft (timed apart)."""

    def apply(self, nf: NodeFilter) -> str:
        return "unrun"

PREFIXES = MeshPrefixes(ipaddress.IPv4Network("100.64.0.0/10"), ipaddress.IPv6Network("fd7a:115c:a1e0::/48"))


def peer(i: int, port: int = 51820) -> PeerNode:
    block = PREFIXES.block(i)
    key = base64.b64encode(i.to_bytes(4, "big") + os.urandom(28)).decode()
    return PeerNode(name=f"node-{i}", wireguard_public_key=key, addresses=(str(block.node_v4), str(block.node_v6)),
                    blocks=(str(block.v4), str(block.v6)),
                    endpoints=(f"198.51.{100 + i // 250 % 100}.{i % 250 + 1}:{port}",), tags=("bench",))


def moved(node: PeerNode, k: int) -> PeerNode:
    return node.model_copy(update={"endpoints": (f"203.0.113.{k % 250 + 1}:{40000 + k % 20000}",)})


def measure(fn: Callable[[], object], min_runs: int, min_seconds: float) -> tuple[float, float, int]:
    """(median CPU s, median wall s, runs) of ``fn``, after one warm-up call.

    CPU time (this thread's) is the cost; wall time also counts whatever else
    ran on the core meanwhile, which on a shared machine can be a lot.
    """
    fn()
    cpus: list[int] = []
    walls: list[int] = []
    gc.collect()
    gc.disable()  # as timeit does: a collection of the setup's garbage is nobody's per-run cost
    try:
        t_end = time.perf_counter() + min_seconds
        while len(walls) < min_runs or time.perf_counter() < t_end:
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            fn()
            walls.append(time.perf_counter_ns() - t0)
            cpus.append(time.thread_time_ns() - c0)
    finally:
        gc.enable()
    return statistics.median(cpus) / 1e9, statistics.median(walls) / 1e9, len(walls)


def bench_size(n: int, private: str) -> dict[str, object]:
    nodes = [peer(i) for i in range(n)]
    full = Netmap(version=1, domain="bench.mesh", prefixes=(str(PREFIXES.v4), str(PREFIXES.v6)),
                  nodes={p.name: p for p in nodes})
    self_name = nodes[0].name

    # apply: a fresh one-node delta each run, built beforehand (building it is the controller's cost)
    view = NodeView(full)

    def apply_prebuilt(batch: list[NetmapDelta]) -> Callable[[], object]:
        it = iter(batch)
        return lambda: view.apply(next(it))

    runs = 5000  # plus one for measure()'s warm-up
    deltas = [NetmapDelta(base=view.version + k, version=view.version + k + 1,
                          upsert=(moved(nodes[1 + k % (n - 1)], k),)) for k in range(runs + 1)]
    apply_s, apply_wall, apply_runs = measure(apply_prebuilt(deltas), runs, 0.0)

    lines = [StreamMessage(type="delta", delta=NetmapDelta(base=view.version + k, version=view.version + k + 1,
                                                           upsert=(moved(nodes[1 + k % (n - 1)], k),)))
             .model_dump_json(exclude_none=True) for k in range(runs + 1)]
    line_iter = iter(lines)

    def parse_apply() -> None:
        message = StreamMessage.model_validate_json(next(line_iter))
        assert message.delta is not None
        view.apply(message.delta)

    parse_s, parse_wall, parse_runs = measure(parse_apply, runs, 0.0)
    assert len(view.nodes) == n

    # the daemon's O(peers) steps after each change
    def desired_device() -> DeviceConfig:
        return DeviceConfig(private, 51820, tuple(desired_peers(view.nodes, self_name, {}).values()))

    dd_s, dd_wall, dd_runs = measure(desired_device, 5, 0.5)
    snap_s, snap_wall, snap_runs = measure(lambda: view.snapshot().model_dump_json(), 5, 0.5)

    device = FakeWireGuard()
    configs = []
    for k in range(2):
        view.apply(NetmapDelta(base=view.version, version=view.version + 1, upsert=(moved(nodes[1], 77 + k),)))
        configs.append(desired_device())
    device.apply(configs[0])
    flip = iter(range(10**9))
    drv_s, drv_wall, drv_runs = measure(lambda: device.apply(configs[next(flip) % 2 - 1]), 5, 0.5)
    assert len(device.state().peers) == n - 1
    line_bytes = len(lines[0]) + 1

    # the daemon's real per-change path: DataPlane, incremental
    netconf = FakeNetConf()
    netconf.add_link("wg0")
    plane = DataPlane(self_name, (nodes[0].addresses[0], nodes[0].addresses[1]), private, 51820, "wg0", FakeWireGuard("wg0"), netconf,
                      _UnrunFirewall())  # type: ignore[arg-type]
    agents: dict[str, AgentIdentity] = {}
    plane.apply(plane.take(POLICY, view.nodes, agents, {}, full.prefixes))
    counter = iter(range(10**9))

    def node_change() -> None:
        k = next(counter)
        target = nodes[1 + k % (n - 1)]
        view.apply(NetmapDelta(base=view.version, version=view.version + 1, upsert=(moved(target, 1000 + k),)))
        plane.nodes_changed([target.name])
        plane.apply(plane.take(POLICY, view.nodes, agents, {}, full.prefixes))

    nc_s, nc_wall, nc_runs = measure(node_change, 200, 0.5)
    block = PREFIXES.block(1)

    def agent_born() -> None:
        k = next(counter) % (block.agent_capacity)
        v4, v6 = block.agent_address(k)
        a = AgentIdentity(id=f"a{k}", name="b", principal="nikita@acme.com", scopes=parse_scopes(["db:read"]),
                          node=nodes[1].name, ipv4=str(v4), ipv6=str(v6))
        agents.pop(a.id, None)
        agents[a.id] = a
        plane.agents_changed([a.id])
        plane.apply(plane.take(POLICY, view.nodes, agents, {}, full.prefixes))

    ab_s, ab_wall, ab_runs = measure(agent_born, 200, 0.5)

    return {
        "node_change_us": round(nc_s * 1e6, 1), "node_change_wall_us": round(nc_wall * 1e6, 1),
        "node_change_runs": nc_runs,
        "agent_born_us": round(ab_s * 1e6, 1), "agent_born_wall_us": round(ab_wall * 1e6, 1),
        "agent_born_runs": ab_runs,
        "peers": n,
        "apply_us": round(apply_s * 1e6, 2), "apply_wall_us": round(apply_wall * 1e6, 2), "apply_runs": apply_runs,
        "parse_apply_us": round(parse_s * 1e6, 2), "parse_apply_wall_us": round(parse_wall * 1e6, 2),
        "parse_apply_runs": parse_runs,
        "delta_line_bytes": line_bytes,
        "desired_device_ms": round(dd_s * 1e3, 3), "desired_device_wall_ms": round(dd_wall * 1e3, 3),
        "desired_device_runs": dd_runs,
        "snapshot_json_ms": round(snap_s * 1e3, 3), "snapshot_json_wall_ms": round(snap_wall * 1e3, 3),
        "snapshot_json_runs": snap_runs,
        "driver_apply_one_change_ms": round(drv_s * 1e3, 3), "driver_apply_wall_ms": round(drv_wall * 1e3, 3),
        "driver_apply_runs": drv_runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000", help="comma-separated peer counts")
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (default %(default)s; -1: do not pin)")
    args = ap.parse_args()
    print(f"$ {command_line()}")
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    gc.collect()
    private = generate_private_key()
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        row = bench_size(n, private)
        results.append(row)
        print(f"{n:>6} peers: apply {row['apply_us']:>6} us   parse+apply {row['parse_apply_us']:>6} us   "
              f"node_change {row['node_change_us']:>7} us   agent_born {row['agent_born_us']:>7} us   | whole-device: "
              f"desired_device {row['desired_device_ms']:>8} ms   driver_apply {row['driver_apply_one_change_ms']:>8} ms"
              f"   snapshot_json {row['snapshot_json_ms']:>7} ms", flush=True)
    small, large = results[0], results[-1]
    print(json.dumps({
        "results": results,
        "apply_growth_x": round(float(large["apply_us"]) / float(small["apply_us"]), 2),  # type: ignore[arg-type]
        "node_change_growth_x": round(float(large["node_change_us"])  # type: ignore[arg-type]
                                      / float(small["node_change_us"]), 2),  # type: ignore[arg-type]
        "desired_device_growth_x": round(float(large["desired_device_ms"])  # type: ignore[arg-type]
                                         / float(small["desired_device_ms"]), 1),  # type: ignore[arg-type]
        "apply_target_us": 1000,
        "pinned_cpu": args.cpu if args.cpu >= 0 else None,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }, indent=2))


if __name__ == "__main__":
    main()
