"""NAT traversal: how a node behind a NAT is reached, with the data plane left to WireGuard (SPEC §7).

:mod:`.wgport` sends and receives STUN on WireGuard's own port (a raw
socket, a BPF filter), so every mapping learnt is WireGuard's;
:mod:`.traversal` learns the node's reflexive address, probes peers'
candidates and answers their probes, and tells the data plane each peer's
endpoint; :mod:`.paths` decides a peer's path from what probes heard
(pure); :mod:`.relay` carries WireGuard's packets through a TURN server
for peers no direct path reaches. May import :mod:`meshcore`,
:mod:`meshd.kernel` and :mod:`meshd.wg`; never :mod:`meshd.node`.
"""
