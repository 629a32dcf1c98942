"""Which way each peer is reached — direct, through the relay, or not at all — decided from what probes heard (pure).

Tailscale's disco is the anchor: a direct path is trusted while its
probes are answered (:data:`TRUST` seconds after the last answer); a peer
with no trusted direct path :data:`RELAY_AFTER` seconds after probing began
goes through the relay, if both ends have one, and comes back to a direct
path the moment a probe is answered again. Among several answering
candidates the fastest wins, and the current one is kept unless another is
clearly faster (:data:`BETTER`), so a path does not flap between two that
are about as good. Nothing here does I/O or reads a clock: ``now`` is passed
in, so the rules are tested as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BETTER", "RELAY_AFTER", "TRUST", "Choice", "PeerPaths"]

TRUST = 6.5
"""Seconds a direct path stays trusted after its last answered probe."""
RELAY_AFTER = 5.0
"""Seconds of probing without an answer before a relayed path is used (SPEC §7)."""
BETTER = 0.7
"""Another candidate takes over only when its round trip is under this share of the current one's."""


@dataclass(frozen=True)
class Choice:
    """The path to use now: ``kind`` is ``direct``, ``relay`` or ``none``; ``endpoint`` what WireGuard is told."""

    kind: str
    endpoint: str | None


@dataclass
class PeerPaths:
    """What probes of one peer found."""

    probing_since: float | None = None
    answered: dict[str, tuple[float, float]] = field(default_factory=dict)
    """candidate ip:port -> (when its last probe was answered, round trip in seconds)."""
    chosen: str | None = None
    relay_endpoint: str | None = None
    """The local relay socket WireGuard reaches this peer through, once the relay was opened for it."""
    last_probe: str = "never"
    """For ``meshctl status``: the last probe's result, e.g. ``answered by 203.0.113.7:4242 in 1.2 ms``."""

    def answer(self, candidate: str, now: float, rtt: float) -> None:
        self.answered[candidate] = (now, rtt)
        self.last_probe = f"answered by {candidate} in {rtt * 1000:.1f} ms"

    def start(self, now: float) -> None:
        if self.probing_since is None:
            self.probing_since = now

    def direct(self, now: float) -> str | None:
        """The direct candidate to use: trusted, fastest, sticky."""
        live = {c: rtt for c, (at, rtt) in self.answered.items() if now - at <= TRUST}
        if not live:
            self.chosen = None
            return None
        best = min(live, key=lambda c: live[c])
        if self.chosen in live and live[best] >= BETTER * live[self.chosen]:
            return self.chosen
        self.chosen = best
        return best

    def choose(self, now: float, relay_possible: bool) -> Choice:
        direct = self.direct(now)
        if direct is not None:
            return Choice("direct", direct)
        waited = self.probing_since is not None and now - self.probing_since >= RELAY_AFTER
        if relay_possible and (waited or self.relay_endpoint is not None):
            return Choice("relay", self.relay_endpoint)
        return Choice("none", None)
