"""NAT traversal: how a node behind a NAT is reached, with the data plane left to WireGuard (SPEC §7).

:mod:`.wgport` sends and receives STUN on WireGuard's own port (a raw
socket, a BPF filter), so every mapping learnt is WireGuard's;
:mod:`.traversal` learns the node's reflexive address, probes peers'
candidates and answers their probes, and tells the data plane each peer's
endpoint; :mod:`.paths` decides a peer's path from what probes heard
(pure); :mod:`.relay` carries the WireGuard packets of peers that have no
direct path through one TURN allocation per node (aioice's TURN client,
coturn on the other end): a local UDP socket per relayed peer is that
peer's WireGuard endpoint. Direct paths never pass through Python: there
the peer's ``endpoint=`` is simply set over UAPI. May import
:mod:`meshcore`, :mod:`meshd.kernel` and :mod:`meshd.wg`; never
:mod:`meshd.node`.
"""
