"""The LAVE prompt forms of the paper and the parser of the LLM's answer.

Two prompt forms (REFERENCE.md): for small vocabularies (VOC, Cityscapes, Context-59, ADE-150) the prompt lists the
classes; for large ones (ADE-847, Context-459) it names the dataset instead. ``max_listed_classes`` is the switch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from autoseg.lave.matching import ExactMatcher, name_key

PROMPT_VERSION = "lave-v1"  # part of the cache key: change it when the prompts below change

LIST_PROMPT = (
    "To which class in [{classes}] is '{name}' exclusively most similar to? If {name} is not similar to any class "
    "in the list, answer with 'void'. Reply in single quotation marks with the class name only."
)
DATASET_PROMPT = (
    "To which class in the {dataset} dataset is '{name}' exclusively most similar to? If {name} is not similar to any "
    "class in the {dataset} dataset, answer with 'void'. Reply in single quotation marks with the class name only."
)
DEFAULT_MAX_LISTED_CLASSES = 200  # lists up to ADE-150 / Context-59; names the dataset for Context-459, ADE-847

DATASET_TITLES = {
    "voc20": "PASCAL VOC",
    "voc21": "PASCAL VOC",
    "context59": "PASCAL Context",
    "context60": "PASCAL Context",
    "context459": "PASCAL Context (459 classes)",
    "ade150": "ADE20K (150 classes)",
    "ade847": "ADE20K (847 classes)",
    "cityscapes": "Cityscapes",
}

VOID_WORDS = frozenset({"void", "none", "background", "nothing", "no class", "unknown", "n a"})

# An opening quote is not preceded by a letter (so "it's" is no quote); ' " and the typographic pairs count.
_QUOTED = re.compile(r"(?<![A-Za-z0-9])(?:'([^'\n]+?)'|\"([^\"\n]+?)\"|‘([^’\n]+?)’|“([^”\n]+?)”)")


def build_prompt(
    name: str, classes: Sequence[str], dataset: str, max_listed_classes: int = DEFAULT_MAX_LISTED_CLASSES
) -> str:
    """The user message asking which class ``name`` belongs to (class list or dataset name, by vocabulary size)."""
    if len(classes) <= max_listed_classes:
        return LIST_PROMPT.format(classes=", ".join(f"'{c}'" for c in classes), name=name)
    return DATASET_PROMPT.format(dataset=DATASET_TITLES.get(dataset, dataset), name=name)


def build_messages(
    name: str, classes: Sequence[str], dataset: str, max_listed_classes: int = DEFAULT_MAX_LISTED_CLASSES
) -> list[dict[str, str]]:
    """Chat messages (OpenAI format) for one name."""
    return [{"role": "user", "content": build_prompt(name, classes, dataset, max_listed_classes)}]


def quoted_spans(answer: str) -> list[str]:
    """Texts between matching single, double or typographic quotes, in order."""
    return [next(g for g in m.groups() if g is not None).strip() for m in _QUOTED.finditer(answer)]


def parse_decision(answer: str, matcher: ExactMatcher) -> tuple[bool, int | None]:
    """``(decided, class index or None)`` of an LLM answer by the paper's rules, made robust.

    1. Quoted spans are matched to the classes; exactly one class -> that class, several -> void.
    2. A quoted "void"/"none"/"background" with no class -> void.
    3. Otherwise classes named in the quoted spans, then in the whole answer, as whole words; exactly one -> it,
       several -> void.
    4. An unquoted answer that is only a void word (``void``, ``None.``) -> void.
    5. Anything else (empty, junk, a quoted non-class) decides nothing: ``(False, None)``.
    """
    spans = quoted_spans(answer)
    exact = {i for i in matcher.match_many(spans) if i is not None} if spans else set()
    if len(exact) == 1:
        return True, exact.pop()
    if len(exact) > 1:
        return True, None
    if any(name_key(s) in VOID_WORDS for s in spans):
        return True, None
    for text in (" ".join(spans), answer):
        found = matcher.search(text) if text else set()
        if len(found) == 1:
            return True, found.pop()
        if len(found) > 1:
            return True, None
    return name_key(answer) in VOID_WORDS, None


def parse_answer(answer: str, matcher: ExactMatcher) -> int | None:
    """Class index named by an LLM answer, or None for background/void; an undecided (junk) answer is void."""
    return parse_decision(answer, matcher)[1]
