"""Failed-attempt limiting for enrollment, keyed by source address.

A source that fails ``limit`` times within ``window`` is refused until the
oldest of those failures leaves the window. Successful attempts cost
nothing: only guessing is slowed down. Pure: ``now`` is passed in.
"""

from __future__ import annotations

import threading
from collections import deque
from datetime import datetime, timedelta

from meshcore.errors import RateLimited

__all__ = ["FailureLimiter"]


class FailureLimiter:
    def __init__(self, limit: int = 10, window: timedelta = timedelta(minutes=1), max_sources: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self._max_sources = max_sources
        self._failures: dict[str, deque[datetime]] = {}
        self._lock = threading.Lock()  # the API's calls run in worker threads

    def _recent(self, source: str, now: datetime) -> deque[datetime]:
        q = self._failures.get(source)
        if q is None:
            return deque()
        while q and now - q[0] >= self.window:
            q.popleft()
        if not q:
            del self._failures[source]
        return q

    def check(self, source: str, now: datetime) -> None:
        with self._lock:
            q = self._recent(source, now)
            first, count = (q[0] if q else now), len(q)
        if count >= self.limit:
            wait = int((first + self.window - now).total_seconds()) + 1
            raise RateLimited(f"too many failed enrollment attempts from {source}; try again in {wait}s")

    def record_failure(self, source: str, now: datetime) -> None:
        with self._lock:
            if source not in self._failures and len(self._failures) >= self._max_sources:
                # Bounded memory under a flood of distinct sources: forget the oldest.
                self._failures.pop(next(iter(self._failures)))
            q = self._failures.setdefault(source, deque())
            q.append(now)
            while len(q) > self.limit:
                q.popleft()
