"""What the mapper needs from a backend: a cache identity and a lazy stream of (name, class, raw answer)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class NoDecision:
    """The raw answer of a name the backend could not decide in this run (e.g. only junk answers from an LLM).

    The mapper maps the name to void for this run only, records ``reason``, and never caches it, so that a later
    run asks again.

    Attributes:
        reason: why no decision was made, for the mapping records.
        raw: the last answer received ("" if none).
    """

    reason: str
    raw: str = ""


class Backend(Protocol):
    """A name -> class decision procedure used after exact matching and the cache.

    ``kind`` and ``cache_id`` (model plus every setting that changes answers) form the cache key with the dataset
    and the name. ``map`` yields one ``(name, class index or None, raw answer)`` per name, in order, lazily, so that
    the mapper can store each result before the next one is computed. A raw answer that is a :class:`NoDecision`
    (class index None) means "undecided in this run": void now, not cached.
    """

    kind: str

    @property
    def cache_id(self) -> str: ...

    def map(
        self, names: Sequence[str], classes: Sequence[str], dataset: str
    ) -> Iterator[tuple[str, int | None, Any]]: ...
