"""The random-weight models and the photos of ``bench_infer.py``.

BLIP and CLIPSeg are built at real (or smaller, for quick checks) sizes with seeded random weights, saved with
``save_pretrained`` and loaded back through AutoSeg's loaders. A random text decoder almost never emits ``[SEP]``, so
every caption would run to ``max_new_tokens``; :func:`calibrate_sep_bias` adds a seeded, deterministic bias to the
``[SEP]`` logit of the decoder's output layer so that sampled captions end like real BLIP captions (about 10 new
tokens), and the saved model carries it: every flow decodes with the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from infer_flows import decoding_kwargs, new_token_counts
from PIL import Image
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    ViTImageProcessor,
)

from autoseg.models.blip import CaptionConfig
from autoseg.models.blip_decoding import row_seed
from autoseg.models.scratch import CLIP_MEAN, CLIP_STD, bert_uncased_vocab_dir, blip_tokenizer, clip_tokenizer

CALIBRATION_FILE = "sep_calibration.json"  # {"sep_bias", "new_tokens_mean", "target"}, next to the BLIP weights
TARGET_NEW_TOKENS = 10.0  # real BLIP captions after "a picture of": about 9 words and [SEP]
BLIP_SIZES = {  # vision tower, and text decoder where it is not BERT-base (BLIP's own)
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),  # quick checks
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),  # tests
}
BLIP_TEXT = {"tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)}
CLIPSEG_SIZES = {  # rd64-refined: CLIP ViT-B/16 at 352 px, reduce_dim 64; tiny: for tests and smoke runs
    "rd64": dict(vision=dict(patch_size=16, image_size=224), text={}, extra={}, input_size=352),
    "tiny": dict(
        vision=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, patch_size=16),
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        extra=dict(projection_dim=32, reduce_dim=16, extract_layers=[1, 2], decoder_intermediate_size=37),
        input_size=64,
    ),
}


def save_models(root: Path, blip: str, clipseg: str = "rd64", calibrate: bool = True) -> tuple[Path, Path]:
    """Random BLIP (``blip`` size, its ``[SEP]`` bias calibrated, recorded in its folder's :data:`CALIBRATION_FILE`)
    and CLIPSeg (``clipseg`` size), saved with ``save_pretrained`` under ``root``. Returns their folders."""
    torch.manual_seed(0)
    tok = blip_tokenizer()
    vision = dict(**BLIP_SIZES[blip], patch_size=16, image_size=384, initializer_range=0.02)
    text = dict(vocab_size=len(tok), encoder_hidden_size=vision["hidden_size"], bos_token_id=tok.bos_token_id)
    text |= dict(pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    text |= BLIP_TEXT.get(blip, {})
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, initializer_range=0.02))
    size = {"height": 384, "width": 384}
    processor = BlipProcessor(BlipImageProcessor(size=size, image_mean=CLIP_MEAN, image_std=CLIP_STD), tok)
    calibration = calibrate_sep_bias(model.eval(), processor) if calibrate else (0.0, None)
    model.save_pretrained(root / "blip")
    processor.save_pretrained(root / "blip")
    record = dict(sep_bias=calibration[0], new_tokens_mean=calibration[1], target=TARGET_NEW_TOKENS)
    (root / "blip" / CALIBRATION_FILE).write_text(json.dumps(record) + "\n")
    spec = CLIPSEG_SIZES[clipseg]
    ctok = clip_tokenizer(english_words())  # whole English words are one token each, as with CLIP's own BPE
    config = CLIPSegConfig(
        vision_config=spec["vision"],
        text_config=dict(
            **spec["text"], vocab_size=len(ctok), bos_token_id=ctok.bos_token_id, eos_token_id=ctok.eos_token_id
        ),
        use_complex_transposed_convolution=True,  # the "refined" decoder
        **spec["extra"],
    )
    seg = CLIPSegForImageSegmentation(config)
    side = {"height": spec["input_size"], "width": spec["input_size"]}
    image_processor = ViTImageProcessor(size=side, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    seg.save_pretrained(root / "clipseg")
    CLIPSegProcessor(image_processor=image_processor, tokenizer=ctok).save_pretrained(root / "clipseg")
    return root / "blip", root / "clipseg"


def english_words() -> list[str]:
    """BERT-base-uncased's whole words (the names BLIP's tokenizer produces), for a CLIP BPE of realistic lengths."""
    vocab = (bert_uncased_vocab_dir() / "vocab.txt").read_text(encoding="utf-8").split()
    return [w for w in vocab if w.isalpha() and w.isascii()]


def photos(n: int) -> list[Image.Image]:
    """``n`` photographs of several sizes (scikit-image's sample data)."""
    from skimage import data

    pool = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(), data.cat()]
    sizes = [(640, 480), (500, 375), (480, 640), (512, 512)]
    return [Image.fromarray(pool[i % len(pool)]).convert("RGB").resize(sizes[i % len(sizes)]) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Captions of real length from a random decoder


@torch.no_grad()
def calibration_states(model: BlipForConditionalGeneration, processor: BlipProcessor, sets: int = 4) -> torch.Tensor:
    """Encoder states like a cluster's: the vision tower's CLS and a seeded random third of its patch tokens, on
    ``sets`` of the benchmark's photos at the model's input size. Returns ``sets x L x D``."""
    pixels = processor.image_processor(photos(sets), return_tensors="pt")["pixel_values"]
    hidden = model.vision_model(pixel_values=pixels.to(model.device, model.dtype)).last_hidden_state  # S x (1+N) x D
    n = hidden.shape[1] - 1
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(n, generator=gen)[: max(1, n // 3)] for _ in range(sets)]).to(hidden.device)
    patches = hidden[:, 1:].gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    return torch.cat([hidden[:, :1], patches], dim=1)


@torch.no_grad()
def sampled_new_tokens(
    model: BlipForConditionalGeneration, prompt: torch.Tensor, states: torch.Tensor, cfg: CaptionConfig
) -> torch.Tensor:
    """New tokens of the ``cfg.n_passes`` sampled captions of each set of ``states`` (equal lengths: no padding),
    seeded as the pipeline seeds them (seed 0, key = the set's index). Returns ``S * n_passes`` longs."""
    decoder, n_pass = model.text_decoder, cfg.n_passes
    rows = states.shape[0] * n_pass
    input_ids = prompt[None].expand(rows, -1)
    seeds = [row_seed(0, s, p) for s in range(states.shape[0]) for p in range(n_pass)]
    out = decoder.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        encoder_hidden_states=states.repeat_interleave(n_pass, 0),
        encoder_attention_mask=torch.ones(rows, states.shape[1], dtype=torch.long, device=states.device),
        **decoding_kwargs(decoder, cfg, seeds),
    )
    return new_token_counts(out, prompt.numel(), decoder.config.sep_token_id)


@torch.no_grad()
def calibrate_sep_bias(
    model: BlipForConditionalGeneration,
    processor: BlipProcessor,
    target: float = TARGET_NEW_TOKENS,
    steps: int = 12,
    tolerance: float = 0.25,
    states: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Add a bias ``b`` to the ``[SEP]`` logit of BLIP's text decoder (``cls.predictions.bias``, tied to the output
    layer's bias) so that the default sampled captions (top-p 0.9, temperature 1, 4..25 new tokens) of
    :func:`calibration_states` average ``target`` new tokens ([SEP] included).

    Deterministic bisection on ``b`` in [0, 16] (more bias, earlier ends), at most ``steps`` decodes, stopping
    within ``tolerance`` of ``target``; the best ``b`` seen is kept.

    Returns:
        ``(b, mean new tokens at b)``.
    """
    cfg = CaptionConfig()
    states = calibration_states(model, processor) if states is None else states
    prompt = processor.tokenizer(cfg.prompt, return_tensors="pt").input_ids[0, :-1].clone()  # [DEC] a picture of
    prompt[0] = model.config.text_config.bos_token_id
    bias, sep = model.text_decoder.cls.predictions.bias, model.config.text_config.sep_token_id
    base = float(bias[sep])

    def mean_at(b: float) -> float:
        bias[sep] = base + b
        return float(sampled_new_tokens(model, prompt.to(states.device), states, cfg).float().mean())

    lo, hi = 0.0, 16.0
    best = (0.0, float("inf"))
    for _ in range(steps):
        mid = (lo + hi) / 2
        mean = mean_at(mid)
        if abs(mean - target) < abs(best[1] - target):
            best = (mid, mean)
        if abs(mean - target) <= tolerance:
            break
        lo, hi = (mid, hi) if mean > target else (lo, mid)
    bias[sep] = base + best[0]
    return best
