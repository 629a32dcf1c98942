"""NAT traversal: what lives here and what it may import (meshcore, meshd.kernel, meshd.wg; never meshd.node).

:mod:`.relay` carries the WireGuard packets of peers that have no direct
path through one TURN allocation per node (aioice's TURN client, coturn on
the other end): a local UDP socket per relayed peer is that peer's
WireGuard endpoint. Direct paths never pass through Python: there the
peer's ``endpoint=`` is simply set over UAPI.
"""
