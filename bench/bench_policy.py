"""Policy compile time on a synthetic mesh, and the cost of one identity change.

Generates a realistic mesh — principals in groups, people's laptops, tagged
servers, agents with scopes on agent hosts and laptops, services — and a
policy of N acls mixing every selector kind, written out as YAML text so
that loading is measured too. Then measures:

* ``load_policy`` of that text (YAML parse, validation, whole-file checks);
* ``compile_mesh``: every node's filter (targets: < 2 s for 10,000 nodes and
  1,000 rules);
* one identity change: an agent is born, the index is updated
  (``Identities.with_agent``) and one node is recompiled from scratch
  (target: < 10 ms);
* the incremental path: ``identity_delta`` + ``apply_delta`` on one node's
  filter, and ``MeshFilters.identity_delta`` for the whole mesh.

    .venv/bin/python bench/bench_policy.py [--nodes 10000] [--rules 1000] [--agents 5000] [--seed 1] [--gc-freeze]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from meshcore.policy import (
    AgentIdentity,
    Identities,
    NodeIdentity,
    apply_delta,
    compile_mesh,
    compile_node_filter,
    identity_delta,
    load_policy,
)
from meshcore.scopes import parse_scopes

T = TypeVar("T")

RESOURCES = [f"r{i}" for i in range(40)] + ["db", "web", "billing", "deploy", "logs"]
ACTIONS = ["read", "write", "admin", "deploy", "call"]


def address(n: int, slot: int) -> tuple[str, str]:
    """Node n's block: IPv4 /26 from 100.64.0.0/10, IPv6 /64 from a ULA /48; slot 1 is the node."""
    v4 = (100 << 24) | (64 << 16) | (n << 6) | slot
    return (f"{v4 >> 24}.{(v4 >> 16) & 255}.{(v4 >> 8) & 255}.{v4 & 255}", f"fd00:1:2:{n:x}::{slot:x}")


def mesh(rng: random.Random, nodes: int, agents: int) -> tuple[Identities, list[str], list[str], dict[str, list[str]]]:
    principals = [f"p{i}@acme.com" for i in range(max(10, nodes // 5))]
    tags = ["agents", "ci"] + [f"t{i}" for i in range(max(10, nodes // 50))]
    groups = {f"g{i}": sorted(rng.sample(principals, rng.randint(5, 60))) for i in range(100)}
    node_list = []
    for n in range(nodes):
        v4, v6 = address(n, 1)
        if n % 5 < 2:  # 40 % people's devices
            node_list.append(NodeIdentity(name=f"laptop-{n}", owner=rng.choice(principals), ipv4=v4, ipv6=v6))
        else:  # tagged servers; a few tags are popular, most are not
            node_tags = {tags[min(int(rng.paretovariate(1.2)) - 1, len(tags) - 1)] for _ in range(rng.randint(1, 2))}
            node_list.append(NodeIdentity(name=f"srv-{n}", tags=frozenset(node_tags), ipv4=v4, ipv6=v6))
    hosts = [i for i, nd in enumerate(node_list) if "agents" in nd.tags or nd.owner]
    slots: dict[int, int] = {}
    agent_list = []
    for a in range(agents):
        host = rng.choice(hosts)
        slot = slots[host] = slots.get(host, 1) + 1
        if slot > 60:
            continue
        v4, v6 = address(host, slot)
        scopes = {f"{rng.choice(RESOURCES)}:{rng.choice(ACTIONS)}" for _ in range(rng.randint(1, 3))}
        agent_list.append(AgentIdentity(id=f"a{a}", name=rng.choice(["assistant", "coder", "etl", "agent"]),
                                        principal=rng.choice(principals), scopes=parse_scopes(scopes),
                                        node=node_list[host].name, ipv4=v4, ipv6=v6))
    return Identities.build(node_list, agent_list), principals, tags, groups


def policy_text(rng: random.Random, rules: int, principals: list[str], tags: list[str],
                groups: dict[str, list[str]]) -> str:
    services: dict[str, Any] = {}
    for s in range(150):
        spec: dict[str, Any] = {"nodes": [f"tag:{rng.choice(tags[2:])}"], "ports": [rng.randint(1000, 9999)]}
        if s % 10 == 0:
            spec["ports"].append(f"{rng.randint(10000, 20000)}-{rng.randint(20001, 30000)}")
        if s % 25 == 0:
            spec["protocol"] = ["tcp", "udp"]
        services[f"svc{s}"] = spec
    acls: list[dict[str, Any]] = []
    kinds = ["group"] * 30 + ["direct"] * 20 + ["agent-scope"] * 20 + ["tag"] * 10 + ["scope"] * 10 + \
        ["owner"] * 5 + ["group-agent"] * 5
    for _ in range(rules):
        kind = rng.choice(kinds)
        sel: dict[str, Any]
        if kind == "group":
            sel = {"group": rng.choice(sorted(groups))}
        elif kind == "direct":
            sel = {"principal": rng.choice(principals), "via": "direct"}
        elif kind == "agent-scope":
            sel = {"principal": rng.choice(principals), "via": "agent",
                   "scope": f"{rng.choice(RESOURCES)}:{rng.choice(ACTIONS)}"}
        elif kind == "tag":
            sel = {"tag": rng.choice(tags)}
        elif kind == "scope":
            sel = {"scope": f"{rng.choice(RESOURCES)}:*"}
        elif kind == "owner":
            sel = {"owner": rng.choice(principals)}
        else:
            sel = {"group": rng.choice(sorted(groups)), "via": "agent"}
        if rng.random() < 0.6:
            to = sorted(rng.sample(sorted(services), rng.randint(1, 3)))
        else:
            to = sorted({f"tag:{rng.choice(tags[2:])}:{rng.choice([22, 443, 8080, '9000-9100'])}"
                         for _ in range(rng.randint(1, 2))})
            if len({t.rsplit(':', 1)[0] for t in to}) != len(to):
                to = to[:1]
        acls.append({"from": sel, "to": to})
    return yaml.safe_dump({"groups": groups, "services": services, "acls": acls}, sort_keys=False, width=200)


def timed(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def percentiles(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {p50 * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--rules", type=int, default=1_000)
    parser.add_argument("--agents", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="compile_mesh runs; the best is reported")
    parser.add_argument("--changes", type=int, default=400, help="identity changes timed")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="move the loaded state out of the cyclic GC's reach first (gc.freeze), as a "
                             "long-running controller can; shows how much of the tail is GC")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    print(f"command: {' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    ids, principals, tags, groups = mesh(rng, args.nodes, args.agents)
    text = policy_text(rng, args.rules, principals, tags, groups)
    print(f"mesh: {len(ids.nodes)} nodes, {len(ids.agents)} agents, {len(principals)} principals, "
          f"{len(tags)} tags, {len(groups)} groups; policy: {args.rules} acls, 150 services, "
          f"{len(text) // 1024} KiB of YAML")
    index_s, _ = timed(Identities.build, ids.nodes.values(), ids.agents.values())
    print(f"Identities.build (actor index)            {index_s * 1e3:9.1f} ms")

    load_s, policy = timed(load_policy, text, "bench.yaml")
    print(f"load_policy (parse + validate + checks)   {load_s * 1e3:9.1f} ms")

    best = float("inf")
    for _ in range(args.repeat):
        fresh = load_policy(text, "bench.yaml")  # a new object: the plan is rebuilt inside the timing
        seconds, compiled = timed(compile_mesh, fresh, ids)
        best = min(best, seconds)
    rules = sum(len(f.rules) for f in compiled.filters.values())
    elements = sum(len(s.v4) + len(s.v6) for s in compiled.sets.values())
    busiest = max(compiled.filters.values(), key=lambda f: len(f.rules))
    print(f"compile_mesh, all {len(ids.nodes)} nodes             {best * 1e3:9.1f} ms   (target < 2000 ms; "
          f"best of {args.repeat})")
    print(f"  -> {rules} node rules, {len(compiled.sets)} distinct source sets, {elements} set elements; "
          f"busiest node {busiest.node}: {len(busiest.rules)} rules, {len(busiest.sets)} sets")
    hashes_s, _ = timed(lambda: [f.rules_hash for f in compiled.filters.values()])
    print(f"rules_hash of every node                  {hashes_s * 1e3:9.1f} ms")

    if args.gc_freeze:
        gc.collect()
        gc.freeze()

    # One identity change: an agent is born on an agent host; every other
    # change recompiles the busiest node, the others a random node.
    host = next(n for n in ids.nodes.values() if "agents" in n.tags)
    change, index, recompile, incremental, mesh_delta = [], [], [], [], []
    node_names = sorted(ids.nodes)
    for k in range(args.changes):
        v4, v6 = address(len(ids.nodes) + 1 + k // 60, 2 + k % 60)
        born = AgentIdentity(id=f"new{k}", name="assistant", principal=rng.choice(principals),
                             scopes=parse_scopes([f"{rng.choice(RESOURCES)}:read"]), node=host.name,
                             ipv4=v4, ipv6=v6)
        target = busiest.node if k % 2 == 0 else rng.choice(node_names)
        t_index, after = timed(ids.with_agent, born)
        t_node, _ = timed(compile_node_filter, policy, after, target)
        change.append(t_index + t_node)
        index.append(t_index)
        recompile.append(t_node)
        actor = after.actor_of(born)
        node_filter = compiled.filters[target]
        start = time.perf_counter()
        apply_delta(node_filter, identity_delta(node_filter, actor, "add"))
        incremental.append(time.perf_counter() - start)
        t_mesh, _ = timed(compiled.identity_delta, actor, "add")
        mesh_delta.append(t_mesh)
    print(f"one agent born, {args.changes} times{' (gc frozen)' if args.gc_freeze else ''}:")
    print(f"  index update + recompile one node  {percentiles(change)}   (target < 10 ms)")
    print(f"    Identities.with_agent            {percentiles(index)}")
    print(f"    compile_node_filter              {percentiles(recompile)}")
    print(f"  incremental, one node              {percentiles(incremental)}   (identity_delta + apply_delta)")
    print(f"  incremental, whole mesh            {percentiles(mesh_delta)}   (MeshFilters.identity_delta)")

if __name__ == "__main__":
    main()
