"""What training does to a model's vocabulary: find the words of class names a tokenizer splits, and add them to BLIP.

Model sources themselves (a Hugging Face id, a local directory or ``scratch:NAME``) are loaded by
:func:`autoseg.models.blip.load_blip` and :func:`autoseg.models.segmenters.build_segmenter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from autoseg.models.blip import BlipCaptioner


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
