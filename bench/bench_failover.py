"""Failover: from a controller replica's death to every node streaming from another.

A PostgreSQL 15 cluster made for the run (tests/pg.py, fsync on), two
real replicas (``mesh-controller init --db`` and ``join``), and N nodes
enrolled with ``meshd enroll``'s own code. Each node is meshd's own
controller session (:class:`meshd.node.session.ControllerSession`: the
failover order and jittered back-off of meshcore.failover, its endpoint
report, its ``?since=`` stream), all in this one process on one event
loop, with no kernel work (the data plane is not what is measured). Then,
round after round, the replica the nodes stream from is killed with
``-9`` and started again once every node has moved: the time from the
kill to the last node's first message from the other replica is the
figure, with each node's own time (p50/p99). Everything shares this
machine's two cores.

    .venv/bin/python bench/bench_failover.py [--nodes 200] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, free_port, wait_listening

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshcore.wire.stream import EndpointReport
from meshd.node.enroll import enroll
from meshd.node.session import ControllerSession
from meshd.node.state import StateDir
from tests.pg import Cluster

BIN = Path(sys.executable).parent


class Replica:
    def __init__(self, data: Path) -> None:
        self.data, self.port = data, free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([str(BIN / "mesh-controller"), "serve", "--data", str(self.data), "--listen",
                                      f"127.0.0.1:{self.port}", "--no-stun"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_listening(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


class Node:
    """One node's controller session; ``moved`` is when it first heard from the other replica."""

    def __init__(self, state: StateDir, urls: list[str]) -> None:
        self.version: int | None = None
        self.heard: tuple[str, float] | None = None

        def full(netmap: object) -> None:
            self.version = getattr(netmap, "version", None)
            self._heard()

        def delta(d: object) -> None:
            self.version = getattr(d, "version", self.version)
            self._heard()

        async def report() -> EndpointReport:
            return EndpointReport(listen_port=51820)

        self.session = ControllerSession(state, urls, lambda: self.version, on_full=full, on_delta=delta,
                                         on_policy=lambda _: self._heard(), on_agents=lambda _: self._heard(),
                                         endpoints=report)

    def _heard(self) -> None:
        self.heard = (self.session.url, time.monotonic())


async def measure(replicas: list[Replica], states: list[StateDir], rounds: int) -> dict[str, object]:
    urls = [r.url for r in replicas]
    nodes = [Node(s, urls) for s in states]
    tasks = [asyncio.create_task(n.session.run()) for n in nodes]
    all_moved: list[float] = []
    per_node: list[float] = []
    try:
        await until(lambda: all(n.heard is not None for n in nodes), 60)
        for _ in range(rounds):
            on = {n.session.url for n in nodes}
            assert len(on) == 1, on
            victim = next(r for r in replicas if r.url in on)
            other = next(r for r in replicas if r is not victim)
            killed = time.monotonic()
            victim.kill()
            await until(lambda: all(n.heard is not None and n.heard[0] == other.url and n.heard[1] > killed  # noqa: B023
                                    for n in nodes), 60)
            times = [n.heard[1] - killed for n in nodes if n.heard is not None]
            all_moved.append(max(times))
            per_node += times
            victim.start()
            await asyncio.sleep(1.0)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for n in nodes:
            n.session.close()
    per_node.sort()
    q = statistics.quantiles(per_node, n=100) if len(per_node) > 1 else per_node * 99
    return {"nodes": len(nodes), "rounds": rounds,
            "all_nodes_moved_s": {"median": round(statistics.median(all_moved), 2), "max": round(max(all_moved), 2)},
            "per_node_s": {"p50": round(q[49], 2), "p99": round(q[98], 2)}}


async def until(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        await asyncio.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    print(f"$ {command_line()}", flush=True)
    logging.basicConfig(level=logging.ERROR)  # each node's "trying the next replica" line, times N, is not the figure
    cluster = Cluster(durable=True)
    replicas: list[Replica] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db = cluster.new_database()
            first, second = Replica(Path(tmp) / "ctl-1"), Replica(Path(tmp) / "ctl-2")
            subprocess.run([str(BIN / "mesh-controller"), "init", "--domain", "bench.mesh", "--data", str(first.data),
                            "--url", first.url, "--db", db], check=True, capture_output=True)
            shutil.copy(first.data / "ca.key", Path(tmp) / "ca.key")
            subprocess.run([str(BIN / "mesh-controller"), "join", "--data", str(second.data), "--url", second.url,
                            "--db", db, "--ca-key", str(Path(tmp) / "ca.key")], check=True, capture_output=True)
            replicas = [first, second]
            for r in replicas:
                r.start()
            token = subprocess.run([str(BIN / "meshctl"), "token", "create", "--reusable", "--tag", "bench"],
                                   check=True, capture_output=True, text=True,
                                   env={**os.environ, "IDMESH_ADMIN": str(first.data / "admin.conf")}).stdout.strip()
            states = []
            for i in range(args.nodes):
                state = StateDir(Path(tmp) / "nodes" / f"n{i}")
                enroll(token, state, f"n{i}")
                states.append(state)
            result = asyncio.run(measure(replicas, states, args.rounds))
    finally:
        for r in replicas:
            r.kill()
        cluster.close()
    result["cores"] = os.cpu_count()
    print(json.dumps(result, indent=2 if not args.json else None))


if __name__ == "__main__":
    main()
