"""Exact name -> class matching, tolerant of case, spaces vs none, separators and simple plurals.

This is the first LAVE stage: a generated name that already *is* a dataset class (``"tvmonitor"`` vs ``"tv monitor"``,
``"buses"`` vs ``"bus"``) maps to it without asking a backend. The same matcher resolves the class named in an LLM
answer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def name_key(text: str) -> str:
    """Lower-case words separated by single spaces: ``"Potted_Plant "`` -> ``"potted plant"``."""
    return _NON_ALNUM.sub(" ", text.lower()).strip()


def singular_forms(word: str) -> set[str]:
    """Candidate singulars of an English plural by suffix rules (``"ies"->"y"``, ``"ves"->"f"``, ``"es"``, ``"s"``).

    Over-generates on purpose (``"buses"`` gives ``"buse"`` and ``"bus"``): forms are only compared with class forms.
    """
    out: set[str] = set()
    if len(word) > 4 and word.endswith("ies"):
        out.add(word[:-3] + "y")
    if len(word) > 4 and word.endswith("ves"):
        out |= {word[:-3] + "f", word[:-3] + "fe"}
    if len(word) > 3 and word.endswith("es"):
        out.add(word[:-2])
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        out.add(word[:-1])
    return out


def spacy_lemmatizer(model: str | None = None) -> Callable[[Sequence[str]], list[str]]:
    """Batch lemmatiser of short phrases with a spaCy pipeline (last word lemmatised: ``"potted plants"``)."""
    from autoseg.vocab.nouns import load_spacy

    nlp = load_spacy(model)

    def lemmatize(phrases: Sequence[str]) -> list[str]:
        out = []
        for doc in nlp.pipe(list(phrases)):
            words = [t.text for t in doc]
            if words:
                words[-1] = doc[-1].lemma_.lower()
            out.append(" ".join(words))
        return out

    return lemmatize


class ExactMatcher:
    """Index of a class list for exact matching in two tiers.

    Tier 1 compares space-free keys (``"tvmonitor" == "tv monitor"``); tier 2 also compares singular and lemma forms
    of the last word on both sides. A tier that matches more than one class is ambiguous and gives no match.

    Args:
        classes: display names, index = class id.
        synonyms: optional extra names per class (same order as ``classes``), matched like the display name.
        lemmatizer: optional batch lemmatiser (e.g. :func:`spacy_lemmatizer`) adding lemma forms.
    """

    def __init__(
        self,
        classes: Sequence[str],
        synonyms: Sequence[Sequence[str]] | None = None,
        lemmatizer: Callable[[Sequence[str]], list[str]] | None = None,
    ):
        if synonyms is not None and len(synonyms) != len(classes):
            raise ValueError(f"synonyms has {len(synonyms)} entries but there are {len(classes)} classes")
        self.classes = list(classes)
        self.lemmatizer = lemmatizer
        names = [[c, *(synonyms[i] if synonyms is not None else ())] for i, c in enumerate(self.classes)]
        flat = [n for group in names for n in group]
        self._all_names = flat
        forms = self.forms(flat)
        self._tier1: dict[str, set[int]] = {}
        self._tier2: dict[str, set[int]] = {}
        k = 0
        for i, group in enumerate(names):
            for _ in group:
                tier1, tier2 = forms[k]
                k += 1
                self._tier1.setdefault(tier1, set()).add(i)
                for f in tier2:
                    self._tier2.setdefault(f, set()).add(i)

    def forms(self, texts: Sequence[str]) -> list[tuple[str, set[str]]]:
        """(tier-1 key, tier-2 keys) of each text; all keys are space-free."""
        keys = [name_key(t) for t in texts]
        lemmas = self.lemmatizer(keys) if self.lemmatizer is not None and keys else [None] * len(keys)
        out = []
        for key, lemma in zip(keys, lemmas, strict=True):
            words = key.split()
            tier2 = {key.replace(" ", "")}
            if words:
                tier2 |= {"".join([*words[:-1], s]) for s in singular_forms(words[-1])}
            if lemma:
                tier2.add(name_key(lemma).replace(" ", ""))
            out.append((key.replace(" ", ""), tier2))
        return out

    def match_many(self, texts: Sequence[str]) -> list[int | None]:
        """Class index of each text, or None when no class or more than one class matches."""
        out: list[int | None] = []
        for tier1, tier2 in self.forms(texts):
            hit = self._tier1.get(tier1, set())
            if not hit:
                hit = set().union(*(self._tier2.get(f, set()) for f in tier2))
            out.append(next(iter(hit)) if len(hit) == 1 else None)
        return out

    def match(self, text: str) -> int | None:
        return self.match_many([text])[0]

    def search(self, text: str) -> set[int]:
        """Classes named anywhere in free text (whole words, longest match first, optional plural ending)."""
        found: set[int] = set()
        for m in self._pattern().finditer(name_key(text)):
            idx = self.match(m.group(0))
            if idx is not None:
                found.add(idx)
        return found

    def _pattern(self) -> re.Pattern:
        if not hasattr(self, "_regex"):
            phrases = {name_key(c) for c in self._all_names}
            alternatives = sorted(
                (r"\s*".join(re.escape(w) for w in p.split()) + r"(?:e?s)?" for p in phrases if p),
                key=len,
                reverse=True,
            )
            self._regex = re.compile(r"\b(?:" + "|".join(alternatives) + r")\b") if alternatives else re.compile(r"$^")
        return self._regex


def unique_in_order(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
