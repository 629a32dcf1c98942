"""Targeted distribution of agent identities, simulated in one process: no kernel, no network.

A mesh of N nodes (people's laptops, servers tagged per team, a few shared
tags), a policy of a few dozen rules (per-team groups and tags, a few
principals, some wide rules: sre to every server, an agents-as-servers
destination on every node, identity routes via exit nodes and billing
gateways), and one subscriber per node: a plain ``deque`` standing for the
node's stream. Then A agent identities are born over simulated time (a
Poisson stream of births, each living 1-5 simulated minutes, so only a
fraction is live at once); each birth and each death goes through
:class:`meshcore.policy.audience.LiveAgents` (where it must go) and
:func:`deliver` (one message put on each of those subscribers' queues).

Reported:

* births/s sustained by the audience computation + queueing (deaths are
  handled in the same loop and counted in its time), next to the same with
  every birth broadcast to every subscriber (on a sample);
* deliveries per birth and per death, targeted vs broadcast (N);
* the audience call itself: ``nodes_for``/``reach``, memo hit and miss, in µs;
* fan-out of one change to every subscriber: asyncio (uvloop) queues with a
  reader task each; the time from the first put until the last reader has
  taken it, p50/p99 over the changes, and p99 of single arrivals;
* memory per live agent of the controller's index (``LiveAgents``: the
  record, its group and node index entries — no certificate), by tracemalloc;
* the cost of building an :class:`Audience` (a new policy) and of
  ``LiveAgents.rebase`` and ``of_node`` (a policy change, a stream opening)
  at the peak number of live agents.

The simulated readers drain their queues every ``--drain`` events; that
time is reported apart. :func:`deliver` is the one place to point at the
real hub.

    .venv/bin/python bench/bench_distribution.py [--nodes 10000] [--agents 1000000] [--rate 200] [--seed 1]
        [--changes 50] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import json
import math
import random
import statistics
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop
import yaml
from common import command_line

from controller.netmap import NetmapHub, Outgoing, Subscription
from meshcore.policy import Policy, load_policy
from meshcore.policy.audience import Audience, AudienceNode, LiveAgents, Reach
from meshcore.wire.stream import AgentUpdate, PeerNode, PolicyDoc, StreamMessage

TEAMS = 15
SCOPES = ["db:read", "db:read", "db:write", "web:read", "web:deploy", "logs:write", "billing:read", "task:call",
          "task:serve", "model:run", "docs:read", "docs:read"]
LIFETIME = (60.0, 300.0)
"""Simulated seconds an agent lives: uniform in this range."""


# -- the delivery loop: the one place to point at the real hub ---------------------------------------------

def deliver(subscribers: Mapping[str, deque[object]], reach: Reach, message: object) -> int:
    """Put ``message`` on the queue of every subscriber ``reach`` names; returns how many."""
    targets = reach.pick(subscribers)
    for queue in targets:
        queue.append(message)
    return len(targets)


# -- the mesh and the policy -----------------------------------------------------------------------------

@dataclass
class Mesh:
    nodes: list[AudienceNode]
    principals: list[str]
    team_of: dict[str, int]
    hosts: dict[int, list[str]]  # team -> its agent hosts
    shared_hosts: list[str]
    laptops_of: dict[str, list[str]]
    policy_text: str


def build_mesh(rng: random.Random, count: int) -> Mesh:
    principals = [f"p{i}@acme.com" for i in range(max(TEAMS * 4, count // 7))]
    team_of = {p: i % TEAMS for i, p in enumerate(principals)}
    sre = principals[1:21]
    globals_ = [("monitoring", 20), ("logging", 10), ("exit", 4), ("billing-gw", 4), ("gpu", 50), ("docs", 3),
                ("agents", 500), ("ci", 200)]
    roles = [tag for tag, wanted in globals_ for _ in range(max(1, wanted * count // 10_000))]  # at 10,000 nodes
    nodes: list[AudienceNode] = []
    laptops_of: dict[str, list[str]] = {}
    hosts: dict[int, list[str]] = {t: [] for t in range(TEAMS)}
    shared_hosts: list[str] = []
    servers = 0
    for n in range(count):
        if n % 5 < 2:  # 40 %: a person's device
            owner = rng.choice(principals)
            name = f"laptop-{n}"
            nodes.append(AudienceNode(name, owner=owner))
            laptops_of.setdefault(owner, []).append(name)
            continue
        tags = {"server"}
        if servers < len(roles):  # the first servers carry the shared roles
            tags.add(roles[servers])
        else:
            tags.add(f"t{rng.randrange(TEAMS)}-{rng.choice(['db', 'web', 'agents', 'agents'])}")
        servers += 1
        name = f"srv-{n}"
        nodes.append(AudienceNode(name, tags=frozenset(tags)))
        for tag in tags:
            if tag == "agents":
                shared_hosts.append(name)
            elif tag.endswith("-agents"):
                hosts[int(tag[1:].split("-")[0])].append(name)
    groups = {f"team{t}": [p for p in principals if team_of[p] == t] for t in range(TEAMS)}
    groups["sre"] = sre
    acls: list[dict[str, Any]] = []
    for t in range(TEAMS):
        acls += [
            {"from": {"group": f"team{t}", "via": "agent", "scope": "db:read"}, "to": [f"tag:t{t}-db:5432"]},
            {"from": {"group": f"team{t}", "via": "agent", "scope": "web:*"}, "to": [f"tag:t{t}-web:443"]},
            {"from": {"group": f"team{t}", "via": "direct"}, "to": [f"tag:t{t}-db:22", f"tag:t{t}-web:22"]},
        ]
    acls += [
        {"from": {"group": "sre"}, "to": ["tag:server:22", "tag:monitoring:9100"]},  # wide: every server
        {"from": {"via": "agent", "scope": "logs:write"}, "to": ["logging"]},
        {"from": {"via": "agent", "scope": "docs:read"}, "to": ["tag:docs:443"]},
        {"from": {"scope": "billing:*"}, "to": ["tag:billing-gw:8443"]},
        {"from": {"principal": principals[0], "scope": "task:call"},  # agents as servers: on every node
         "to": [f'{{principal: {principals[0]}, scope: "task:serve"}}:9000']},
        {"from": {"group": "team0", "via": "agent", "scope": "model:*"}, "to": ['{tag: gpu, scope: "model:run"}:8000']},
        {"from": {"tag": "ci", "via": "agent"}, "to": ["tag:t0-web:443"]},
        {"from": {"principal": principals[2], "via": "agent"}, "to": ["tag:t1-db:5432"]},
    ]
    routes = [
        {"from": {"group": "sre", "via": "agent"}, "to": "0.0.0.0/0", "via": "tag:exit"},
        {"from": {"scope": "billing:*"}, "to": "10.20.0.0/16", "via": "tag:billing-gw"},
    ]
    text = yaml.safe_dump({"groups": groups, "services": {"logging": {"nodes": ["tag:logging"], "ports": [514],
                                                                       "protocol": ["udp"]}},
                           "acls": acls, "routes": routes}, sort_keys=False, width=200)
    return Mesh(nodes, principals, team_of, hosts, shared_hosts, laptops_of, text)


@dataclass
class Birth:
    id: str
    principal: str
    scopes: tuple[str, ...]
    node: str
    lifetime: float


def births(rng: random.Random, mesh: Mesh, start: int, count: int) -> list[Birth]:
    out = []
    for i in range(start, start + count):
        principal = rng.choice(mesh.principals)
        where = rng.random()
        own = mesh.laptops_of.get(principal)
        if where < 0.1 and own:
            node = rng.choice(own)
        elif where < 0.3 or not mesh.hosts[mesh.team_of[principal]]:
            node = rng.choice(mesh.shared_hosts)
        else:
            node = rng.choice(mesh.hosts[mesh.team_of[principal]])
        scopes = tuple(sorted({rng.choice(SCOPES) for _ in range(rng.randint(1, 2))}))
        out.append(Birth(f"a{i}", principal, scopes, node, rng.uniform(*LIFETIME)))
    return out


# -- figures ---------------------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class CountingHub(NetmapHub):
    """The controller's real hub, counting the queue puts its fan-out makes."""

    puts = 0

    def _to_subs(self, subs: Iterable[Subscription], message: Outgoing) -> None:
        subs = list(subs)
        self.puts += len(subs)
        super()._to_subs(subs, message)


def real_hub(mesh: Mesh, policy_text: str) -> tuple[CountingHub, list[Subscription]]:
    """A NetmapHub with every node of ``mesh`` in its map, the policy in force, one subscriber per node."""
    nodes = {n.name: PeerNode(name=n.name, wireguard_public_key=f"{i:043d}=", addresses=("100.64.0.1", "fd00::1"),
                              blocks=("100.64.0.0/26", "fd00::/64"), owner=n.owner, tags=tuple(sorted(n.tags)))
             for i, n in enumerate(mesh.nodes)}
    hub = CountingHub("bench.mesh", ("100.64.0.0/10", "fd00::/48"), 0, nodes)
    hub.publish_policy(PolicyDoc(version=1, hash="0" * 64, filename="bench.yaml", text=policy_text))
    return hub, [hub.subscribe(n.name) for n in mesh.nodes]


def simulate_hub(mesh: Mesh, args: argparse.Namespace) -> dict[str, Any]:
    """The same births and deaths as :func:`simulate`, through the controller's own hub: each is the change
    log's agents line applied by ``NetmapHub.apply`` (the index, the audience, the queue puts)."""
    rng = random.Random(args.seed + 1)
    hub, subs = real_hub(mesh, mesh.policy_text)
    line = Outgoing.of(StreamMessage(type="agents", agents=AgentUpdate())).line.decode()
    deaths: list[tuple[float, str]] = []
    now, seq, events, busy, drain = 0.0, hub.applied, 0, 0.0, 0.0
    per_birth: list[float] = []
    for start in range(0, args.agents, 50_000):
        batch = births(rng, mesh, start, min(50_000, args.agents - start))
        begin = time.perf_counter()
        for born in batch:
            now += rng.expovariate(args.rate)
            ended = []
            while deaths and deaths[0][0] <= now:
                ended.append(heapq.heappop(deaths)[1])
            if ended:
                seq += 1
                hub.apply(seq, "agents", None, line, json.dumps({"born": [], "ended": ended}))
            facts = {"id": born.id, "principal": born.principal, "scopes": list(born.scopes), "node": born.node,
                     "name": "a", "authorized": "delegation", "not_after": "2099-01-01T00:00:00.000000Z"}
            puts = hub.puts
            seq += 1
            hub.apply(seq, "agents", None, line, json.dumps({"born": [facts], "ended": []}))
            per_birth.append(hub.puts - puts)
            heapq.heappush(deaths, (now + born.lifetime, born.id))
            events += 1
            if events % args.drain == 0:
                busy += time.perf_counter() - begin
                t = time.perf_counter()
                for sub in subs:
                    while not sub.queue.empty():
                        sub.queue.get_nowait()
                    sub.resync = False
                drain += time.perf_counter() - t
                begin = time.perf_counter()
        busy += time.perf_counter() - begin
    return {"births_s": args.agents / busy, "busy_s": busy, "drain_s": drain,
            "deliveries_per_birth_mean": statistics.fmean(per_birth), "deliveries_per_birth_p99": pct(per_birth, 99),
            "live_at_end": len(hub.live)}


def hub_memory(mesh: Mesh, count: int, seed: int) -> dict[str, float]:
    """Bytes the controller's hub holds per node (its map entry, audience entry, a subscriber) and per live
    agent (index, audience signature, expiry entry), by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    hub, subs = real_hub(mesh, mesh.policy_text)
    per_node = (tracemalloc.get_traced_memory()[0] - before) / len(mesh.nodes)
    line = Outgoing.of(StreamMessage(type="agents", agents=AgentUpdate())).line.decode()
    sample = births(random.Random(seed + 5), mesh, 0, count)
    for i, born in enumerate(sample[: count // 10]):  # warm the audience's memo (per policy, not per agent)
        hub.apply(hub.applied + 1, "agents", None, line, json.dumps({"born": [{
            "id": f"w{i}", "principal": born.principal, "scopes": list(born.scopes), "node": born.node,
            "name": "a", "authorized": "delegation", "not_after": "2099-01-01T00:00:00.000000Z"}], "ended": []}))
    for sub in subs:
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.resync = False
    before = tracemalloc.get_traced_memory()[0]
    for born in sample:
        hub.apply(hub.applied + 1, "agents", None, line, json.dumps({"born": [{
            "id": born.id, "principal": born.principal, "scopes": list(born.scopes), "node": born.node,
            "name": "a", "authorized": "delegation", "not_after": "2099-01-01T00:00:00.000000Z"}], "ended": []}))
        if hub.applied % 1000 == 0:
            for sub in subs:  # (the queued lines are the streams', not the index's: drained as readers would)
                while not sub.queue.empty():
                    sub.queue.get_nowait()
    for sub in subs:
        while not sub.queue.empty():
            sub.queue.get_nowait()
    per_agent = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    return {"bytes_per_node": per_node, "bytes_per_live_agent": per_agent, "agents": count}


def simulate(mesh: Mesh, audience: Audience, args: argparse.Namespace) -> dict[str, Any]:
    """Births and deaths in simulated time order through LiveAgents and deliver()."""
    rng = random.Random(args.seed + 1)
    subscribers: dict[str, deque[object]] = {n.name: deque() for n in mesh.nodes}
    live = LiveAgents(audience)
    deaths: list[tuple[float, str]] = []
    now = 0.0
    per_birth: list[int] = []
    per_death: list[int] = []
    busy = drain = deciding = 0.0
    clock = time.perf_counter
    peak = events = 0
    chunk = 50_000
    for start in range(0, args.agents, chunk):
        batch = births(rng, mesh, start, min(chunk, args.agents - start))
        times = []
        for _ in batch:
            now += rng.expovariate(args.rate)
            times.append(now)
        begin = time.perf_counter()
        for born, at in zip(batch, times, strict=True):
            while deaths and deaths[0][0] <= at:
                _, gone = heapq.heappop(deaths)
                t = clock()
                reach = live.remove(gone)
                deciding += clock() - t
                assert reach is not None
                per_death.append(deliver(subscribers, reach, ("revoked", gone)))
            t = clock()
            reach = live.add(born.id, born.principal, born.scopes, born.node)
            deciding += clock() - t
            per_birth.append(deliver(subscribers, reach, ("born", born.id)))
            heapq.heappush(deaths, (at + born.lifetime, born.id))
            events += 1
            if events % args.drain == 0:
                busy += time.perf_counter() - begin
                peak = max(peak, len(live))
                t = time.perf_counter()
                for queue in subscribers.values():  # the readers take what is queued
                    queue.clear()
                drain += time.perf_counter() - t
                begin = time.perf_counter()
        busy += time.perf_counter() - begin
        peak = max(peak, len(live))
    return {"live": live, "subscribers": subscribers, "births": args.agents, "deaths": len(per_death),
            "simulated_s": now, "busy_s": busy, "drain_s": drain, "audience_s": deciding, "peak_live": peak,
            "per_birth": per_birth, "per_death": per_death}


def broadcast_sample(mesh: Mesh, args: argparse.Namespace) -> float:
    """Births/s when each goes to every subscriber (the way it is today), on a sample."""
    subscribers: dict[str, deque[object]] = {n.name: deque() for n in mesh.nodes}
    sample = births(random.Random(args.seed + 2), mesh, 0, args.broadcast)
    begin = time.perf_counter()
    for born in sample:
        deliver(subscribers, Reach(born.node, None), ("born", born.id))
    spent = time.perf_counter() - begin
    return len(sample) / spent


def call_costs(mesh: Mesh, policy: Policy, sample: list[Birth]) -> dict[str, float]:
    """µs per call on a fresh audience: a signature's first call (a miss: the indexed rules are matched),
    apart when it also resolved a target never seen (a set of node names built once per target and node
    change); then every signature again (memo hits)."""
    audience = Audience(policy, mesh.nodes)
    miss: list[float] = []
    resolving: list[float] = []
    seen = 0
    for born in sample:
        before = len(audience._memo), len(audience._resolved)
        t = time.perf_counter()
        audience.nodes_for(born.principal, born.scopes, born.node)
        spent = time.perf_counter() - t
        if len(audience._resolved) != before[1]:
            resolving.append(spent)
        elif len(audience._memo) != before[0]:
            miss.append(spent)
        else:
            seen += 1
    hit: list[float] = []
    hit_reach: list[float] = []
    for born in sample:
        t = time.perf_counter()
        audience.nodes_for(born.principal, born.scopes, born.node)
        hit.append(time.perf_counter() - t)
        t = time.perf_counter()
        audience.reach(born.principal, born.scopes, born.node)
        hit_reach.append(time.perf_counter() - t)
    return {"calls": len(sample), "signatures": len(miss) + len(resolving), "targets": len(resolving),
            "miss_p50_us": statistics.median(miss) * 1e6, "miss_p99_us": pct(miss, 99) * 1e6,
            "new_target_p50_us": statistics.median(resolving) * 1e6, "new_target_max_us": max(resolving) * 1e6,
            "nodes_for_p50_us": statistics.median(hit) * 1e6, "nodes_for_p99_us": pct(hit, 99) * 1e6,
            "reach_p50_us": statistics.median(hit_reach) * 1e6, "reach_p99_us": pct(hit_reach, 99) * 1e6}


def memory_per_agent(mesh: Mesh, policy: Policy, count: int, seed: int) -> dict[str, float]:
    """Bytes per live agent of a LiveAgents index holding ``count`` agents (tracemalloc)."""
    sample = births(random.Random(seed + 3), mesh, 0, count)
    audience = Audience(policy, mesh.nodes)
    warm = LiveAgents(audience)  # resolved sets and the memo are per audience, not per agent: warm them apart
    for born in sample:
        warm.add(born.id, born.principal, born.scopes, born.node)
    del warm
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    live = LiveAgents(audience)
    for born in sample:
        live.add(born.id, born.principal, born.scopes, born.node)
    index = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {"agents": count, "groups": live.groups, "index_bytes_per_agent": index / count}


async def fan_out(mesh: Mesh, changes: int) -> dict[str, float]:
    """One message to every subscriber's asyncio.Queue, a reader task each: first put to last take."""
    queues: list[asyncio.Queue[tuple[int, float]]] = [asyncio.Queue() for _ in mesh.nodes]
    arrivals: list[float] = []
    alls: list[float] = []
    state = {"left": 0}
    done: asyncio.Future[None] | None = None

    async def reader(queue: asyncio.Queue[tuple[int, float]]) -> None:
        while True:
            _, sent = await queue.get()
            arrivals.append(time.perf_counter() - sent)
            state["left"] -= 1
            if state["left"] == 0 and done is not None:
                done.set_result(None)

    async with asyncio.TaskGroup() as tasks:
        readers = [tasks.create_task(reader(q)) for q in queues]
        await asyncio.sleep(0)
        gc.collect()
        gc.freeze()  # the queues and tasks live as long as the streams: keep the collector off them
        loop = asyncio.get_running_loop()
        for change in range(changes):
            done = loop.create_future()
            state["left"] = len(queues)
            sent = time.perf_counter()
            message = (change, sent)
            for queue in queues:
                queue.put_nowait(message)
            await done
            alls.append(time.perf_counter() - sent)
        for task in readers:
            task.cancel()
    gc.unfreeze()
    return {"subscribers": len(queues), "changes": changes, "all_p50_ms": statistics.median(alls) * 1e3,
            "all_p99_ms": pct(alls, 99) * 1e3, "arrival_p99_ms": pct(arrivals, 99) * 1e3}


def policy_change(mesh: Mesh, live: LiveAgents) -> dict[str, float]:
    """A new policy (one more rule): build its audience, rebase the live agents; then a stream opening."""
    text = mesh.policy_text.replace("acls:\n", "acls:\n- from: {group: team3, via: agent, scope: 'db:write'}\n"
                                    "  to: ['tag:t3-db:5433']\n", 1)
    t = time.perf_counter()
    policy = load_policy(text, "changed.yaml")
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    audience = Audience(policy, mesh.nodes)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    resend = live.rebase(audience)
    rebase_s = time.perf_counter() - t
    node = mesh.hosts[3][0] if mesh.hosts[3] else mesh.nodes[0].name
    t = time.perf_counter()
    wanted = live.of_node(node)
    of_node_s = time.perf_counter() - t
    t = time.perf_counter()
    audience.add_node(AudienceNode("new-node", tags=frozenset({"t3-db", "server"})))
    add_node_s = time.perf_counter() - t
    return {"load_policy_ms": load_s * 1e3, "audience_build_ms": build_s * 1e3, "rebase_ms": rebase_s * 1e3,
            "rebase_resends": sum(len(r.agents) for r in resend), "live": len(live), "groups": live.groups,
            "of_node_ms": of_node_s * 1e3, "of_node_agents": len(wanted), "add_node_us": add_node_s * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=1_000_000, help="agent identities born in all")
    parser.add_argument("--rate", type=float, default=200.0, help="births per simulated second")
    parser.add_argument("--drain", type=int, default=10_000, help="events between two drains of every queue")
    parser.add_argument("--broadcast", type=int, default=1_000, help="births in the broadcast sample")
    parser.add_argument("--hub-agents", type=int, default=200_000,
                        help="births also run through the controller's real hub (NetmapHub.apply)")
    parser.add_argument("--changes", type=int, default=50, help="fan-out changes timed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    say: Callable[[str], None] = (lambda _: None) if args.json else (lambda s: print(s, flush=True))
    say(f"$ {command_line()}")

    mesh = build_mesh(random.Random(args.seed), args.nodes)
    t = time.perf_counter()
    policy = load_policy(mesh.policy_text, "bench.yaml")
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    audience = Audience(policy, mesh.nodes)
    build_s = time.perf_counter() - t
    say(f"mesh: {len(mesh.nodes)} nodes, {len(mesh.principals)} principals in {TEAMS} teams; policy: "
        f"{len(policy.acls)} acls, {len(policy.routes)} routes (load {load_s * 1e3:.0f} ms); "
        f"Audience built in {build_s * 1e3:.1f} ms")

    costs = call_costs(mesh, policy, births(random.Random(args.seed + 4), mesh, 0, 20_000))
    say(f"audience call (µs), {costs['calls']:.0f} births of {costs['signatures']:.0f} signatures, "
        f"{costs['targets']:.0f} targets (target: well under 50 µs):")
    say(f"  signature's first call   p50 {costs['miss_p50_us']:6.1f}  p99 {costs['miss_p99_us']:6.1f}   "
        f"(+ a new target's node set: p50 {costs['new_target_p50_us']:.1f}, max {costs['new_target_max_us']:.0f},"
        f" once per target)")
    say(f"  again (memo hit)         nodes_for p50 {costs['nodes_for_p50_us']:5.1f}  p99 "
        f"{costs['nodes_for_p99_us']:5.1f}   reach (no copy) p50 {costs['reach_p50_us']:5.1f}  "
        f"p99 {costs['reach_p99_us']:5.1f}")

    gc.freeze()  # the mesh, the policy and the audience are long-lived: keep the collector off them
    sim = simulate(mesh, audience, args)
    births_s = sim["births"] / sim["busy_s"]
    per_birth, per_death = sim["per_birth"], sim["per_death"]
    mean_birth = statistics.fmean(per_birth)
    say(f"simulated {sim['simulated_s'] / 3600:.2f} h: {sim['births']} births, {sim['deaths']} deaths, "
        f"peak {sim['peak_live']} live agents; {sim['live'].groups} target groups at the end")
    say(f"births/s sustained         {births_s:10.0f}   (audience + queueing, deaths included; "
        f"{sim['busy_s']:.1f} s busy, readers' drains {sim['drain_s']:.1f} s apart)")
    say(f"  of which LiveAgents      {sim['audience_s']:.1f} s: {sim['audience_s'] / (sim['births'] + sim['deaths']) * 1e6:.1f}"
        f" µs per birth or death (add/remove); the rest is deliver() and the simulation's heap of deaths")
    hub_agents = min(args.agents, args.hub_agents)
    real = simulate_hub(mesh, argparse.Namespace(**{**vars(args), "agents": hub_agents}))
    say(f"through the controller's hub  {real['births_s']:10.0f} births/s   ({hub_agents} births and their deaths as "
        f"change-log lines through NetmapHub.apply: index, audience, queue puts; deliveries per birth mean "
        f"{real['deliveries_per_birth_mean']:.1f}, p99 {real['deliveries_per_birth_p99']:.0f})")
    held = hub_memory(mesh, 50_000, args.seed)
    say(f"controller hub memory          {held['bytes_per_node']:.0f} B per node (map, audience, a subscriber), "
        f"{held['bytes_per_live_agent']:.0f} B per live agent (index, expiry; no certificate), tracemalloc, "
        f"{held['agents']} agents")
    bcast = broadcast_sample(mesh, args)
    say(f"births/s broadcast         {bcast:10.0f}   (every birth to all {len(mesh.nodes)} subscribers, "
        f"{args.broadcast} births)")
    say(f"deliveries per birth       mean {mean_birth:8.1f}  p50 {pct(per_birth, 50):6.0f}  p99 "
        f"{pct(per_birth, 99):6.0f}  max {max(per_birth)}   vs broadcast {len(mesh.nodes)} "
        f"({len(mesh.nodes) / mean_birth:.0f}x fewer)")
    if per_death:
        say(f"deliveries per death       mean {statistics.fmean(per_death):8.1f}  p50 {pct(per_death, 50):6.0f}"
            f"  p99 {pct(per_death, 99):6.0f}")
    everyone = sum(1 for d in per_birth if d >= len(mesh.nodes))
    say(f"births sent to every node  {everyone} ({everyone / len(per_birth):.2%})")

    gc.collect()  # what the simulation left for the collector is not the policy change's cost
    change = policy_change(mesh, sim["live"])
    say(f"policy change              load {change['load_policy_ms']:.0f} ms, Audience {change['audience_build_ms']:.1f}"
        f" ms, rebase of {change['live']} live agents {change['rebase_ms']:.0f} ms "
        f"({change['rebase_resends']} agents to resend)")
    say(f"stream opening (of_node)   {change['of_node_ms']:.2f} ms for {change['of_node_agents']} agents, "
        f"{change['groups']} groups;  add_node {change['add_node_us']:.0f} µs")
    del sim["live"], sim["subscribers"]
    gc.unfreeze()
    gc.collect()

    memory = memory_per_agent(mesh, policy, max(1, sim["peak_live"]), args.seed)
    say(f"memory per live agent      {memory['index_bytes_per_agent']:.0f} bytes "
        f"(LiveAgents index, {memory['agents']} agents, {memory['groups']} groups; tracemalloc; no certificate)")

    fan = uvloop.run(fan_out(mesh, args.changes))
    say(f"fan-out to {fan['subscribers']:.0f} subscribers   all drained p50 {fan['all_p50_ms']:.1f} ms  p99 "
        f"{fan['all_p99_ms']:.1f} ms   single arrival p99 {fan['arrival_p99_ms']:.1f} ms  "
        f"({args.changes} changes, asyncio.Queue + one reader task each, uvloop)")

    if args.json:
        print(json.dumps({
            "command": command_line(), "nodes": len(mesh.nodes), "acls": len(policy.acls),
            "routes": len(policy.routes), "audience_build_ms": build_s * 1e3, "call": costs,
            "births": sim["births"], "deaths": sim["deaths"], "simulated_s": sim["simulated_s"],
            "peak_live": sim["peak_live"], "births_per_s": births_s, "broadcast_births_per_s": bcast,
            "busy_s": sim["busy_s"], "drain_s": sim["drain_s"], "live_agents_s": sim["audience_s"],
            "deliveries_per_birth": {"mean": mean_birth, "p50": pct(per_birth, 50), "p99": pct(per_birth, 99),
                                     "max": max(per_birth), "broadcast": len(mesh.nodes)},
            "deliveries_per_death_mean": statistics.fmean(per_death) if per_death else 0.0,
            "births_to_every_node": everyone, "policy_change": change, "memory": memory, "fan_out": fan,
            "through_the_hub": real, "hub_memory": held,
        }, indent=2))


if __name__ == "__main__":
    main()
