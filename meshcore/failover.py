"""Which controller replica to try next, and after how long (SPEC §8).

Pure: the clock and the randomness are passed in, so the order and the
delays are tested without waiting; meshd's netmap stream and its calls, and
meshctl's client, drive it.

The delays are "full jitter" (uniformly in [0, ceiling)), the ceiling
doubling from :data:`FIRST_DELAY` with each failure in a row. While some
listed replica has not failed since the last healthy stream, the ceiling
stops at :data:`FAILOVER_CAP`: a killed replica's nodes reach another
within a few seconds, spread over that window instead of all at once.
Once every replica has failed in a row the controller is down, not moving,
and the ceiling grows on to :data:`WAIT_CAP`, so ten thousand nodes do not
knock on a dead controller every second (a single controller is this case
from its first failure, as before several existed). A stream that stayed up
for :data:`HEALTHY_AFTER` starts the count again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit

__all__ = [
    "FAILOVER_CAP",
    "FIRST_DELAY",
    "HEALTHY_AFTER",
    "WAIT_CAP",
    "Failover",
    "controller_urls",
    "tried_in_order",
    "usable_urls",
]

FIRST_DELAY = 0.1
"""Ceiling of the first delay, seconds: a replica killed is left for the next at once."""
FAILOVER_CAP = 2.0
"""Largest ceiling while a listed replica is still untried in this run of failures."""
WAIT_CAP = 30.0
"""Largest ceiling once every replica failed in a row."""
HEALTHY_AFTER = 10.0
"""A stream up this long (one controller keepalive) was healthy: the next failure is a first one."""


def controller_urls(urls: Iterable[str]) -> tuple[str, ...]:
    """``urls`` in their order, without a trailing ``/`` and each once: ``https://c/`` and ``https://c`` are one."""
    return tuple(dict.fromkeys(url.rstrip("/") for url in urls))


def usable_urls(urls: Iterable[str]) -> tuple[str, ...]:
    """The https URLs with a host among ``urls`` (as :func:`controller_urls`): what a node may follow.

    The list comes from the controller over the authenticated stream; an
    entry this node could not connect to anyway is left out rather than
    tried and failed on every round.
    """
    kept = []
    for url in controller_urls(urls):
        try:
            parts = urlsplit(url)
            _ = parts.port
        except ValueError:
            continue
        if parts.scheme == "https" and parts.hostname:
            kept.append(url)
    return tuple(kept)


def tried_in_order(urls: Sequence[str], first: str) -> tuple[str, ...]:
    """Every URL once, ``first`` first and then those after it in the list, wrapping around.

    Starting from the one that answered last keeps a client on a replica
    that works; going on in list order keeps the order the controller set.
    ``first`` not listed (a replica that left the mesh): the list as it is.
    """
    if first not in urls:
        return tuple(urls)
    at = list(urls).index(first)
    return (*urls[at:], *urls[:at])


class Failover:
    """The replica a node streams from, and what to do when that stream fails.

    ``failed`` moves to the next URL and says how long to wait before
    connecting to it; ``connected`` notes when a stream opened, so that one
    that stays up for ``healthy_after`` resets the back-off.
    """

    def __init__(self, urls: Sequence[str], *, jitter: Callable[[], float] = random.random,
                 first_delay: float = FIRST_DELAY, failover_cap: float = FAILOVER_CAP, wait_cap: float = WAIT_CAP,
                 healthy_after: float = HEALTHY_AFTER) -> None:
        self._urls = controller_urls(urls)
        if not self._urls:
            raise ValueError("a failover needs at least one controller URL")
        self.url = self._urls[0]
        """The URL streamed from now, or to connect to next."""
        self._jitter = jitter
        self._first, self._failover_cap, self._wait_cap = first_delay, failover_cap, wait_cap
        self._healthy_after = healthy_after
        self._failures = 0  # in a row, since the last healthy stream
        self._up_since: float | None = None

    @property
    def urls(self) -> tuple[str, ...]:
        return self._urls

    @property
    def position(self) -> int | None:
        """The current URL's place in the list, from 1; None when it is no longer listed."""
        return self._urls.index(self.url) + 1 if self.url in self._urls else None

    def learn(self, urls: Sequence[str]) -> bool:
        """Take the controller's new list; whether it changed anything.

        An empty list means the controller did not say: the old one stays
        (a node must never be left without a controller to try). The
        current URL stays in use even when no longer listed, until it fails:
        a stream that works is not dropped for a list.
        """
        new = controller_urls(urls)
        if not new or new == self._urls:
            return False
        self._urls = new
        return True

    def connected(self, now: float) -> None:
        self._up_since = now

    def failed(self, now: float) -> float:
        """The stream to :attr:`url` failed (or never opened): move on; the seconds to wait before the next."""
        if self._up_since is not None and now - self._up_since >= self._healthy_after:
            self._failures = 0
        self._up_since = None
        self._failures += 1
        order = tried_in_order(self._urls, self.url)
        self.url = order[1 % len(order)] if self.url in self._urls else order[0]
        cap = self._failover_cap if self._failures < len(self._urls) else self._wait_cap
        ceiling = min(cap, self._first * 2.0 ** min(self._failures - 1, 32))
        return self._jitter() * ceiling
