"""Model sources for training: a Hugging Face id, a local ``save_pretrained`` directory, or ``scratch:NAME``.

``scratch:NAME`` builds a randomly initialised model of a registered size with an offline tokenizer (see
:mod:`autoseg.models.scratch`); no network and no files are needed, which is what the debug configs and the tests
use. The random initialisation is seeded (``SCRATCH_SEED``), so the same source always gives the same weights:
checkpoints leave frozen weights out and take them from the source again when loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from autoseg.models.blip import BlipCaptioner
from autoseg.models.segmenters import CLIPSegSegmenter

SCRATCH_PREFIX = "scratch:"
SCRATCH_SEED = 0

SCRATCH_BLIP: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, patch_size=8, image_size=64),
    "small": dict(hidden_size=96, num_layers=4, num_heads=4, intermediate_size=192, patch_size=8, image_size=128),
}
SCRATCH_CLIPSEG: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37, patch_size=8, image_size=64),
    "small": dict(
        hidden_size=96,
        num_layers=4,
        num_heads=4,
        intermediate_size=192,
        patch_size=8,
        image_size=128,
        projection_dim=64,
        reduce_dim=32,
        extract_layers=(1, 2, 3),
    ),
}


def _scratch_spec(source: str, registry: dict[str, dict], what: str) -> dict:
    name = source[len(SCRATCH_PREFIX) :]
    if name not in registry:
        raise ValueError(f"{what} source {source!r}: unknown scratch size {name!r}; available: {sorted(registry)}")
    return registry[name]


def _from_scratch(source: str, registry: dict[str, dict], what: str, make, scratch: dict[str, Any] | None, **extra):
    """Seeded random model ``make(**size)`` for a ``scratch:NAME`` source, ``scratch`` overriding the size."""
    spec = _scratch_spec(source, registry, what)
    allowed = set(inspect.signature(make).parameters) - set(extra)
    unknown = sorted(set(scratch or {}) - allowed)
    if unknown:
        raise ValueError(f"{what} scratch options {unknown} unknown; allowed: {sorted(allowed)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SCRATCH_SEED)
        return make(**{**spec, **(scratch or {})}, **extra)


def _check_scratch(source: str, scratch: dict[str, Any] | None, what: str) -> None:
    if scratch and not source.startswith(SCRATCH_PREFIX):
        raise ValueError(f"{what} source {source!r}: size options {scratch} only apply to 'scratch:NAME' sources")


def build_blip(source: str, scratch: dict[str, Any] | None = None) -> BlipCaptioner:
    """BLIP captioner from a hub id, a local directory or ``scratch:tiny`` / ``scratch:small`` (random, seeded).

    Args:
        source: where the weights come from.
        scratch: for ``scratch:`` sources, ``make_blip`` arguments that override the registered size (e.g.
            ``{"hidden_size": 96, "patch_size": 16}``); an error for other sources.
    """
    _check_scratch(source, scratch, "BLIP")
    if source.startswith(SCRATCH_PREFIX):
        from autoseg.models.scratch import make_blip

        return BlipCaptioner(*_from_scratch(source, SCRATCH_BLIP, "BLIP", make_blip, scratch))
    return BlipCaptioner.from_pretrained(source)


def build_clipseg(
    source: str, words: Sequence[str] = (), scratch: dict[str, Any] | None = None, **kwargs
) -> CLIPSegSegmenter:
    """CLIPSeg segmenter from a hub id, a local directory or ``scratch:NAME`` (random, seeded).

    Args:
        source: where the weights come from.
        words: for ``scratch:`` sources, words the from-scratch tokenizer keeps whole (the class names).
        scratch: for ``scratch:`` sources, ``make_clipseg`` arguments that override the registered size.
        kwargs: ``CLIPSegSegmenter`` options (templates, image_size, ...).
    """
    _check_scratch(source, scratch, "CLIPSeg")
    if source.startswith(SCRATCH_PREFIX):
        from autoseg.models.scratch import make_clipseg

        model, processor = _from_scratch(source, SCRATCH_CLIPSEG, "CLIPSeg", make_clipseg, scratch, words=list(words))
        return CLIPSegSegmenter(model, processor, **kwargs)
    return CLIPSegSegmenter.from_pretrained(source, **kwargs)


def missing_words(tokenizer: Any, names: Sequence[str]) -> list[str]:
    """The words of ``names`` (normalised and split as the tokenizer does) that it does not hold as one token.

    Args:
        tokenizer: a Hugging Face tokenizer with a fast backend (BLIP's BERT WordPiece, a word-level vocabulary).
        names: class names (several words, any spelling).
    """
    backend = tokenizer.backend_tokenizer
    words: dict[str, None] = {}
    for name in names:
        text = backend.normalizer.normalize_str(name) if backend.normalizer is not None else name
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            if any(ch.isalnum() for ch in word) and tokenizer.tokenize(word) != [word]:
                words[word] = None
    return list(words)


def grow_blip_vocabulary(blip: BlipCaptioner, names: Sequence[str]) -> list[str]:
    """Add the words of ``names`` that BLIP's tokenizer splits into pieces as whole-word tokens.

    The text decoder's word embeddings and its output layer (tied or not, with its bias) are resized; each new row
    starts as the mean of the rows of the pieces the word was split into, so a new word starts where its spelling
    pointed and the decoder's other predictions are unchanged.

    Args:
        blip: the captioner (changed in place: tokenizer, embeddings, output layer, config ``vocab_size``).
        names: class names.

    Returns:
        the words added (empty: nothing changed).
    """
    from transformers import AddedToken

    tokenizer = blip.processor.tokenizer
    words = missing_words(tokenizer, names)
    if not words:
        return []
    pieces = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w)) for w in words]
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in words])
    decoder = blip.model.text_decoder
    old_in = decoder.get_input_embeddings().weight.detach().clone()  # V x H
    out_layer = decoder.get_output_embeddings()
    old_out = out_layer.weight.detach().clone()
    old_bias = None if out_layer.bias is None else out_layer.bias.detach().clone()
    size = max(len(tokenizer), old_in.shape[0])
    decoder.resize_token_embeddings(size, mean_resizing=False)
    new_ids = tokenizer.convert_tokens_to_ids(words)
    with torch.no_grad():
        emb, out_layer = decoder.get_input_embeddings().weight, decoder.get_output_embeddings()
        for i, ids in zip(new_ids, pieces, strict=True):
            emb[i] = old_in[ids].mean(0)
            out_layer.weight[i] = old_out[ids].mean(0)
            if old_bias is not None:
                out_layer.bias[i] = old_bias[ids].mean(0)
    blip.model.config.text_config.vocab_size = size
    return words
