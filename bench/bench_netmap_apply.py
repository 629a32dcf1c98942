"""What one netmap change costs a node, by mesh size.

For maps of 100, 1,000 and 10,000 peers, times:

* ``apply``: :meth:`NodeView.apply` of a one-node delta (an endpoint change),
  the protocol step that must stay flat (target <= 1 ms; Tailscale applies
  one to a 10k-peer map in ~28 us in Go);
* ``parse_apply``: the same with the JSON line parsed first
  (``StreamMessage.model_validate_json``), which is what meshd does per line;
* ``desired_device``: :func:`meshd.converge.desired_device` for the whole
  view, which the daemon runs after every change: O(peers) by design today;
* the rest of the daemon's per-change path, for the same reason:
  ``snapshot_json`` (the view written to netmap.json after each apply) and
  ``driver_apply`` (``FakeWireGuard.apply`` of a config that differs in one
  peer: the real UAPI client reading the whole device, the diff, the set).

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
import shlex
import statistics
import sys
import time
from collections.abc import Callable

from meshcore.addressing import MeshPrefixes
from meshcore.netmap import Netmap, NetmapDelta, NodeView, PeerNode, StreamMessage
from meshd.converge import desired_device
from meshd.wg import FakeWireGuard, generate_private_key

PREFIXES = MeshPrefixes(ipaddress.IPv4Network("100.64.0.0/10"), ipaddress.IPv6Network("fd7a:115c:a1e0::/48"))


def command_line() -> str:
    python = sys.executable
    if python.startswith(os.getcwd() + os.sep):
        python = os.path.relpath(python)
    return shlex.join([python, *sys.argv])


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

    def apply_prebuilt(batch: list[NetmapDelta]) -> Callable[[], None]:
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
    dd_s, dd_wall, dd_runs = measure(lambda: desired_device(private, 51820, view, self_name), 5, 0.5)
    snap_s, snap_wall, snap_runs = measure(lambda: view.snapshot().model_dump_json(), 5, 0.5)

    device = FakeWireGuard()
    configs = []
    for k in range(2):
        view.apply(NetmapDelta(base=view.version, version=view.version + 1, upsert=(moved(nodes[1], 77 + k),)))
        configs.append(desired_device(private, 51820, view, self_name))
    device.apply(configs[0])
    flip = iter(range(10**9))
    drv_s, drv_wall, drv_runs = measure(lambda: device.apply(configs[next(flip) % 2 - 1]), 5, 0.5)
    assert len(device.state().peers) == n - 1
    line_bytes = len(lines[0]) + 1

    return {
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
              f"desired_device {row['desired_device_ms']:>8} ms   snapshot_json {row['snapshot_json_ms']:>7} ms   "
              f"driver_apply {row['driver_apply_one_change_ms']:>8} ms", flush=True)
    small, large = results[0], results[-1]
    print(json.dumps({
        "results": results,
        "apply_growth_x": round(float(large["apply_us"]) / float(small["apply_us"]), 2),  # type: ignore[arg-type]
        "desired_device_growth_x": round(float(large["desired_device_ms"])  # type: ignore[arg-type]
                                         / float(small["desired_device_ms"]), 1),  # type: ignore[arg-type]
        "apply_target_us": 1000,
        "pinned_cpu": args.cpu if args.cpu >= 0 else None,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }, indent=2))


if __name__ == "__main__":
    main()
