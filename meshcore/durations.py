"""Durations as people write them: ``90s``, ``15m``, ``1h30m``, ``7d``."""

from __future__ import annotations

import re
from datetime import timedelta

from .errors import InvalidInput

__all__ = ["format_duration", "parse_duration"]

_PART = re.compile(r"(\d+)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    text = text.strip()
    if not text or _PART.sub("", text) != "":
        raise InvalidInput(f"invalid duration {text!r}: use forms like 90s, 15m, 1h30m, 7d")
    seconds = sum(int(n) * _UNIT[u] for n, u in _PART.findall(text))
    if seconds <= 0:
        raise InvalidInput(f"invalid duration {text!r}: must be longer than zero")
    try:
        return timedelta(seconds=seconds)
    except OverflowError as exc:
        raise InvalidInput(f"invalid duration {text!r}: too long") from exc


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out) or "0s"
