"""Golden policy files: a policy, the mesh's identities, and every node's expected filter.

Each file in tests/golden/policy/ is one scenario (one regression, one
feature). Format::

    policy: |            # the policy file, as a user writes it
      ...
    nodes:               # addresses are assigned from the position unless given
      - {name: db-1, tags: [db], serves: [8080]}   # serves: TCP ports meshd serves (meshctl serve)
    agents:              # authorized: grant | delegation (the default), as the certificate says
      - {id: a1, name: reader, principal: nikita@acme.com, scopes: ["db:read"], node: agents-1}
    expected:            # every node; a rule per (source set, protocol, destination)
      db-1:
        - {from: '{principal: ...}', protocol: tcp, ports: "5432", members: [agent:a1]}
        - {from: ..., protocol: tcp, ports: "9000", members: [...], to: [agent:a3]}   # to the node's agents
    requests:            # optional: agent births the delegations decide (check_delegation)
      - {principal: nikita@acme.com, node: agents-1, scopes: ["db:write"], ttl: 15m, expect: grant}

A request's ``expect`` is ``allow`` (the node's word is enough), ``grant``
(refused without a verified grant, for that reason alone, and allowed with
one) or ``deny`` (refused either way).

Members are named by identity (``node:NAME``/``agent:ID``) rather than by
address, so the files read as policy, not as numbers. On a mismatch the
test prints the actual ``expected:`` section, ready to paste after review.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshcore.durations import parse_duration
from meshcore.errors import PermissionDenied
from meshcore.policy import (
    AgentIdentity,
    Identities,
    NodeFilter,
    NodeIdentity,
    Policy,
    check_delegation,
    compile_mesh,
    compile_node_filter,
    load_policy,
    run_tests,
)
from meshcore.scopes import parse_scopes

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "policy"
FILES = sorted(GOLDEN.glob("*.yaml"))


def _identities(doc: dict[str, Any]) -> Identities:
    nodes = []
    slots: dict[str, int] = {}
    blocks: dict[str, int] = {}
    for i, spec in enumerate(doc.get("nodes") or ()):
        blocks[spec["name"]] = i
        nodes.append(NodeIdentity(
            name=spec["name"],
            owner=spec.get("owner"),
            tags=frozenset(spec.get("tags", ())),
            ipv4=spec.get("ipv4", f"100.64.{i}.1"),
            ipv6=spec.get("ipv6", f"fd00:0:0:{i:x}::1"),
        ))
    agents = []
    for spec in doc.get("agents") or ():
        block = blocks[spec["node"]]
        slot = slots[spec["node"]] = slots.get(spec["node"], 1) + 1
        agents.append(AgentIdentity(
            id=spec["id"],
            name=spec.get("name", spec["id"]),
            principal=spec["principal"],
            scopes=parse_scopes(spec["scopes"]),
            node=spec["node"],
            parent=spec.get("parent"),
            ipv4=spec.get("ipv4", f"100.64.{block}.{slot}"),
            ipv6=spec.get("ipv6", f"fd00:0:0:{block:x}::{slot:x}"),
            authorized=spec.get("authorized", "delegation"),
        ))
    return Identities.build(nodes, agents)


def _render(node_filter: NodeFilter, identities: Identities) -> list[dict[str, Any]]:
    """A filter as the golden files write it; checks that each set's two families agree."""
    by_v4 = {a.ipv4: key for key, a in identities.actors.items()}
    by_v6 = {a.ipv6: key for key, a in identities.actors.items()}
    out = []
    for rule in node_filter.rules:
        members = node_filter.sets[rule.source]
        keys = sorted(by_v4[a] for a in members.v4)
        assert keys == sorted(by_v6[a] for a in members.v6), f"IPv4 and IPv6 halves of {rule.source} differ"
        entry: dict[str, Any] = {"from": node_filter.sources[rule.source].text, "protocol": rule.protocol}
        if rule.ports:
            entry["ports"] = ",".join(str(p) for p in rule.ports)
        entry["members"] = keys
        if rule.to is not None:  # a rule to this node's agents (agents as servers): which of them
            entry["to"] = sorted(by_v4[a] for a in node_filter.sets[rule.to].v4)
        out.append(entry)
    return sorted(out, key=lambda e: (e["from"], e["protocol"], e.get("to", [])))


def _normalise(expected: Any) -> list[dict[str, Any]]:
    out = []
    for entry in expected or ():
        entry = dict(entry)
        if "ports" in entry:
            entry["ports"] = str(entry["ports"])
        entry["members"] = sorted(entry.get("members") or ())
        if "to" in entry:
            entry["to"] = sorted(entry["to"] or ())
        out.append(entry)
    return sorted(out, key=lambda e: (e["from"], e["protocol"], e.get("to", [])))


def test_golden_directory_holds_scenarios() -> None:
    assert len(FILES) >= 5, f"expected golden policy files in {GOLDEN}"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_file_compiles_to_its_expected_filters(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert set(doc) <= {"policy", "nodes", "agents", "expected", "requests"}, f"{path.name}: unknown sections"
    policy = load_policy(doc["policy"], f"{path.name}#policy")
    failures = run_tests(policy)
    assert not failures, "\n".join(str(f) for f in failures)

    identities = _identities(doc)
    served = {spec["name"]: frozenset(spec.get("serves") or ()) for spec in doc.get("nodes") or ()}
    mesh = compile_mesh(policy, identities, served)
    expected = doc.get("expected") or {}
    assert sorted(expected) == sorted(identities.nodes), f"{path.name}: expected must list every node"

    actual = {name: _render(mesh.filters[name], identities) for name in identities.nodes}
    wanted = {name: _normalise(expected[name]) for name in identities.nodes}
    if actual != wanted:
        shown = yaml.safe_dump({"expected": actual}, sort_keys=False, width=200, default_flow_style=None)
        pytest.fail(f"{path.name}: compiled filters differ from the file; actual:\n{shown}")

    for name in identities.nodes:
        assert compile_node_filter(policy, identities, name, served.get(name, frozenset())) == mesh.filters[name], name

    for request in doc.get("requests") or ():
        assert _verdict(policy, identities, request) == request["expect"], f"{path.name}: {request}"


def _verdict(policy: Policy, identities: Identities, request: dict[str, Any]) -> str:
    """``allow``, ``grant`` or ``deny`` for one agent birth (see the module docstring)."""
    args = (policy, request["principal"], identities.node(request["node"]), parse_scopes(request["scopes"]),
            parse_duration(request["ttl"]))
    try:
        check_delegation(*args)
        return "allow"
    except PermissionDenied as refused:
        without = str(refused)
    try:
        check_delegation(*args, granted=True)
    except PermissionDenied as refused:
        assert str(refused) == without, "a grant must not change a refusal for another reason"
        return "deny"
    assert f"a grant from {request['principal']}" in without, without
    return "grant"
