"""What the mapper needs from a backend: a cache identity and a lazy stream of (name, class, raw answer)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol


class Backend(Protocol):
    """A name -> class decision procedure used after exact matching and the cache.

    ``kind`` and ``cache_id`` (model plus every setting that changes answers) form the cache key with the dataset
    and the name. ``map`` yields one ``(name, class index or None, raw answer)`` per name, in order, lazily, so that
    the mapper can store each result before the next one is computed.
    """

    kind: str

    @property
    def cache_id(self) -> str: ...

    def map(
        self, names: Sequence[str], classes: Sequence[str], dataset: str
    ) -> Iterator[tuple[str, int | None, Any]]: ...
