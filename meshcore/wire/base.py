"""The two kinds of wire type: what a side accepts from outside, and what it reads from a trusted peer.

**Strict writers, tolerant readers.** A :class:`Request` is what a server
accepts from a client — an enrolling node, an admin, a process on the
node: an unknown field is refused (a typo or a forged field must not pass
silently). An :class:`Answer` is what a client reads from a server it
trusts, possibly a newer one: an unknown field is ignored, so a controller
that adds a field never cuts older nodes off from their revocations (as
Tailscale's capability versions let control and clients move at different
speeds). Both are frozen.

A type that travels both ways (a node's route offer is a request when the
node reports it and part of an answer when the controller hands it to
the others) is defined once as an :class:`Answer`, with a strict twin
where a request carries it (e.g. ``RouteOffer`` and ``RouteOfferReport``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ANSWER_CONFIG", "REQUEST_CONFIG", "Answer", "Request"]

REQUEST_CONFIG = ConfigDict(extra="forbid", frozen=True)
ANSWER_CONFIG = ConfigDict(extra="ignore", frozen=True)


class Request(BaseModel):
    """Accepted from outside: unknown fields are refused."""

    model_config = REQUEST_CONFIG


class Answer(BaseModel):
    """Read from a trusted, possibly newer peer: unknown fields are ignored."""

    model_config = ANSWER_CONFIG
