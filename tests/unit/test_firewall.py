"""Rendering the node's filter as nftables: the whole table for a policy
change, set elements only for an identity change."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from meshcore.policy import AgentIdentity, Identities, NodeIdentity, compile_node_filter, load_policy
from meshcore.scopes import parse_scopes
from meshd.mesh.firewall import element_changes, render_element_changes, render_table

POLICY = load_policy("""\
services:
  db: {nodes: [tag:db], ports: [5432, 8000-8100]}
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: [db]
  - from: {tag: monitoring}
    to: ["tag:db"]
    protocol: icmp
""", "p.yaml")
DB = NodeIdentity(name="db", tags=frozenset({"db"}), ipv4="100.64.0.1", ipv6="fd00::1")
AGENTS = NodeIdentity(name="agents", tags=frozenset({"agents"}), ipv4="100.64.0.65", ipv6="fd00:0:0:1::1")
READER = AgentIdentity(id="a1", name="r", principal="nikita@acme.com", scopes=parse_scopes(["db:read"]),
                       node="agents", ipv4="100.64.0.66", ipv6="fd00:0:0:1::2")


def test_the_table_admits_only_what_rules_name_and_drops_the_rest() -> None:
    nf = compile_node_filter(POLICY, Identities.build([DB, AGENTS], [READER]), "db")
    text = render_table(nf, "idmesh0")
    assert text.startswith("add table inet idmesh\ndelete table inet idmesh\n")  # one atomic replace
    assert "elements = { 100.64.0.66 }" in text and "elements = { fd00:0:0:1::2 }" in text
    assert "tcp dport { 5432, 8000-8100 } accept" in text
    assert "meta l4proto icmp accept" in text and "meta l4proto ipv6-icmp accept" in text
    assert text.index("ct state established,related accept") < text.index("tcp dport")
    assert text.rstrip().endswith("}") and 'counter name denied drop comment "default deny"' in text
    assert 'iifname "idmesh0" jump mesh_in' in text


@pytest.mark.skipif(shutil.which("nft") is None and os.environ.get("CI") != "true", reason="nft not installed")
def test_nft_accepts_the_rendered_table() -> None:
    nf = compile_node_filter(POLICY, Identities.build([DB, AGENTS], [READER]), "db")
    done = subprocess.run(["nft", "-c", "-f", "-"], check=False, input=render_table(nf, "idmesh0"), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_an_agent_born_or_gone_changes_set_elements_not_rules() -> None:
    before = compile_node_filter(POLICY, Identities.build([DB, AGENTS]), "db")
    after = compile_node_filter(POLICY, Identities.build([DB, AGENTS], [READER]), "db")
    assert before.rules_hash == after.rules_hash and before.digest != after.digest
    born = element_changes(before, after)
    assert born.delete == () and {name for name, _ in born.add} == {f"{s}_{f}" for s in after.sets for f in "46"
                                                                    if (after.sets[s].v4 if f == "4" else after.sets[s].v6)}
    script = render_element_changes(born)
    assert script.startswith("add element inet idmesh src_") and "100.64.0.66" in script
    gone = element_changes(after, before)
    assert gone.add == () and "delete element inet idmesh" in render_element_changes(gone)
    assert element_changes(after, after).empty
