"""Enforcement with nftables: one table, ``inet idmesh``.

Rendering is pure (:func:`render_table`, :func:`render_element_changes`);
:class:`NftFirewall` runs the text through libnftables (:mod:`meshd.kernel.nft`),
which applies a script as one atomic transaction: a packet sees the old ruleset or the new one, never
a mix. What it installs, for a packet that arrives on the mesh interface
(input and forward, see :class:`meshcore.policy.NodeFilter` for the order)::

    table inet idmesh
      set src_<hash>_4 / src_<hash>_6      members of one source class
      chain mesh_in                         established,related accept
                                            invalid drop
                                            <to> <source set> <proto> <ports> accept ...
                                            drop                 (default deny)

``<to>`` is the node's own address, or for a rule to agents (agents as
servers) the set of this node's agents it admits to: a rule to the node
never opens an agent's address, nor the other way round.
      chain input   hook input   iifname <mesh> jump mesh_in
      chain forward hook forward iifname <mesh> jump mesh_in

A policy change (the rules' hash differs) replaces the whole table in one
batch; an identity joining or leaving only adds or deletes set elements.
Traffic that does not arrive over the mesh is not touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from meshcore.errors import IdmeshError
from meshcore.policy import FilterRule, NodeFilter
from meshd.kernel.nft import Nft, NftTable

__all__ = ["TABLE", "ElementChanges", "NftFirewall", "render_element_changes", "render_table"]

TABLE = "idmesh"
log = logging.getLogger("meshd.mesh.firewall")


def _elements(addresses: frozenset[str]) -> str:
    return ", ".join(sorted(addresses))


FLOW_GROUP = 7301  # the NFLOG group meshd's flow log reads (per network namespace)
# Only packets addressed to this node are logged: multicast chatter (mDNS) is dropped quietly.
DENY_LOG = f'meta pkttype host limit rate 20/second burst 40 packets log group {FLOW_GROUP} prefix "deny"'


def _sample_log(rule: FilterRule) -> str:
    """A rate-limited sample of the connections a rule accepts, named after its acl."""
    acl = rule.acls[0] if rule.acls else -1
    return f'ct state new limit rate 2/second burst 4 packets log group {FLOW_GROUP} prefix "a{acl}"'


def _destinations(rule: FilterRule, addresses: tuple[str | None, str | None]) -> tuple[str, str]:
    """What a rule admits to: the agents in its ``to`` set, else the node's own addresses (never its agents')."""
    if rule.to is not None:
        return f"ip daddr @{rule.to}_4 ", f"ip6 daddr @{rule.to}_6 "
    return (f"ip daddr {addresses[0]} " if addresses[0] else "", f"ip6 daddr {addresses[1]} " if addresses[1] else "")


def _rule_lines(rule: FilterRule, addresses: tuple[str | None, str | None] = (None, None),
                flow_log: bool = False) -> list[str]:
    comment = f' comment "acls{list(rule.acls)}"' if rule.acls else ""
    if flow_log:  # each match first logs a sample, then accepts; a log statement never ends a chain
        return [line.replace(" accept", f" {_sample_log(rule)}", 1).split(" comment")[0]
                for line in _rule_lines(rule, addresses)] + _rule_lines(rule, addresses)
    to4, to6 = _destinations(rule, addresses)
    if rule.protocol == "icmp":
        return [f"{to4}ip saddr @{rule.source}_4 meta l4proto icmp accept{comment}",
                f"{to6}ip6 saddr @{rule.source}_6 meta l4proto ipv6-icmp accept{comment}"]
    if all(p.is_all for p in rule.ports):
        match = f"meta l4proto {rule.protocol}"
    else:
        ports = ", ".join(str(p.lo) if p.lo == p.hi else f"{p.lo}-{p.hi}" for p in rule.ports)
        match = f"{rule.protocol} dport {{ {ports} }}"
    return [f"{to4}ip saddr @{rule.source}_4 {match} accept{comment}",
            f"{to6}ip6 saddr @{rule.source}_6 {match} accept{comment}"]


def render_table(nf: NodeFilter, ifname: str, flow_log: bool = False) -> str:
    """The whole table for ``nft -f``: created if missing, emptied, filled, in one transaction.

    With ``flow_log``, denied packets (up to 20/s) and a sample of accepted
    connections (up to 2/s per rule) are copied to NFLOG group
    :data:`FLOW_GROUP` for :mod:`meshd.mesh.flowlog`.
    """
    lines = [f"add table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{",
             f"  comment \"idmesh {nf.node} rules {nf.rules_hash[:16]}\"", "  counter denied { }"]
    for name in sorted(nf.sets):
        members = nf.sets[name]
        for family, addrs in (("4", members.v4), ("6", members.v6)):
            kind = "ipv4_addr" if family == "4" else "ipv6_addr"
            elements = f" elements = {{ {_elements(addrs)} }};" if addrs else ""
            lines.append(f"  set {name}_{family} {{ type {kind};{elements} }}")
    lines.append("  chain mesh_in {")
    lines.append("    ct state established,related accept")
    lines.append("    ct state invalid drop")
    for rule in nf.rules:
        lines += [f"    {line}" for line in _rule_lines(rule, nf.addresses, flow_log)]
    if flow_log:
        lines.append(f"    {DENY_LOG}")
    lines.append("    counter name denied drop comment \"default deny\"")
    lines.append("  }")
    for hook in ("input", "forward"):
        lines.append(f"  chain {hook} {{ type filter hook {hook} priority filter; policy accept; "
                     f"iifname \"{ifname}\" jump mesh_in; }}")
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ElementChanges:
    add: tuple[tuple[str, frozenset[str]], ...]
    delete: tuple[tuple[str, frozenset[str]], ...]

    @property
    def empty(self) -> bool:
        return not self.add and not self.delete


def element_changes(installed: NodeFilter, desired: NodeFilter) -> ElementChanges:
    """Set elements to add and delete when only membership changed (same rules)."""
    add: list[tuple[str, frozenset[str]]] = []
    delete: list[tuple[str, frozenset[str]]] = []
    for name in sorted(set(installed.sets) | set(desired.sets)):
        old, new = installed.sets.get(name), desired.sets.get(name)
        for family, before, after in (("4", old.v4 if old else frozenset(), new.v4 if new else frozenset()),
                                      ("6", old.v6 if old else frozenset(), new.v6 if new else frozenset())):
            if after - before:
                add.append((f"{name}_{family}", frozenset(after - before)))
            if before - after:
                delete.append((f"{name}_{family}", frozenset(before - after)))
    return ElementChanges(tuple(add), tuple(delete))


def render_element_changes(changes: ElementChanges) -> str:
    lines = [f"delete element inet {TABLE} {name} {{ {_elements(addrs)} }}" for name, addrs in changes.delete]
    lines += [f"add element inet {TABLE} {name} {{ {_elements(addrs)} }}" for name, addrs in changes.add]
    return "\n".join(lines) + "\n"


class NftFirewall:
    """The ``inet idmesh`` table of this network namespace, owned by this meshd."""

    def __init__(self, ifname: str, nft: Nft | None = None, flow_log: bool = False) -> None:
        self.ifname = ifname
        self.flow_log = flow_log
        self.installed: NodeFilter | None = None
        self._table = NftTable(TABLE, nft)

    def apply(self, desired: NodeFilter) -> str:
        """Converge the table; return what was done ("replaced", "elements", "unchanged")."""
        installed = self.installed
        if installed is not None and installed.rules_hash == desired.rules_hash and \
                set(installed.sets) == set(desired.sets):
            changes = element_changes(installed, desired)
            if changes.empty:
                return "unchanged"
            self._table.run(render_element_changes(changes), "the policy's set elements")
            self.installed = desired
            return "elements"
        self._table.run(render_table(desired, self.ifname, self.flow_log), "the policy's ruleset")
        self.installed = desired
        log.info("firewall: installed rules %s (digest %s, %d rules, %d sets)", desired.rules_hash[:16],
                 desired.digest[:16], len(desired.rules), len(desired.sets))
        return "replaced"

    def missing(self) -> bool:
        """True when the table was installed and is gone: someone else deleted it (``nft flush ruleset``, say).

        Then nothing is denied any more, so it is forgotten here and the next
        apply installs it whole again.
        """
        if self.installed is None or self._table.exists():
            return False
        self.installed = None
        return True

    def denied(self) -> int:
        """Packets the default-deny rule has dropped so far (for metrics)."""
        if self.installed is None:
            return 0
        try:
            return self._table.counter("denied")
        except IdmeshError:
            return 0

    def close(self) -> None:
        """Remove the table (also one a crashed meshd left): nothing of ours stays."""
        try:
            self._table.delete()
        except IdmeshError as exc:
            log.warning("firewall: %s", exc)
        self.installed = None
        self._table.close()
