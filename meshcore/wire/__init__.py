"""Every message that crosses a process boundary, in one package, with one protocol version.

* :mod:`.api` — the controller's HTTP API: request and answer bodies;
* :mod:`.stream` — the netmap stream from the controller to each node, and
  the node's endpoint report;
* :mod:`.local` — meshd's local API on its Unix socket (``meshctl``);
* :mod:`.base` — the two kinds of type: a :class:`~.base.Request` refuses
  unknown fields, an :class:`~.base.Answer` ignores them.

This module itself imports nothing heavy (``meshctl agent run`` reads only
the version from it); import the submodule you need.

**Compatibility.** Readers ignore unknown fields and skip stream messages of
an unknown type, so a controller may add either without breaking older
nodes; a field is never removed or given another meaning while a supported
version still reads it. A node names its version when it opens the stream
(header :data:`PROTOCOL_HEADER`, no header meaning 2); the controller answers
the version both will speak (:func:`negotiate`, the same header) and the
range it supports (:data:`SUPPORTED_HEADER`), or refuses a node older than
:data:`MIN_PROTOCOL` with one line saying to upgrade it.

Protocol versions:

* 1 (2026-11-28): enrollment, tokens, node registry; renewal, endpoint
  reports, the netmap stream (full maps, deltas, keepalives, policy
  documents, agent updates).
* 2 (2026-11-28): route offers (``PeerNode.routing``, ``EndpointReport.routing``).
* 3 (2026-12-01): tolerant readers (unknown fields and message types are
  ignored); the stream's version handshake; meshd's local API answers are
  typed (:mod:`.local`).
* 4 (2026-12-01): nodes behind NAT — ``PeerNode.reach`` and
  ``EndpointReport.reach`` (reflexive and relayed addresses, NAT behaviour,
  probe credentials); stream messages ``nat`` (STUN servers, TURN
  credentials, for the receiving node only) and ``probe`` (call me maybe);
  ``POST /v1/probe``.
"""

from __future__ import annotations

__all__ = ["MIN_PROTOCOL", "PROTOCOL", "PROTOCOL_HEADER", "SUPPORTED_HEADER", "negotiate"]

PROTOCOL = 4
"""The version this code speaks."""
MIN_PROTOCOL = 2
"""The oldest node version a controller of this code serves (2 sends nothing 2 cannot read)."""
PROTOCOL_HEADER = "Idmesh-Protocol"
SUPPORTED_HEADER = "Idmesh-Protocol-Supported"


def negotiate(theirs: str | None) -> int | None:
    """The version to speak with a peer that announced ``theirs`` (None: it announced nothing, so 2);
    None when it is older than :data:`MIN_PROTOCOL` or not a version at all."""
    if theirs is None:
        return 2
    try:
        version = int(theirs.strip())
    except ValueError:
        return None
    if version < MIN_PROTOCOL:
        return None
    return min(version, PROTOCOL)
