"""An immutable mapping whose updates copy 1/64th of it, not all of it.

:class:`~meshcore.policy.identities.Identities` is frozen data, yet an agent
is born or dies many times a second in a mesh of tens of thousands of
identities. Copying its maps on every change (tens of thousands of entries,
milliseconds) would dominate the cost of the change; splitting each map into
64 shards by key hash and copying only the shards a change touches keeps
the value semantics at a fraction of the cost — a two-level version of the
hash array mapped tries that persistent-map libraries use.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import TypeVar

__all__ = ["DELETE", "CowMap"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_SHARDS = 64
_MASK = _SHARDS - 1


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE: object = _Delete()
"""The value that removes a key in :meth:`CowMap.updated`."""


class CowMap(Mapping[K, V]):
    __slots__ = ("_len", "_shards")

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        shards: list[dict[K, V]] = [{} for _ in range(_SHARDS)]
        pairs = items.items() if isinstance(items, Mapping) else items
        for key, value in pairs:
            shards[hash(key) & _MASK][key] = value
        self._shards: tuple[dict[K, V], ...] = tuple(shards)
        self._len = sum(len(s) for s in shards)

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & _MASK][key]

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        return self._shards[hash(key) & _MASK].get(key, default)

    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"CowMap({dict(self)!r})"

    def updated(self, changes: Mapping[K, V | object]) -> CowMap[K, V]:
        """A new map with ``changes`` applied (a value of :data:`DELETE` removes the key)."""
        shards = list(self._shards)
        copied: set[int] = set()
        size = self._len
        for key, value in changes.items():
            i = hash(key) & _MASK
            if i not in copied:
                shards[i] = dict(shards[i])
                copied.add(i)
            shard = shards[i]
            if value is DELETE:
                if key in shard:
                    del shard[key]
                    size -= 1
            else:
                size += key not in shard
                shard[key] = value  # type: ignore[assignment]
        out: CowMap[K, V] = CowMap.__new__(CowMap)
        out._shards = tuple(shards)
        out._len = size
        return out
